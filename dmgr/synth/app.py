"""The synthesis job: `python -m dmgr.synth` / `dmgr-synth` / `torchrun ... -m dmgr.synth`."""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
import webdataset
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dmgr import CONF_DIR, __version__
from dmgr.cli import stop_on_interrupt
from dmgr.distributed import WorkerLost, barrier, gather, init_workers, shutdown, worker_threads
from dmgr.models import CheckpointError
from dmgr.shards import LockHeld, ShardWriteError, write_manifest
from dmgr.shards.locks import acquire, release
from dmgr.shards.manifest import read_manifest, write_json_atomic
from dmgr.synth.config import EXECUTION_KEYS, ConfigError, RunSpec, changed_settings, validate
from dmgr.synth.engine import load_engine
from dmgr.synth.plan import worker_index
from dmgr.synth.policy import NonFiniteSample
from dmgr.synth.worker import run_metrics, run_worker, shard_records

log = logging.getLogger("dmgr.synth")


class RunError(RuntimeError):
    pass


class Preempted(BaseException):  # noqa: N818 - a BaseException, like KeyboardInterrupt, so nothing swallows it
    """SIGTERM (Slurm preemption, scancel, torchrun stopping its workers): the current shard is abandoned."""


def _raise_preempted(signum: int, frame: object) -> None:
    raise Preempted(signal.Signals(signum).name)


def _check_out_dir(spec: RunSpec) -> bool:
    """Whether out_dir already holds this run (False: no run yet); another run there is a RunError naming the
    settings that changed. Reads only: checked before anything is loaded or trained."""
    path = spec.out_dir / "run.json"
    if not path.exists():
        return False
    previous = _run_record(path)
    if previous.get("identity") == spec.identity:
        return True
    if isinstance(previous.get("inputs"), dict):
        changes = changed_settings(previous["inputs"], spec.identity_inputs or {})
    else:  # a run.json from before the inputs were kept: compare the settings
        execution = set(EXECUTION_KEYS)
        changes = changed_settings({k: v for k, v in (previous.get("config") or {}).items() if k not in execution},
                                   {k: v for k, v in spec.resolved.items() if k not in execution})
    what = "; ".join(changes[:3]) + (f" (and {len(changes) - 3} more)" if len(changes) > 3 else "")
    raise RunError(
        f"out_dir={spec.out_dir} holds another run ({what or 'its identity ' + str(previous.get('identity'))}): "
        "set these back to resume it, or choose a new out_dir (or leave it unset)"
    )


def _claim_out_dir(spec: RunSpec) -> None:
    """Record the run's identity in out_dir; refuse to mix two different runs in one directory."""
    if _check_out_dir(spec):
        return
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec.out_dir / "run.json",
                      {"identity": spec.identity, "inputs": spec.identity_inputs, "config": spec.resolved})


def screen_record(spec: RunSpec, screen) -> dict:
    """The manifest's account of the screen's classifier: its held-out user defects, how it read them, and the
    class check's threshold they set (docs/evaluation.md "Quality screen")."""
    held = screen.held_out_fidelity
    thresholds = spec.screen.thresholds(held)
    return {"classifier": screen.record["key"], "held_out_defects": len(held),
            "held_out_fidelity_median": statistics.median(held) if held else None,
            "min_fidelity": thresholds["min_fidelity"], "min_class_margin": thresholds["min_class_margin"]}


