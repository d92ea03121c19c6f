"""The evaluation stays honest: synthesis never uses the evaluation's classifier or its data.

The evaluation's judge (`dmgr.eval.classifier.load_or_train`) is trained on a board stream of its own
(`dmgr.eval.real.JUDGE`) and judges the samples; whatever scores or selects during synthesis (the quality screen's
classifier, `dmgr.synth.screen_classifier`) must learn from the user's data root and defect-free images only.
They share neither architecture, training code nor data (tests/test_eval_judge.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synth_support import ROOT, read_samples
from test_synth_backgrounds import IMAGES, write_boards
from test_synth_screen import CLASSES, write_data_root

from dmgr.synth.screen_classifier import data_digest

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

# The evaluation's own model and data: none may run while synthesising. The procedural generators go too:
# a run on the user's images and data root has no business drawing boards of the evaluation's domain.
FORBIDDEN = {
    "dmgr.eval.classifier": ("load_or_train", "validation_patches"),
    "dmgr.eval.real": ("defect_patches", "defective_boards", "clean_boards", "heldout_boards"),
    "dmgr.data.board": ("make_board",),
    "dmgr.data.defects": ("add_defect",),
}
# Modules only the evaluation reports load: a synthesis run without quality.enabled imports none of them.
EVALUATION_ONLY = ("dmgr.eval.app", "dmgr.eval.samples", "dmgr.eval.downstream", "dmgr.eval.segment",
                   "dmgr.eval.sources", "dmgr.eval.mask_areas")

GUARDED_SYNTH = """
import importlib, json, sys

def forbidden(name):
    def call(*args, **kwargs):
        raise AssertionError(f"synthesis called the evaluation's {name}")
    return call

for module, names in json.loads(sys.argv[1]).items():
    target = importlib.import_module(module)
    for name in names:
        setattr(target, name, forbidden(f"{module}.{name}"))
from dmgr.synth.app import main
try:
    sys.argv = ["dmgr.synth", *sys.argv[3:]]
    main()
finally:
    with open(MODULES, "w") as f:
        json.dump(sorted(m for m in sys.modules if m.startswith("dmgr")), f)
"""


def _guarded_synth(overrides: list[str], modules: Path) -> subprocess.CompletedProcess:
    """dmgr.synth in a fresh interpreter whose evaluation model and data raise when called; the dmgr modules
    it imported are written to `modules`."""
    script = GUARDED_SYNTH.replace("MODULES", repr(str(modules)))
    env = {**os.environ, "DMGR_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script, json.dumps(FORBIDDEN), "-", *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_gated_synthesis_never_touches_the_evaluation_classifier_or_its_data(tmp_path):
    boards, data = write_boards(tmp_path / "boards", 4), write_data_root(tmp_path / "data")
    screen_cache, eval_cache = tmp_path / "screen-cache", tmp_path / "eval-cache"
    out, modules = tmp_path / "run", tmp_path / "modules.json"
    result = _guarded_synth(
        [*IMAGES, f"dataset.images={boards}", "seeds=0-3", "samples_per_shard=2", "batch_size=2", f"out_dir={out}",
         "screen.enabled=true", f"screen.data_root={data}", f"screen.cache_dir={screen_cache}",
         "screen.classifier_steps=3", "screen.area_quantile=0", "screen.max_attempts=2",
         f"quality.cache_dir={eval_cache}"],
        modules,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    samples = read_samples(out)
    assert len(samples) == 4 and all("fidelity" in s["json"]["screen"]["scores"] for s in samples.values())
    loaded = set(json.loads(modules.read_text()))
    assert "dmgr.synth.screen_classifier" in loaded  # the guard watched a run that scored with a classifier
    assert not loaded & set(EVALUATION_ONLY), sorted(loaded & set(EVALUATION_ONLY))
    assert not eval_cache.exists(), "synthesis wrote to the evaluation classifier's cache"
    # the screen's classifier learnt from the user's data root and images only: its record says which, and
    # its patches are exactly the data root's (6 classes x 4) plus the clean windows of the 4 images
    (record_path,) = screen_cache.glob("screen-classifier-*.json")
    record = json.loads(record_path.read_text())
    assert Path(record["data_root"]).resolve() == data.resolve()
    assert record["data_digest"] == data_digest(data, CLASSES)
    clean = 4 * record["settings"]["clean_per_image"]
    assert record["patches"]["train"] + record["patches"]["held_out"] == len(CLASSES) * 4 + clean
    # afterwards the judge reads the run and reports how often it agrees with the screen that selected it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dmgr.eval", "samples", "--quiet", "--cache", str(eval_cache),
                           str(out), "--classifier-steps", "5", "--classifier-boards", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    agreement = json.loads((out / "eval" / "samples.json").read_text())["sets"]["dmgr"]["screen_agreement"]
    assert agreement["windows"] == 4
    assert all(0 <= agreement[k] <= 1 for k in ("agreement", "judge_class_accuracy", "screen_class_accuracy"))
    assert "the run's screen classifier read the same label" in (out / "eval" / "samples.md").read_text()


def test_the_guard_catches_a_synthesis_that_uses_the_evaluation(tmp_path):
    """quality.enabled=true measures the finished run with the evaluation classifier: the guard stops it."""
    boards = write_boards(tmp_path / "boards", 2)
    result = _guarded_synth(
        [*IMAGES, f"dataset.images={boards}", "seeds=0-1", "samples_per_shard=2", "batch_size=2",
         f"out_dir={tmp_path / 'run'}", "quality.enabled=true", f"quality.cache_dir={tmp_path / 'eval-cache'}",
         "quality.classifier_steps=1", "quality.classifier_boards=1"],
        tmp_path / "modules.json",
    )
    assert result.returncode != 0
    assert "synthesis called the evaluation's dmgr.eval.classifier.load_or_train" in result.stdout + result.stderr
    assert "dmgr.eval.app" in json.loads((tmp_path / "modules.json").read_text())
