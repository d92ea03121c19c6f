"""Helpers for the synthesis-job tests: tiny configs and running the real app in subprocesses."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import webdataset as wds

ROOT = Path(__file__).resolve().parents[1]

# Tiny random models on generated boards, 10 respaced steps with time travel, one gradient iteration per
# rectified step (the sampler's own tests cover K = 2 and backtracking at length): seconds per image on a CPU.
TINY = [
    "model=tiny_random",
    "dataset.source=generate",
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
