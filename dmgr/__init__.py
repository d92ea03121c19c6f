"""dmgr: synthesise labelled industrial defect images with Dual-Manifold Gradient Rectification."""

from pathlib import Path

__version__ = "0.1.0"

# The folder that holds conf/ and checkpoints/: the repository in a checkout (or an editable install), the
# package itself once `pip install .` has copied them in (pyproject.toml maps them to dmgr/conf, dmgr/checkpoints).
# Relative checkpoint and data paths in the configs are looked up here when the working directory lacks them.
_PACKAGE = Path(__file__).resolve().parent
PROJECT_ROOT = _PACKAGE if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent
CONF_DIR = str(PROJECT_ROOT / "conf")  # the Hydra configs of the synthesis and training jobs
DEMO_DATA = Path("outputs/pcb-data")  # the demo's training data (`make data`): train's data_root, screen.data_root
# Trained classifiers, cached by a digest of their inputs; relative to the working directory, like out_dir.
EVAL_CACHE = Path("outputs/eval-cache")  # the evaluation's patch classifier (quality.cache_dir)
SCREEN_CACHE = Path("outputs/screen-cache")  # the quality screen's classifier of the user's data (screen.cache_dir)
