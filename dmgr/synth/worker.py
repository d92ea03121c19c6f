"""One worker's share of the job: go through its shards, verify the complete ones against their records, make
the others under the shard's lock, and stream them to the writer."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dmgr.digest import sha256_file
from dmgr.progress import ProgressBar, progress_bar
from dmgr.shards import ShardWriter, check_shard, read_record, shard_path
from dmgr.shards.layout import damaged_path, decode_shard
from dmgr.shards.locks import acquire, release
from dmgr.shards.manifest import manifest_entry
from dmgr.shards.records import write_record
from dmgr.synth.config import RunSpec
from dmgr.synth.engine import Attempt, Engine, make_attempts, make_settings
from dmgr.synth.plan import SamplePlan, num_shards, plan_sample, shard_seeds, worker_shards
from dmgr.synth.policy import Outcome, Screened, decide, judge, rules_for
from dmgr.synth.record import add_metrics, config_problem, members, outcome_json, outcome_metrics
from dmgr.synth.screen import screen_scores, screen_summary

log = logging.getLogger(__name__)


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


def shard_is_complete(spec: RunSpec, k: int, path: Path, seeds: Sequence[int], digests: dict[str, str]) -> bool:
    """True when the shard's bytes match its record. A shard without a record (written before records
    existed, or its record lost) is adopted only when every member decodes, every json agrees with this
    run's config, and its digest is the one the manifest holds, if any. A damaged shard is logged, moved
    aside to `<shard>.damaged` until its redo is accepted (the writer removes it then), and False."""
    record = read_record(path)
    if record is None:
        if not path.exists():
            return False
        problem = adopt_legacy_shard(path, k, seeds, spec, digests)
        if problem is None:
            return True
    else:
        problem = check_shard(path, record)
        if problem is None:
            return True
        if problem == "missing":
            return False
    log.warning("shard %s is damaged (%s): redoing it (kept as %s until the redo is accepted)",
                path.name, problem, damaged_path(path).name)
    os.replace(path, damaged_path(path))
    return False


LONG_SHARD_SECONDS = 1800.0  # a shard estimated longer than this gets a warning: a preemption loses it whole


def long_shard_warning(spec: RunSpec, shard: str, seconds_per_image: float) -> str | None:
    """The warning for a shard that takes long enough that one preemption or crash loses much work, or None."""
    estimate = seconds_per_image * spec.samples_per_shard
    if estimate <= LONG_SHARD_SECONDS:
        return None
    suggested = max(1, int(600 / max(seconds_per_image, 1e-9)))
    return (f"{shard}: a shard takes about {estimate / 60:.0f} min here (samples_per_shard={spec.samples_per_shard} "
            f"at {seconds_per_image:.1f} s per image) and a preemption or crash loses the shard in progress; "
            f"samples_per_shard={suggested} gives about 10 min shards (it changes the run: use a new out_dir)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def made_with(spec: RunSpec, engine: Engine) -> dict:
    """How a shard was executed (recorded, and named when a redo does not reproduce the record): the samples
    are bit-identical only for equal batch composition, threads, device and torch build."""
    device = str(engine.device)
    if engine.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(engine.device)})"
    screen = {"screen_classifier": engine.screen.digest[:12]} if engine.screen is not None else {}
    return {"batch_size": spec.batch_size, "threads": torch.get_num_threads(), "device": device,
            "torch": torch.__version__, "cpu": cpu_name(), **screen}


def _screened(engine: Engine, spec: RunSpec, attempt: Attempt) -> Screened:
    thresholds = spec.screen.thresholds(engine.screen.held_out_fidelity)
    return Screened(*screen_scores(engine.screen, attempt, spec.dataset.window_size, thresholds))


def made_seeds(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[Outcome]:
    """One batch of plans made, judged and made again until decided (dmgr.synth.policy.decide)."""
    placement = spec.dataset.placement
    minima = placement.min_areas or [placement.min_mask_area] * len(spec.dataset.classes)
    screen = partial(_screened, engine, spec) if spec.screen.enabled else None
    make = partial(make_attempts, engine, make_settings(spec))
    return decide(plans, make, partial(judge, minima=minima, screen=screen),
                  lambda plan: plan_sample(plan.seed, spec.dataset, spec.backgrounds, plan.attempt + 1),
                  rules_for(spec.nonfinite, spec.dataset.placement, spec.screen))


def make_shard(engine: Engine, spec: RunSpec, writer: ShardWriter, path: Path, seeds: Sequence[int], bar: ProgressBar,
               check_time: bool = False) -> dict:
    """Generate one shard's samples into the writer; returns the record fields beyond the digest. A seed
    skipped after its attempts (screen.on_exhausted or dataset.placement.on_exhausted = skip) is not written;
    the record lists it. With check_time, the second batch (the first pays the warm-up) times the shard for
    `long_shard_warning`."""
    metrics: dict[str, float] = {}
    skipped = []
    for i in range(0, len(seeds), spec.batch_size):
        start = time.perf_counter()
        plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in seeds[i : i + spec.batch_size]]
        for outcome in made_seeds(engine, spec, plans):
            meta = outcome_json(spec, engine.digests, outcome)
            written = outcome.status != "skipped"
            metrics = add_metrics(metrics, outcome_metrics(meta, written))
            if written:
                writer.put(members(spec, outcome.kept, meta))
            else:
                skipped.append(outcome.seed)
        if check_time and i == spec.batch_size:
            warning = long_shard_warning(spec, path.name, (time.perf_counter() - start) / len(plans))
            if warning:
                log.warning(warning)
        bar.update(len(plans))
        if spec.screen.enabled:
            bar.set_postfix(accept=f"{1 - metrics['screen_rejected'] / metrics['screen_scored']:.0%}")
    can_skip = spec.screen.enabled or spec.dataset.placement.on_exhausted == "skip"
    screened = {"skipped_seeds": skipped} if can_skip else {}
    return {"samples": len(seeds) - len(skipped), "first_seed": seeds[0], "last_seed": seeds[-1],
            "members": list(spec.extras.members(spec.available_masks)), "metrics": metrics,
            "made_with": made_with(spec, engine), **screened}


def run_worker(spec: RunSpec, engine: Engine, worker: int, num_workers: int, position: int = 0) -> WorkerStats:
    """Make this worker's unfinished shards; complete ones are verified against their records and kept."""
    count = num_shards(len(spec.seeds), spec.samples_per_shard)
    mine = worker_shards(count, worker, num_workers)
    n, last = spec.samples_per_shard, count - 1
    total = len(mine) * n - ((n - len(shard_seeds(spec.seeds, n, last))) if last in mine else 0)
    log.info("worker %d/%d: %d shards (%d images) assigned on %s", worker, num_workers, len(mine), total, engine.device)
    writer = ShardWriter(spec.writer_queue)
    bar = progress_bar(total=total, desc=f"worker {worker}", unit="img", position=position, disable=not spec.progress)
    start = time.perf_counter()
    done = skipped = images = retries = 0
    try:
        for k in mine:
            path = shard_path(spec.out_dir, spec.shard_prefix, k)
            seeds = shard_seeds(spec.seeds, spec.samples_per_shard, k)
            lock = acquire(path.parent.parent / "locks" / f"{path.name}.lock", f"shard {path.name}")
            try:
                complete = shard_is_complete(spec, k, path, seeds, engine.digests)
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
            record = make_shard(engine, spec, writer, path, seeds, bar, check_time=done == 0)
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


