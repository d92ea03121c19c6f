"""How the quality screen's classifier reads real defects it did not learn from.

    python -m dmgr.synth.screen_check --classifier outputs/screen-cache/screen-classifier-<key>.safetensors \
        --data-root data/held-back                  # your own defects the screen never saw
    python -m dmgr.synth.screen_check --classifier ... --test-defects 240      # the benchmark's TEST-stream defects

Each defect patch under DATA_ROOT/local/<class>/ (the layout `dmgr.data.prepare` writes) is read as the job
reads a sample's window, and scored with the classifier's probability of its class. Reported per class and in
all: the share that passes the fixed class check (`screen.min_fidelity`), the share whose class margin is at
least `screen.min_class_margin` (no other defect class read higher, at 0), and the share that passes the class
check the job applies (the threshold lowered to the `screen.fidelity_quantile` quantile of the classifier's
held-out defects, its cache record's `held_out_fidelity`, and the margin): the share of real defects the screen
would let through. Written to OUT/screen-check.json (default: beside the classifier).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from dmgr.cli import program
from dmgr.data.defects import CLASS_NAMES
from dmgr.data.export import TEST_OFFSET, Defect, write_patches
from dmgr.images import from_uint8
from dmgr.models.classifier import PatchClassifier, predict
from dmgr.shards.manifest import write_json_atomic
from dmgr.synth.screen import class_margin, fidelity_threshold
from dmgr.synth.screen_classifier import (
    ScreenClassifierSettings,
    class_files,
    held_out_defects,
    own_class_probabilities,
    read_patch,
)


def load_classifier(path: Path) -> tuple[PatchClassifier, dict]:
    """The screen classifier at `path` (a cache entry) and its record (path with .json)."""
    record = json.loads(Path(path).with_suffix(".json").read_text())
    model = PatchClassifier(len(record["classes"]))
    model.load_state_dict(load_file(path))
    return model.eval(), record


def stream_patches(root: Path, count: int, size: int = 64) -> Path:
    """root/local/: the patches of `count` defects of the held-out TEST stream (boards TEST_OFFSET + i, class
    i % 6), cut as the local model's training patches are; written once."""
    if not (root / "local" / "labels.json").exists():
        write_patches(root, [Defect(TEST_OFFSET + i, i % len(CLASS_NAMES), i) for i in range(count)], size,
                      progress=False)
    return root


def check(classifier: Path, data_root: Path, min_fidelity: float = 0.5, quantile: float | None = 0.1,
          min_margin: float | None = 0.0) -> dict:
    """Per class and in all: defects, the median probability of their class, and the shares passing the fixed
    class check, the margin and the calibrated class check (threshold and margin, as the job applies them)."""
    model, record = load_classifier(classifier)
    classes = tuple(record["classes"][:-1])
    window = record["settings"]["window"]
    held = record.get("held_out_fidelity")
    if held is None:  # an entry no job has loaded since: read its held-out defects as the job would
        settings = ScreenClassifierSettings(**record["settings"])
        held = own_class_probabilities(model, held_out_defects(Path(record["data_root"]), classes, settings),
                                       len(classes))
    calibrated = fidelity_threshold(min_fidelity, quantile, tuple(held))
    per_class, every = {}, []
    for k, (name, paths) in enumerate(class_files(data_root, classes).items()):
        if not paths:
            continue
        with torch.no_grad():
            probs = torch.softmax(predict(model, from_uint8(np.stack([read_patch(p, window) for p in paths])))[0], 1)
        read = np.stack([probs[:, k].numpy(), [class_margin(q, k, len(classes)) for q in probs]], 1)
        every.append(read)
        per_class[name] = _shares(read, min_fidelity, calibrated, min_margin)
    if not every:
        raise FileNotFoundError(f"{data_root}/local: no defect patches of the classifier's classes {classes}")
    return {"classifier": str(classifier), "data_root": str(data_root), "held_out_defects": len(held),
            "min_fidelity": min_fidelity, "calibrated_threshold": calibrated, "min_class_margin": min_margin,
            "all": _shares(np.concatenate(every), min_fidelity, calibrated, min_margin), "classes": per_class}


def _shares(read: np.ndarray, fixed: float, calibrated: float, min_margin: float | None) -> dict:
    """read: (defects, 2) probability of the own class, class margin."""
    probs, margins = read[:, 0], read[:, 1]
    margin_ok = margins >= min_margin if min_margin is not None else np.ones(len(read), dtype=bool)
    return {"defects": int(len(read)), "median": round(float(np.median(probs)), 4),
            "pass_fixed": round(float(np.mean(probs >= fixed)), 4),
            "pass_margin": round(float(np.mean(margin_ok)), 4),
            "pass_calibrated": round(float(np.mean((probs >= calibrated) & margin_ok)), 4)}


def run(classifier: Path, data_root: Path | None, test_defects: int | None, out: Path | None,
        min_fidelity: float = 0.5, quantile: float | None = 0.1, min_margin: float | None = 0.0) -> dict:
    """`check` on DATA_ROOT, or on `test_defects` TEST-stream defects (written under OUT/test-patches)."""
    out = Path(out) if out is not None else Path(classifier).parent
    if data_root is None:
        data_root = stream_patches(out / f"test-patches-{test_defects}", test_defects)
    report = check(Path(classifier), Path(data_root), min_fidelity, quantile, min_margin)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "screen-check.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    prog = program("dmgr.synth.screen_check")
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--classifier", type=Path, required=True,
                   help="the screen classifier: screen.cache_dir/screen-classifier-<key>.safetensors")
    unseen = p.add_mutually_exclusive_group(required=True)
    unseen.add_argument("--data-root", type=Path, help="a data root of defects it never saw (local/<class>/)")
    unseen.add_argument("--test-defects", type=int, help="that many defects of the benchmark's held-out TEST stream")
    p.add_argument("--min-fidelity", type=float, default=0.5, help="the job's screen.min_fidelity")
    p.add_argument("--fidelity-quantile", type=lambda v: None if v == "null" else float(v), default=0.1,
                   help="the job's screen.fidelity_quantile (null: the fixed check only)")
    p.add_argument("--min-class-margin", type=lambda v: None if v == "null" else float(v), default=0.0,
                   help="the job's screen.min_class_margin (null: not checked)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: the classifier's folder)")
    args = p.parse_args(argv)
    if args.test_defects is not None and args.test_defects < 1:
        p.error(f"--test-defects must be >= 1, got {args.test_defects}")
    try:
        report = run(args.classifier, args.data_root, args.test_defects, args.out, args.min_fidelity,
                     args.fidelity_quantile, args.min_class_margin)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
