"""One worker's share of the job: walk its shards, verify the complete ones against their records, make
the others under the shard's lock, and stream them to the writer."""

from __future__ import annotations

import json
import logging
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dmgr.digest import sha256_file
from dmgr.shards import ShardWriter, check_shard, read_record, shard_path, verify_shard
from dmgr.shards.locks import acquire, release
from dmgr.shards.records import write_record
from dmgr.synth.config import RunSpec
from dmgr.synth.engine import GIVEN, Engine, generate
from dmgr.synth.gate import changed_outside, fidelity, gate_metrics, gate_summary, mask_outside, seam_z, verdict
from dmgr.synth.plan import SamplePlan, num_shards, plan_sample, shard_seeds, worker_shards

log = logging.getLogger(__name__)


class NonFiniteSample(RuntimeError):
    """A sample's image held NaN/Inf and nonfinite.action forbids (more) retries."""


@dataclass
class WorkerStats:
    worker: int
    shards_done: int
    shards_skipped: int
    images: int
    seconds: float
    nonfinite_retries: int = 0
    writer_wait_seconds: float = 0.0  # of `seconds`, blocked on the shard writer (full queue, final flush)
    writer_cpu_seconds: float = 0.0  # the writer thread's CPU time (what it takes from a busy machine)


def shard_is_complete(spec: RunSpec, k: int, path: Path, seeds: Sequence[int]) -> bool:
    """True when the shard's bytes match its record. A shard without a record (written before records
    existed) is checked member by member and adopted; a damaged shard is logged, deleted, and False."""
    record = read_record(path)
    if record is None:
        if not path.exists():
            return False
        problem = verify_shard(path, list(seeds), spec.extras.members(spec.available_masks))
        if problem is None:
            adopt_legacy_shard(path, k, seeds, spec)
            return True
    else:
        problem = check_shard(path, record)
        if problem is None:
            return True
        if problem == "missing":
            return False
    log.warning("shard %s is damaged (%s): redoing it", path.name, problem)
    path.unlink(missing_ok=True)
    return False


def sample_metrics(meta: dict) -> dict[str, float]:
    """What the manifest's `metrics` averages, for one sample."""
    boxes = [d["window_box"] for d in meta.get("defects", [meta])]
    window_area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)
    return {
        "samples": 1,
        "defects": len(boxes),
        "final_loss": meta["final_loss"],
        "mask_area": meta["mask_area"],
        "mask_window_fraction": meta["mask_area"] / window_area,
        "empty_masks": int(meta["mask_area"] == 0),
        "fewer_defects_than_requested": int(len(boxes) < meta.get("defects_requested", 1)),
        "nonfinite_retries": meta.get("attempt", 0) - len(meta.get("gate", {}).get("rejected", [])),
    }


