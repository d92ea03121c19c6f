"""A real detector as a second judge of the few-defect curve: Ultralytics YOLO segmentation, trained on the YOLO
export (`python -m dmgr.export yolo`) of real-N and of real-N + DMGR-N, scored on held-out real boards exported
the same way.

    make detect-env && python -m dmgr.eval yolo --curve outputs/eval/curve --per-class 16,64

Per N it reads the curve's synthesis runs of the local model named by --arch, --local-steps and --pretrain-steps
(the curve's, OUT/N<n>/<model>/synth-*: run `python -m dmgr.eval curve` first) and takes the samples of the curve's
DMGR-N x M (`fewshot.choose`: samples the export hands a user, flagged ones left out; M / 6 of each class with
--balance, the curve's default), and writes:

    OUT/yolo/N<n>/real/images/<class>/, masks/<class>/   the user's 6N boards (the export's --add-real layout)
    OUT/yolo/N<n>/<model>/export/                         the first run with them: `--val 0 --add-real ...`
    OUT/yolo/N<n>/<model>/export-synth-<a>-<b>/           each further run: `--val 0`
    OUT/yolo/test/                                        held-out real boards (TEST stream) as the val split
    OUT/yolo/N<n>/<model>/<source>-<seed>/                YOLO's run; its scores in scores.json (cached)

The model is built from `yolov8n-seg.yaml` (no pretrained weights, nothing downloaded, plots off) and trained in
the detector environment (`.venv-detect`), whose torch and torchvision Ultralytics needs. Sources: real-N (the
export's `real-*` images only) and real-N + DMGR-N (every training image of the export).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmgr.data.defects import CLASS_NAMES
from dmgr.data.export import TEST_OFFSET
from dmgr.eval.fewshot import CurveSettings, choose, model_name, steps_for, synth_runs, user_defects
from dmgr.eval.real import Boards, boards_of, defective_boards
from dmgr.schema import STRICT_SECTION, Count, build
from dmgr.shards.layout import sample_key

log = logging.getLogger(__name__)

DETECT_PYTHON = Path(".venv-detect/bin/python")

# Runs inside the detector environment: only Ultralytics, no dmgr.
TRAIN_SCRIPT = """
import json, os, sys
os.environ.setdefault("YOLO_OFFLINE", "1")
from ultralytics import YOLO
data, out, epochs, imgsz, batch, seed, device = sys.argv[1:8]
model = YOLO("yolov8n-seg.yaml")
common = dict(imgsz=int(imgsz), batch=int(batch), device=device, workers=0, plots=False, verbose=False,
              project=out, exist_ok=True)
model.train(data=data, epochs=int(epochs), seed=int(seed), deterministic=True, amp=False, val=False,
            pretrained=False, name="train", **common)
metrics = model.val(data=data, split="val", name="val", **common)
print(json.dumps({"mask_map50": float(metrics.seg.map50), "mask_map50_95": float(metrics.seg.map),
                  "box_map50": float(metrics.box.map50), "box_map50_95": float(metrics.box.map)}))
"""


@dataclass(frozen=True)
class DetectorSettings:
    __pydantic_config__ = STRICT_SECTION
    per_class: tuple[Count(), ...] = (16, 64)
    pairs: Count() = 64  # DMGR-N x M: the curve's M (samples of its runs that the export keeps)
    include_flagged: bool = False  # the export's --include-flagged (the curve's, when it was run with it)
    balance: bool = CurveSettings.balance  # the curve's --balance: which of the runs' samples DMGR-N x M holds
    arch: str = CurveSettings.arch  # the local model whose runs are judged: the curve's --arch,
    local_steps: tuple[Count(), ...] = (2500, 3000)  # --local-steps (per N, in per_class order; the curve's
    #   defaults for N = 16 and 64)
    pretrain_steps: Count(0) = 0  # and --pretrain-steps
    epochs: Count() = 30
    imgsz: Count(32) = 64
    batch: Count() = 32
    seeds: tuple[int, ...] = (0,)
    test_defective: Count() = 180
    image_size: Count(8) = 64
    device: str = "cpu"


def write_boards(root: Path, boards: Boards) -> Path:
    """root/images/<class>/NNNNNN.png and root/masks/<class>/NNNNNN.png: one defect per board."""
    pixels = ((boards.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (image, mask, cid) in enumerate(zip(pixels, boards.masks, boards.classes.tolist())):
        name = CLASS_NAMES[cid]
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / name / f"{i:06d}.png")
        Image.fromarray(mask[0].numpy().astype(np.uint8) * 255).save(root / "masks" / name / f"{i:06d}.png")
    return root


def _export(run: Path, out: Path, real: Path | None, real_as_val: bool = False, include_flagged: bool = False) -> Path:
    if (out / "data.yaml").exists():
        return out
    command = [sys.executable, "-m", "dmgr.export", "yolo", str(run), str(out), "--val", "0",
               *(["--include-flagged"] if include_flagged else []), *(["--add-real", str(real)] if real else []),
               *(["--real-as-val"] if real_as_val else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return out


def data_yaml(path: Path, train: list[Path], val: Path) -> Path:
    """A data.yaml whose train split is a list file of `train` images and whose val split is `val`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    listing = path.with_suffix(".train.txt")
    listing.write_text("".join(f"{p.resolve()}\n" for p in train))
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASS_NAMES))
    path.write_text(f"train: {listing.resolve()}\nval: {val.resolve()}\nnames:\n{names}")
    return path


