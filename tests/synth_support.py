"""Helpers for the synthesis-job tests: tiny configs and running the real app in subprocesses."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Tiny random models on generated boards, 10 respaced steps with time travel, one gradient iteration per
# rectified step (the sampler's own tests cover K = 2 and backtracking at length): seconds per image on a CPU.
TINY = [
    "model=tiny_random",
    "dataset.source=generate",
    "screen.enabled=false",  # the screen reads real images; tests that use it turn it on with their own data
    "schedule=fast",
    "schedule.respacing=10",
    "schedule.T_s=6",
    "schedule.T_e=3",
    "schedule.time_travel=true",
    "schedule.jump_length=3",
    "schedule.iterations=1",
    "schedule.max_backtracks=4",
    "progress=false",
    "threads=1",  # shards are bit-identical across processes for equal intra-op threads
]


def run_synth(overrides: list[str], nproc: int = 1, check: bool = True, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "DMGR_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "dmgr.synth", *overrides]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "dmgr.synth",
            *overrides,
        ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def shard_files(out_dir: Path) -> list[str]:
    return sorted(glob.glob(str(out_dir / "shards" / "*.tar")))


def read_samples(out_dir: Path) -> dict[str, dict]:
    """Every sample through webdataset's own reader, keyed by __key__; asserts keys are unique."""
    samples: dict[str, dict] = {}
    for sample in wds.WebDataset(shard_files(out_dir), shardshuffle=False).decode("pil"):
        key = sample["__key__"]
        assert key not in samples, f"seed {key} appears twice"
        samples[key] = sample
    return samples


def raw_members(out_dir: Path) -> dict[str, bytes]:
    """Every member's bytes through plain tarfile."""
    members: dict[str, bytes] = {}
    for path in shard_files(out_dir):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                assert m.name not in members, f"{m.name} appears twice"
                members[m.name] = tar.extractfile(m).read()
    return members


def manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / "manifest.json").read_text())


# A sample is a pure function of (config, seed), bit for bit only for the same batch composition, thread count
# and machine (DESIGN.md "The determinism contract"). Otherwise CPU kernels round differently and the uint8
# conversion (truncation) turns a float that moved by an ulp into a grey level: the promise is a tolerance.
# Measured (tiny random models, real backgrounds): a seed made alone against in a batch of 2 differs by at most
# one grey level in at most 2 pixels (mean 0.0002); the same seed at another attempt differs by > 200 grey
# levels (mean > 3), so the tolerance still tells a wrong noise stream from rounding.
MAX_GREY_STEP = 2  # largest difference of one value, in grey levels
MAX_MEAN_STEP = 0.01  # mean absolute difference over the whole image, in grey levels
MAX_MASK_FLIPS = 4  # mask pixels that may flip (a value at the mask's threshold)
FLOAT_REL = 1e-3  # float diagnostics in the json (final_loss)


def grey_difference(a: Image.Image, b: Image.Image, where: np.ndarray | None = None) -> tuple[int, float]:
    """(largest, mean) absolute difference of two uint8 images in grey levels, over the (H, W) `where`."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    diff = diff if where is None else diff[where]
    return int(diff.max(initial=0)), float(diff.mean()) if diff.size else 0.0


def pixels_close(a: Image.Image, b: Image.Image, where: np.ndarray | None = None) -> bool:
    """Equal up to the rounding of the uint8 conversion (see MAX_GREY_STEP, MAX_MEAN_STEP)."""
    top, mean = grey_difference(a, b, where)
    return top <= MAX_GREY_STEP and mean <= MAX_MEAN_STEP


def binary(mask: Image.Image) -> np.ndarray:
    """(H, W) bool of a mask member (webdataset's reader hands masks back as RGB, the job as L)."""
    return np.asarray(mask.convert("L")) > 127


def mask_flips(a: Image.Image, b: Image.Image) -> int:
    return int((binary(a) != binary(b)).sum())


def _metadata_close(a, b, masks_equal: bool, where: str = "json") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), (where, sorted(a), sorted(b))
        for key in a:
            if key == "mask_box" and not masks_equal:  # a flipped mask pixel may move the box
                continue
            if key == "mask_area":  # one area, or per defect (the screen's scores)
                xs, ys = (v if isinstance(v, list) else [v] for v in (a[key], b[key]))
                assert len(xs) == len(ys) and all(abs(x - y) <= MAX_MASK_FLIPS for x, y in zip(xs, ys)), (
                    f"{where}.{key}", a[key], b[key])
                continue
            _metadata_close(a[key], b[key], masks_equal, f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _metadata_close(x, y, masks_equal, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= FLOAT_REL * max(abs(a), abs(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_sample(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> None:
    """Two makings of one sample in different batch compositions (or thread counts) agree as promised: every
    image within the rounding tolerance, every mask but MAX_MASK_FLIPS pixels, the json equal but for float
    diagnostics (relative FLOAT_REL) and the mask's area and box; json keys in `ignore` are left out.
    `a` and `b` are samples as dmgr.synth.record.attempt_sample() or read_samples() give them."""
    members = sorted(k for k in a if k == "json" or k.endswith("png"))
    assert members == sorted(k for k in b if k == "json" or k.endswith("png")), (sorted(a), sorted(b))
    flips = {name: mask_flips(a[name], b[name]) for name in members if name.endswith("mask.png")}
    assert all(n <= MAX_MASK_FLIPS for n in flips.values()), flips
    # where a mask pixel flipped, the image holds the input on one side and generated pixels on the other
    agree = binary(a["mask.png"]) == binary(b["mask.png"]) if "mask.png" in flips else None
    for name in members:
        if name.endswith("png") and name not in flips:
            where = agree if agree is not None and agree.shape == a[name].size[::-1] else None
            assert pixels_close(a[name], b[name], where), (name, grey_difference(a[name], b[name], where))
    meta_a = {k: v for k, v in a["json"].items() if k not in ignore}
    meta_b = {k: v for k, v in b["json"].items() if k not in ignore}
    _metadata_close(meta_a, meta_b, masks_equal=not any(flips.values()))
