"""End-to-end throughput of the synthesis job: one worker against two, and the shard writer's share.

    python -m dmgr.bench_job [--seeds 0-15] [--rounds 2] [OVERRIDE ...]      (make bench-job)

Runs the job (the default config unless overridden: demo models, schedule inpaint20, the quality screen
on with its retries) in fresh processes,
each worker with one intra-op thread (threads=1), in three set-ups:

  1 worker                      the real shard writer (PNG encoding and tar writing on its own thread)
  1 worker, null writer         the same samples made and handed over, nothing encoded or written
  2 workers (torchrun)          the real writer

and prints each one's images/s (the manifest's throughput: images over the slowest worker's seconds,
model loading excluded), the 2-worker speed-up, the writer's share of the wall time (1 - null-writer time
/ writer time), the part of it the sampling thread spent blocked on the writer and the writer thread's CPU
time (the manifest's `writer_wait_seconds`, `writer_cpu_seconds`). Every other round runs the set-ups
in reverse order, so drift in a neighbour's load falls on all of them.
Two workers can reach 2x only with two free cores: the table prints the machine's CPU count and load.

    python -m dmgr.bench_job --sizes 64x64,512x512,4096x3072 [--seeds 0-3] [OVERRIDE ...]

instead times the job (1 worker, the real writer) on one input image of each size (a demo board tiled to
it): seconds per defect (the worker's seconds over the defects made, model loading excluded), the share of
them spent waiting on the shard writer, and the process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from dmgr.cli import add_settings, program, settings_from, usage_error
from dmgr.schema import STRICT_SECTION, Count
from dmgr.synth.config import SynthSettings

RESULT = "bench-job-result: "


@dataclass(frozen=True)
class BenchJobSettings:
    """The options of `python -m dmgr.bench_job` (the rest of its command line: the job's overrides)."""

    __pydantic_config__ = STRICT_SECTION
    seeds: Annotated[str, Field(description="the seed range every set-up makes (the job's `seeds`)")] = (
        SynthSettings.seeds)
    rounds: Annotated[Count(), Field(description="rounds of the three set-ups")] = 2
    sizes: Annotated[str | None, Field(description="WxH,...: instead, seconds per defect on one input of each "
                                                   "size (e.g. 64x64,512x512,4096x3072)")] = None


class NullWriter:
    """The shard writer's interface, writing nothing (it still releases each shard's lock)."""

    def __init__(self, max_queue: int = 16) -> None:
        self.lock: int | None = None
        self.waited = self.cpu_seconds = 0.0

    def open(self, path: Path, lock: int | None = None) -> None:
        self.lock = lock

    def put(self, sample: dict) -> None:
        pass

    def close(self, record: dict | None = None) -> None:
        from dmgr.shards.locks import release

        if self.lock is not None:
            release(self.lock)
        self.lock = None

    def finish(self) -> list[Path]:
        return []

    def abort(self) -> None:
        self.close()


def child(overrides: list[str], null_writer: bool) -> None:
    """One run of the job in this process (or this torchrun rank); rank 0 prints the summary."""
    from hydra import compose, initialize_config_dir

    from dmgr import CONF_DIR
    from dmgr.synth import worker
    from dmgr.synth.app import synthesise
    from dmgr.synth.config import validate

    if null_writer:
        worker.ShardWriter = NullWriter
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        spec = validate(compose(config_name="synth", overrides=overrides))
    summary = synthesise(spec)
    if summary is not None:
        manifest = spec.out_dir / "manifest.json"  # the null writer leaves none (no shard records)
        workers = json.loads(manifest.read_text())["throughput"]["workers"] if manifest.exists() else []
        seconds = max(sum(w["seconds"] for w in workers), 1e-9)
        summary["writer_wait_share"] = sum(w["writer_wait_seconds"] for w in workers) / seconds
        summary["writer_cpu_share"] = sum(w["writer_cpu_seconds"] for w in workers) / seconds
        records, _ = worker.shard_records(spec)
        summary["defects"] = int(sum(r.get("metrics", {}).get("defects", 0) for r in records))
        summary["seconds_per_defect"] = seconds / max(summary["defects"], 1)
        summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(RESULT + json.dumps(summary), flush=True)


def write_input(folder: Path, width: int, height: int) -> Path:
    """One input image of width x height: a 64 px demo board tiled to the size."""
    import numpy as np
    from PIL import Image

    from dmgr.data.board import make_board

    folder.mkdir(parents=True, exist_ok=True)
    tile = make_board(0, 64).image
    image = np.tile(tile, (-(-height // 64), -(-width // 64), 1))[:height, :width]
    Image.fromarray(image).save(folder / f"{width}x{height}.png")
    return folder


def per_defect(sizes: list[tuple[int, int]], overrides: list[str]) -> None:
    """Seconds per defect, writer wait and peak memory of the job on one input of each size."""
    print(f"seconds per defect by input size: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"overrides {' '.join(overrides)}")
    print(f"{'input':<12}{'s/defect':>10}{'defects':>9}{'writer wait':>13}{'peak MiB':>10}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dmgr-bench-sizes-") as tmp:
        for width, height in sizes:
            folder = write_input(Path(tmp) / f"in-{width}x{height}", width, height)
            summary = run("1 worker", [*overrides, "dataset.source=images", f"dataset.images={folder}"],
                          Path(tmp) / f"out-{width}x{height}")
            rows.append(summary["seconds_per_defect"])
            print(f"{f'{width}x{height}':<12}{summary['seconds_per_defect']:>10.3f}{summary['defects']:>9}"
                  f"{summary['writer_wait_share']:>13.2%}{summary['peak_rss_mib']:>10.0f}", flush=True)
    print(f"largest / smallest: {rows[-1] / rows[0]:.2f}x (target <= 1.3x); load after {os.getloadavg()[0]:.2f}")


def run(setup: str, overrides: list[str], out_dir: Path) -> dict:
    """The summary of one set-up's run (images/s, the writer's wait share), in fresh processes."""
    args = [*overrides, "threads=1", "progress=false", f"out_dir={out_dir}"]
    if setup == "2 workers":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "dmgr.bench_job", "--child", *args]
    else:
        command = [sys.executable, "-m", "dmgr.bench_job", "--child", *args]
        if setup == "1 worker, null writer":
            command.insert(3, "--null-writer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DMGR_NO_PROGRESS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{setup} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.bench_job"), description=__doc__.split("\n\n")[0])
    add_settings(p, BenchJobSettings)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--null-writer", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args, overrides = cli.parse_known_args(argv)
    if args.child:
        child(overrides, args.null_writer)
        return
    settings = settings_from(cli, args, BenchJobSettings)
    overrides = [f"seeds={settings.seeds}", "samples_per_shard=4", *overrides]
    if settings.sizes:
        try:
            sizes = [tuple(int(v) for v in item.lower().split("x")) for item in settings.sizes.split(",")]
        except ValueError:
            usage_error(cli.prog, f"--sizes={settings.sizes}: give WxH,WxH,... e.g. 64x64,512x512,4096x3072")
        per_defect(sizes, overrides)
        return
    setups = ("1 worker", "1 worker, null writer", "2 workers")
    speeds: dict[str, list[float]] = {s: [] for s in setups}
    waits: list[float] = []
    cpu: list[float] = []
    print(f"job throughput: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; overrides {' '.join(overrides)}")
    with tempfile.TemporaryDirectory(prefix="dmgr-bench-job-") as tmp:
        for r in range(settings.rounds):
            for setup in setups if r % 2 == 0 else setups[::-1]:  # alternate the order: drift falls on all
                summary = run(setup, overrides, Path(tmp) / f"{r}-{setups.index(setup)}")
                speeds[setup].append(summary["images_per_second"])
                if setup == "1 worker":
                    waits.append(summary["writer_wait_share"])
                    cpu.append(summary["writer_cpu_share"])
                print(f"  round {r + 1}: {setup}: {speeds[setup][-1]:.3f} images/s", flush=True)
    mean = {s: statistics.mean(v) for s, v in speeds.items()}
    print()
    print(f"{'set-up':<24}{'images/s':>10}   (mean of {settings.rounds} rounds)")
    for setup in setups:
        print(f"{setup:<24}{mean[setup]:>10.3f}")
    print()
    print(f"2 workers / 1 worker: {mean['2 workers'] / mean['1 worker']:.2f}x (target >= 1.9x)")
    print(f"shard writer's share of wall time: {1 - mean['1 worker'] / mean['1 worker, null writer']:.1%} "
          "(target <= 2 %), by the null writer")
    print(f"  the sampler waited on the writer (full queue, final flush) {statistics.mean(waits):.2%} of its time;"
          f" the writer thread's CPU time is {statistics.mean(cpu):.2%} of it (its cost when no core is free)")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