def add_metrics(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    return {**total, **{key: total.get(key, 0) + value for key, value in more.items()}}


def finite_samples(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[dict]:
    """generate(), with every sample whose image holds NaN/Inf made again from a derived noise seed
    (nonfinite.action=retry, up to nonfinite.max_attempts attempts in all) or the run stopped."""
    samples = []
    for plan, sample in zip(plans, generate(engine, spec, plans)):
        while not sample.pop("finite"):
            attempts = plan.attempt + 1
            if spec.nonfinite.action == "stop" or attempts >= spec.nonfinite.max_attempts:
                raise NonFiniteSample(
                    f"seed {plan.seed}: the image holds NaN/Inf after {attempts} attempt(s) "
                    f"(nonfinite.action={spec.nonfinite.action}, max_attempts={spec.nonfinite.max_attempts}): "
                    "check the checkpoints and precision; nothing of this shard was written"
                )
            log.warning("seed %d: NaN/Inf in the image, retrying from a derived seed (attempt %d)",
                        plan.seed, attempts + 1)
            plan = replace(plan, attempt=attempts)
            sample = generate(engine, spec, [plan])[0]
        samples.append(sample)
    return samples


def gate_scores(engine: Engine, spec: RunSpec, sample: dict) -> tuple[dict, list[str]]:
    """(scores, reasons for rejection) of one real-image sample (dmgr.synth.gate)."""
    meta = sample["json"]
    image, mask = np.asarray(sample["png"]), np.asarray(sample["mask.png"]) > 0
    given = sample[GIVEN]
    model, classes = engine.gate.model, engine.gate.classes
    defects = meta["defects"]
    size = spec.dataset.window_size
    scores = {
        "fidelity": [round(fidelity(model, image, d["window_box"], classes.index(d["class_name"]), size), 6)
                     for d in defects],
        "mask_area": [d["mask_area"] for d in defects],
        "mask_outside": mask_outside(mask, [d["window_box"] for d in defects]),
        "changed_outside": changed_outside(image, given, mask),
        "seam": round(seam_z(image, given, mask), 4),
    }
    ranges = [engine.gate.area_ranges[d["class_name"]] for d in defects]
    return scores, verdict(scores, ranges, spec.gate.thresholds())


def gated_samples(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[dict]:
    """finite_samples(), each scored by the gate; a rejected one is made again from the next attempt's
    derived noise (same plan) until it passes or gate.max_attempts are spent. Each round regenerates the
    rejected plans together; a sample is the same whatever its batch, so the result is too."""
    done: list[dict | None] = [None] * len(plans)
    history: list[list[dict]] = [[] for _ in plans]
    pending = list(enumerate(plans))
    while pending:
        again = []
        for (i, plan), sample in zip(pending, finite_samples(engine, spec, [p for _, p in pending])):
            meta = sample["json"]
            attempt = meta.get("attempt", 0)
            scores, reasons = gate_scores(engine, spec, sample)
            if reasons and attempt + 1 < spec.gate.max_attempts:
                history[i].append({"attempt": attempt, "reasons": reasons, "scores": scores})
                again.append((i, replace(plan, attempt=attempt + 1)))
                continue
            meta["gate"] = {"accepted": not reasons, "attempt": attempt, "reasons": reasons, "scores": scores,
                            "rejected": history[i]}
            if reasons:
                meta["gate"]["skipped" if spec.gate.on_exhausted == "skip" else "flagged"] = True
            done[i] = sample
        pending = again
    return done


def make_shard(engine: Engine, spec: RunSpec, writer: ShardWriter, path: Path, seeds: Sequence[int], bar: tqdm) -> dict:
    """Generate one shard's samples into the writer; returns the record fields beyond the digest. With the
    gate, a seed skipped after gate.max_attempts is not written; the record lists it."""
    metrics: dict[str, float] = {}
    skipped = []
    make = gated_samples if spec.gate.enabled else finite_samples
    for i in range(0, len(seeds), spec.batch_size):
        plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in seeds[i : i + spec.batch_size]]
        for sample in make(engine, spec, plans):
            meta = sample["json"]
            if "gate" in meta:
                metrics = add_metrics(metrics, gate_metrics(meta))
                if meta["gate"].get("skipped"):
                    skipped.append(sample["seed"])
                    continue
            metrics = add_metrics(metrics, sample_metrics(meta))
            sample.pop(GIVEN, None)
            writer.put(sample)
        bar.update(len(plans))
        if spec.gate.enabled:
            bar.set_postfix(accept=f"{1 - metrics['gate_rejected'] / metrics['gate_scored']:.0%}")
    gated = {"skipped_seeds": skipped} if spec.gate.enabled else {}
    return {"samples": len(seeds) - len(skipped), "first_seed": seeds[0], "last_seed": seeds[-1],
            "members": list(spec.extras.members(spec.available_masks)), "metrics": metrics, **gated}


def run_worker(spec: RunSpec, engine: Engine, worker: int, num_workers: int, position: int = 0) -> WorkerStats:
    """Make this worker's unfinished shards; complete ones are verified against their records and kept."""
    count = num_shards(len(spec.seeds), spec.samples_per_shard)
    mine = worker_shards(count, worker, num_workers)
    n, last = spec.samples_per_shard, count - 1
    total = len(mine) * n - ((n - len(shard_seeds(spec.seeds, n, last))) if last in mine else 0)
    log.info("worker %d/%d: %d shards (%d images) assigned on %s", worker, num_workers, len(mine), total, engine.device)
    writer = ShardWriter(spec.writer_queue)
    bar = tqdm(total=total, desc=f"worker {worker}", unit="img", position=position, disable=not spec.progress)
    start = time.perf_counter()
    done = skipped = images = retries = 0
    try:
        for k in mine:
            path = shard_path(spec.out_dir, spec.shard_prefix, k)
            seeds = shard_seeds(spec.seeds, spec.samples_per_shard, k)
            lock = acquire(path.parent.parent / "locks" / f"{path.name}.lock", f"shard {path.name}")
            try:
                complete = shard_is_complete(spec, k, path, seeds)
                for leftover in path.parent.glob(path.name + ".tmp-*"):  # safe: we hold the shard's lock
                    log.info("removing unfinished %s", leftover.name)
                    leftover.unlink(missing_ok=True)
            except BaseException:
                release(lock)
                raise
            if complete:
                release(lock)
                skipped += 1
                bar.update(len(seeds))
                continue
            writer.open(path, lock)  # the writer releases the lock once the shard is final
            record = make_shard(engine, spec, writer, path, seeds, bar)
            writer.close({"index": k, **record})
            done += 1
            images += len(seeds)
            retries += int(record["metrics"].get("nonfinite_retries", 0))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    log.info(
        "worker %d: %d shards complete and verified, %d made (%d images in %.1f s, %.3f images/s; %.1f s waiting "
        "on the shard writer, which used %.1f s of CPU)", worker, skipped, done, images, seconds,
        images / max(seconds, 1e-9), writer.waited, writer.cpu_seconds,
    )
    return WorkerStats(worker, done, skipped, images, seconds, retries, round(writer.waited, 3),
                       round(writer.cpu_seconds, 3))


def shard_records(spec: RunSpec) -> tuple[list[dict], list[str]]:
    """(records of the run's complete shards in order, names of the shards still missing)."""
    records, missing = [], []
    for k in range(num_shards(len(spec.seeds), spec.samples_per_shard)):
        path = shard_path(spec.out_dir, spec.shard_prefix, k)
        record = read_record(path) if path.exists() else None
        if record:
            records.append(record)
        else:
            missing.append(path.name)
    return records, missing


def adopt_legacy_shard(path: Path, k: int, seeds: Sequence[int], spec: RunSpec) -> dict:
    """A record for a complete shard written before records existed (read once, then never again)."""
    metrics: dict[str, float] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                metrics = add_metrics(metrics, sample_metrics(json.loads(tar.extractfile(member).read())))
    record = {"name": path.name, "index": k, "bytes": path.stat().st_size, "sha256": sha256_file(path),
              "samples": len(seeds), "first_seed": seeds[0], "last_seed": seeds[-1],
              "members": list(spec.extras.members(spec.available_masks)), "metrics": metrics}
    write_record(path, record)
    return record


def run_metrics(records: list[dict]) -> dict:
    """Means over the run's samples, from the shard records' sums (no tar is read)."""
    total: dict[str, float] = {}
    for record in records:
        total = add_metrics(total, record.get("metrics", {}))
    count = max(total.get("samples", 0), 1)
    gate = {}
    if "gate_seeds" in total:
        gate = {"gate": gate_summary(total, [s for r in records for s in r.get("skipped_seeds", [])])}
    return {
        "final_loss": total.get("final_loss", 0) / count,
        "mask_area": total.get("mask_area", 0) / count,
        "mask_window_fraction": total.get("mask_window_fraction", 0) / count,
        "empty_masks": int(total.get("empty_masks", 0)),
        "fewer_defects_than_requested": int(total.get("fewer_defects_than_requested", 0)),  # no room in the ROI
        "nonfinite_retries": int(total.get("nonfinite_retries", 0)),
        **gate,
    }
