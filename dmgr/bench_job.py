"""End-to-end throughput of the synthesis job: one worker against two, and the shard writer's share.

    python -m dmgr.bench_job [--seeds 0-15] [--rounds 2] [OVERRIDE ...]      (make bench-job)

Runs the job (the default config unless overridden: demo models, schedule inpaint) in fresh processes,
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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULT = "bench-job-result: "


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
        print(RESULT + json.dumps(summary), flush=True)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmgr.bench_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-15", help="the seed range every set-up makes (default 0-15)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three set-ups (default 2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--null-writer", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.child:
        child(overrides, args.null_writer)
        return
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    overrides = [f"seeds={args.seeds}", "samples_per_shard=4", *overrides]
    setups = ("1 worker", "1 worker, null writer", "2 workers")
    speeds: dict[str, list[float]] = {s: [] for s in setups}
    waits: list[float] = []
    cpu: list[float] = []
    print(f"job throughput: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; overrides {' '.join(overrides)}")
    with tempfile.TemporaryDirectory(prefix="dmgr-bench-job-") as tmp:
        for r in range(args.rounds):
            for setup in setups if r % 2 == 0 else setups[::-1]:  # alternate the order: drift falls on all
                summary = run(setup, overrides, Path(tmp) / f"{r}-{setups.index(setup)}")
                speeds[setup].append(summary["images_per_second"])
                if setup == "1 worker":
                    waits.append(summary["writer_wait_share"])
                    cpu.append(summary["writer_cpu_share"])
                print(f"  round {r + 1}: {setup}: {speeds[setup][-1]:.3f} images/s", flush=True)
    mean = {s: statistics.mean(v) for s, v in speeds.items()}
    print()
    print(f"{'set-up':<24}{'images/s':>10}   (mean of {args.rounds} rounds)")
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
