"""dmgr: synthesise labelled industrial defect images with Dual-Manifold Gradient Rectification."""

from pathlib import Path

__version__ = "0.1.0"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(PROJECT_ROOT / "conf")  # the Hydra configs of the synthesis and training jobs