def adopt_legacy_shard(path: Path, k: int, seeds: Sequence[int], spec: RunSpec, digests: dict[str, str]) -> str | None:
    """Write the record of a shard found without one, after checking every member and json and that its digest
    is the manifest's when the manifest lists it; returns None when adopted, else why not."""
    members = spec.extras.members(spec.available_masks)
    problem, metas = decode_shard(path, list(seeds), members)
    problem = problem or config_problem(spec, digests, metas)
    if problem is not None:
        return problem
    digest = sha256_file(path)
    published = manifest_entry(path)
    if published is not None and published.get("sha256") != digest:
        return f"sha256 {digest[:12]} differs from the manifest's {str(published.get('sha256'))[:12]}"
    metrics: dict[str, float] = {}
    for meta in metas.values():
        metrics = add_metrics(metrics, outcome_metrics(meta, written=True))
    screened = {"skipped_seeds": []} if spec.screen.enabled or spec.dataset.placement.on_exhausted == "skip" else {}
    write_record(path, {"name": path.name, "index": k, "bytes": path.stat().st_size, "sha256": digest,
                        "samples": len(seeds), "first_seed": seeds[0], "last_seed": seeds[-1],
                        "members": list(members), "metrics": metrics, **screened})
    log.info("shard %s had no record: every member decodes and matches this run's config, adopted", path.name)
    return None


def run_metrics(records: list[dict]) -> dict:
    """Means over the run's samples, from the shard records' sums (no tar is read)."""
    total: dict[str, float] = {}
    for record in records:
        total = add_metrics(total, record.get("metrics", {}))
    count = max(total.get("samples", 0), 1)
    screen = {}
    if "screen_seeds" in total:
        screen = {"screen": screen_summary(total, [s for r in records for s in r.get("skipped_seeds", [])])}
    return {
        "final_loss": total.get("final_loss", 0) / count,
        "mask_area": total.get("mask_area", 0) / count,
        "mask_window_fraction": total.get("mask_window_fraction", 0) / count,
        "empty_masks": int(total.get("empty_masks", 0)),
        "fewer_defects_than_requested": int(total.get("fewer_defects_than_requested", 0)),  # no room in the ROI
        "nonfinite_retries": int(total.get("nonfinite_retries", 0)),
        "empty_masks_replaced": int(total.get("empty_masks_replaced", 0)),  # re-placed and made again
        "empty_masks_flagged": int(total.get("empty_masks_flagged", 0)),  # written, marked in their json
        "empty_masks_skipped": int(total.get("empty_masks_skipped", 0)),  # not written
        **screen,
    }