def model_inputs(data: Path, settings: DetectorSettings, seed: int) -> dict:
    """What a YOLO model's scores depend on: its training settings, seed, and the images its data yaml lists."""
    listed = data.with_suffix(".train.txt").read_text() + data.read_text()
    return {"epochs": settings.epochs, "imgsz": settings.imgsz, "batch": settings.batch, "seed": seed,
            "device": settings.device, "data": hashlib.sha256(listed.encode()).hexdigest()[:16]}


def train_and_score(data: Path, out: Path, settings: DetectorSettings, seed: int, python: Path) -> dict:
    """One YOLO model, cached in out/scores.json with its inputs: a change of epochs, batch or images retrains."""
    scores, inputs = out / "scores.json", model_inputs(data, settings, seed)
    if scores.exists():
        kept = json.loads(scores.read_text())
        if kept.get("inputs") == inputs:
            return kept["scores"]
        shutil.rmtree(out)
    if not python.exists():
        raise FileNotFoundError(f"{python}: the detector environment is missing; run `make detect-env`")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(out.resolve() / "config")}
    command = [str(python), "-c", TRAIN_SCRIPT, str(data.resolve()), str(out.resolve()), str(settings.epochs),
               str(settings.imgsz), str(settings.batch), str(seed), settings.device]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    (out / "yolo.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"YOLO training failed; see {out / 'yolo.log'}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    scores.write_text(json.dumps({"inputs": inputs, "scores": result}))
    return result


def finished_runs(root: Path) -> list[Path]:
    """The N's finished synthesis runs, in seed order."""
    runs = [r for r in synth_runs(root) if (r / "manifest.json").exists()]
    if not runs:
        raise FileNotFoundError(f"{root}: no finished synthesis run (synth-*); run `python -m dmgr.eval curve` first")
    return runs


def synthetic_images(runs: list[Path], root: Path, real: Path, settings: DetectorSettings) -> tuple[Path, list[Path]]:
    """The first run's export with the user's boards (root/export), and the exported training images of the
    samples the curve's DMGR-N x M reads (`choose`; each further run exported only when it holds one of them)."""
    chosen = choose(runs, settings.pairs, settings.include_flagged, settings.balance)
    have = sum(len(seeds) for seeds in chosen.values())
    if have < settings.pairs:
        raise ValueError(f"{runs[0].parent}: the runs hold {have} of the {settings.pairs} samples --pairs asks; run "
                         "the curve with that M first")
    first = _export(runs[0], root / "export", real, include_flagged=settings.include_flagged)
    images = []
    for run, seeds in chosen.items():
        exported = first if run == runs[0] else _export(run, root / f"export-{run.name}", None,
                                                        include_flagged=settings.include_flagged)
        images += [exported / "images" / "train" / f"{sample_key(seed)}.png" for seed in seeds]
    missing = [p for p in images if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: a chosen sample is not in its run's export")
    return first, images


def judge_curve(curve: Path, settings: DetectorSettings, python: Path = DETECT_PYTHON) -> dict:
    """Per N and source: mean and std over seeds of mask/box mAP50 and mAP50-95; written to OUT/yolo/yolo.json."""
    root = curve / "yolo"
    test_real = root / "test" / "boards"
    if not (test_real / "images").exists():
        write_boards(test_real, defective_boards(TEST_OFFSET, settings.test_defective, settings.image_size))
    results: dict = {"settings": asdict(settings), "per_class": {}}
    for index, n in enumerate(settings.per_class):
        model = model_name(settings.arch, steps_for(settings.local_steps, index), settings.pretrain_steps)
        runs = finished_runs(curve / f"N{n}" / model)
        real = root / f"N{n}" / "real"
        if not (real / "images").exists():
            write_boards(real, boards_of(user_defects(n), settings.image_size))
        test = _export(runs[0], root / "test" / f"export-N{n}", test_real, real_as_val=True)
        exported, synthetic = synthetic_images(runs, root / f"N{n}" / model, real, settings)
        real_images = sorted(p for p in (exported / "images" / "train").glob("*.png") if p.name.startswith("real-"))
        sources = {f"real-{n}": real_images, f"real-{n}+dmgr-{n}x{settings.pairs}": real_images + synthetic}
        rows = {}
        for name, images in sources.items():
            yaml_path = data_yaml(root / f"N{n}" / model / f"{name}.yaml", images, test / "images" / "val")
            runs = [train_and_score(yaml_path, root / f"N{n}" / model / f"{name}-{seed}", settings, seed, python)
                    for seed in settings.seeds]
            rows[name] = {"train_images": len(images), **{k: {"mean": float(np.mean([r[k] for r in runs])),
                                                            "std": float(np.std([r[k] for r in runs]))}
                                                        for k in runs[0]}}
            log.info("YOLO %s: mask mAP50 %.3f, mAP50-95 %.3f (%d images)", name, rows[name]["mask_map50"]["mean"],
                     rows[name]["mask_map50_95"]["mean"], len(images))
        results["per_class"][str(n)] = rows
    (root / "yolo.json").write_text(json.dumps(results, indent=1))
    return results


def add_arguments(c: argparse.ArgumentParser) -> None:
    d = DetectorSettings()
    c.add_argument("--curve", type=Path, default=Path("outputs/eval/curve"), help="the curve's output folder")
    c.add_argument("--per-class", type=lambda v: tuple(int(x) for x in v.split(",")), default=d.per_class)
    c.add_argument("--pairs", type=int, default=d.pairs,
                   help="DMGR-N x M: the curve's M (samples of its runs that the export keeps)")
    c.add_argument("--include-flagged", action="store_true",
                   help="count flagged samples too (when the curve was run with --include-flagged)")
    c.add_argument("--balance", action=argparse.BooleanOptionalAction, default=d.balance,
                   help="the curve's --balance (M / 6 samples of each class) or --no-balance (the first M)")
    c.add_argument("--arch", default=d.arch, help="the curve's --arch: the local model whose runs are judged")
    c.add_argument("--local-steps", type=lambda v: tuple(int(x) for x in v.split(",")), default=d.local_steps,
                   help="the curve's --local-steps (per N, in --per-class order; the last repeats)")
    c.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="the curve's --pretrain-steps")
    c.add_argument("--epochs", type=int, default=d.epochs)
    c.add_argument("--imgsz", type=int, default=d.imgsz,
                   help="YOLO's input side in pixels: the boards are upscaled to it (Ultralytics rounds to its stride)")
    c.add_argument("--seeds", type=lambda v: tuple(int(x) for x in v.split(",")), default=d.seeds)
    c.add_argument("--test-defective", type=int, default=d.test_defective)
    c.add_argument("--device", default=d.device, help="cpu, or a CUDA device index such as 0")


def yolo_command(args: argparse.Namespace) -> dict:
    settings = build(DetectorSettings, dict(per_class=args.per_class, pairs=args.pairs,
                                            include_flagged=args.include_flagged, balance=args.balance,
                                            arch=args.arch,
                                            local_steps=args.local_steps, pretrain_steps=args.pretrain_steps,
                                            epochs=args.epochs, imgsz=args.imgsz,
                                            seeds=args.seeds, test_defective=args.test_defective, device=args.device))
    return judge_curve(args.curve, settings)