def _run_record(path: Path) -> dict:
    """What run.json records; an unreadable run.json is a one-line RunError naming it and the fix."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise RunError(
            f"{path} is unreadable ({type(exc).__name__}: {exc}): if this out_dir holds only this run, delete "
            "run.json and rerun (it is written again), else choose a new out_dir"
        ) from None
    return data


def _file_logging(spec: RunSpec, worker: int) -> logging.Handler:
    logs = spec.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / f"worker-{worker:03d}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dmgr").addHandler(handler)
    return handler


def _carried_over(spec: RunSpec, summary: dict, everyone: list[dict]) -> dict:
    """Manifest entries a rerun keeps from the previous manifest of this run: the throughput when it
    only found complete shards, and the sample metrics (`quality`) unless it measures them again;
    samples are a function of (config, seed), so earlier measurements still describe them."""
    previous, unreadable = read_manifest(spec.out_dir)
    if unreadable:
        log.warning("%s is unreadable (%s): rebuilding it from the shard records", spec.out_dir / "manifest.json",
                    unreadable)
    kept = {"throughput": {**summary, "workers": everyone}}
    if summary["images_this_run"] == 0 and previous:
        kept["throughput"] = previous.get("throughput", {})
    if "quality" in previous and not spec.quality.enabled:
        kept["quality"] = previous["quality"]
    return kept


def synthesise(spec: RunSpec) -> dict | None:
    """Run this process's share; returns the manifest summary on the process that wrote it.

    Everything that can fail without having made a sample (device, checkpoints) runs before out_dir is
    created; a second job on the same worker slot or shard is refused by its lock (dmgr.shards.locks)."""
    ctx = init_workers(spec.device)
    handler = worker_lock = None
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_preempted)
    try:
        threads, why = worker_threads(spec.threads, ctx.local_world_size)
        torch.set_num_threads(threads)
        worker, num_workers = worker_index(ctx.rank, ctx.world_size, spec.array.task_id, spec.array.task_count)
        _check_out_dir(spec)  # another run there is refused before the models load or the screen trains
        engine = load_engine(spec, ctx.device)
        if ctx.rank == 0:
            _claim_out_dir(spec)
        barrier(ctx)
        if ctx.rank != 0:
            _claim_out_dir(spec)
        worker_lock = acquire(
            spec.out_dir / "locks" / f"worker-{worker:04d}-of-{num_workers:04d}.lock",
            f"worker {worker} of {num_workers} in out_dir={spec.out_dir}",
        )
        handler = _file_logging(spec, worker)  # after the lock: a refused job writes nothing into the log
        log.info("worker %d/%d: %d intra-op threads (%s), pid %d", worker, num_workers, threads, why, os.getpid())
        if spec.batch_size > spec.samples_per_shard and worker == 0:
            log.warning(
                "batch_size=%d but samples_per_shard=%d: a sampler call never spans two shards, so batches hold "
                "at most %d samples; raise samples_per_shard (e.g. to 1000) for large GPU batches",
                spec.batch_size, spec.samples_per_shard, spec.samples_per_shard,
            )
        stats = run_worker(spec, engine, worker, num_workers, position=ctx.local_rank)
        everyone = gather(ctx, asdict(stats))
        barrier(ctx)
        if ctx.rank != 0:
            return None
        records, missing = shard_records(spec)
        images = sum(s["images"] for s in everyone)
        seconds = max(s["seconds"] for s in everyone) or 1e-9
        summary = {
            "out_dir": str(spec.out_dir),
            "images_this_run": images,
            "wall_seconds": round(seconds, 3),
            "images_per_second": round(images / seconds, 4),
        }
        if missing:
            log.info("%d shards still missing (other array tasks?): manifest not written yet", len(missing))
            return summary
        run = {
            "identity": spec.identity,
            "config": spec.resolved,
            "versions": {
                "dmgr": __version__,
                "torch": torch.__version__,
                "webdataset": getattr(webdataset, "__version__", "?"),
                "python": platform.python_version(),
            },
            "checkpoints": engine.digests,
            **({"backgrounds": spec.backgrounds.summary()} if spec.backgrounds is not None else {}),
            **({"screen": screen_record(spec, engine.screen)} if engine.screen is not None else {}),
            "metrics": run_metrics(records),
            **_carried_over(spec, summary, everyone),
        }
        path = write_manifest(spec.out_dir, records, run)
        log.info(
            "done: %d shards, %d samples in %s; this run made %d images in %.1f s (%.3f images/s)",
            len(records),
            len(spec.seeds),
            spec.out_dir,
            images,
            seconds,
            images / seconds,
        )
        log.info("manifest: %s", path)
        if spec.quality.enabled:
            _measure_quality(spec)
        return {**summary, "manifest": str(path)}
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if worker_lock is not None:
            release(worker_lock)
        if handler is not None:
            logging.getLogger("dmgr").removeHandler(handler)
            handler.close()
        shutdown(ctx)


def _measure_quality(spec: RunSpec) -> None:
    from dmgr.eval.app import evaluate_samples, record_quality  # only runs that ask pay for the import
    from dmgr.eval.classifier import ClassifierSettings

    log.info("measuring sample quality (quality.enabled=true)")
    classifier = ClassifierSettings(per_class=spec.quality.classifier_boards, steps=spec.quality.classifier_steps)
    sets = evaluate_samples(spec.out_dir, cache=spec.quality.cache_dir, classifier=classifier, progress=spec.progress)
    record_quality(spec.out_dir, sets)


def _sweep_job_dir() -> Path | None:
    """The Hydra job directory of this sweep point, or None outside a multirun."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.runtime.output_dir)


def _record_sweep_point(job_dir: Path, cfg: DictConfig, outcome: dict) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    overrides = list(HydraConfig.get().overrides.task)
    write_json_atomic(job_dir / "result.json", {"overrides": overrides, **outcome})


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="synth")
@stop_on_interrupt("dmgr-synth", "the shard in progress was abandoned; rerun the same command to finish the run")
def main(cfg: DictConfig) -> dict | None:
    job_dir = _sweep_job_dir()
    try:
        summary = synthesise(validate(cfg))
    except (ConfigError, CheckpointError, RunError, LockHeld) as exc:
        if job_dir is None:
            print(f"dmgr-synth: error: {exc}", file=sys.stderr)
            sys.exit(2)
        log.error("skipping this sweep point: %s", exc)
        _record_sweep_point(job_dir, cfg, {"status": "skipped", "reason": str(exc)})
        return None
    except (ShardWriteError, NonFiniteSample, WorkerLost) as exc:
        print(f"dmgr-synth: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # the disk (full, read-only, gone) outside the shard writer: one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"dmgr-synth: error: {exc.strerror or exc}{where}: nothing partial was kept; rerun when fixed",
              file=sys.stderr)
        sys.exit(1)
    except Preempted as exc:
        print(f"dmgr-synth: stopped by {exc}: the shard in progress was abandoned; rerun the same command "
              "to finish the run", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    if job_dir is not None and summary is not None:
        _record_sweep_point(job_dir, cfg, {"status": "done", **summary})
    return summary


if __name__ == "__main__":
    main()
