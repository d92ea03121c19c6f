"""One worker's share of the job: walk its shards, verify the complete ones against their records, make
the others under the shard's lock, and stream them to the writer."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmgr.digest import sha256_file
from dmgr.progress import ProgressBar, progress_bar
from dmgr.shards import ShardWriter, check_shard, read_record, shard_path
from dmgr.shards.layout import damaged_path, decode_shard
from dmgr.shards.locks import acquire, release
from dmgr.shards.manifest import manifest_entry
from dmgr.shards.records import write_record
from dmgr.synth.config import RunSpec
from dmgr.synth.engine import GIVEN, Engine, config_fields, generate, planned_defect
from dmgr.synth.plan import SamplePlan, num_shards, plan_sample, shard_seeds, worker_shards
from dmgr.synth.screen import (
    attempt_rank,
    changed_outside,
    fidelity,
    mask_outside,
    screen_metrics,
    screen_summary,
    seam_z,
    verdict,
)

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


def sample_metrics(meta: dict) -> dict[str, float]:
    """What the manifest's `metrics` averages, for one sample written."""
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
        **retry_metrics(meta),
    }


def retry_metrics(meta: dict) -> dict[str, float]:
    """The retries behind one sample by reason, and whether its mask check was exhausted."""
    reasons = [r["reason"] for r in meta.get("retries", [])]
    exhausted = meta.get("empty_mask", {})
    return {"nonfinite_retries": reasons.count("nonfinite"), "empty_masks_replaced": reasons.count("empty_mask"),
            "empty_masks_flagged": int(bool(exhausted.get("flagged"))),
            "empty_masks_skipped": int(bool(exhausted.get("skipped")))}


def add_metrics(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    return {**total, **{key: total.get(key, 0) + value for key, value in more.items()}}


def three_channels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) of an RGB or a grey (H, W) uint8 image: the screen reads grey samples as the channels equal."""
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def screen_scores(engine: Engine, spec: RunSpec, sample: dict) -> tuple[dict, list[str]]:
    """(scores, reasons for rejection) of one real-image sample (dmgr.synth.screen)."""
    meta = sample["json"]
    image, mask = three_channels(np.asarray(sample["png"])), np.asarray(sample["mask.png"]) > 0
    given = three_channels(sample[GIVEN])
    model, classes = engine.screen.model, engine.screen.classes
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
    ranges = [engine.screen.area_ranges[d["class_name"]] for d in defects]
    return scores, verdict(scores, ranges, spec.screen.thresholds())


def small_masks(spec: RunSpec, meta: dict) -> dict | None:
    """None when every defect's mask reaches its class's minimum area (dataset.placement.min_areas), else
    the areas and minima."""
    minima = spec.dataset.placement.min_areas or [spec.dataset.placement.min_mask_area] * len(spec.dataset.classes)
    defects = meta.get("defects", [meta])
    areas, floors = [d["mask_area"] for d in defects], [minima[d["class_id"]] for d in defects]
    if all(a >= f and a > 0 for a, f in zip(areas, floors)):
        return None
    return {"mask_area": areas, "min_area": floors}


def _budget(spec: RunSpec, reason: str) -> int:
    """Attempts in all a seed may take while `reason` keeps failing it."""
    return {"nonfinite": spec.nonfinite.max_attempts, "empty_mask": spec.dataset.placement.max_attempts,
            "screen": spec.screen.max_attempts}[reason]


def _check(engine: Engine, spec: RunSpec, sample: dict) -> tuple[str | None, dict]:
    """(the first reason the sample must be made again, its details), checked in order: NaN/Inf, a mask
    below the minimum area, the quality screen (when on); (None, screen scores or {}) when it passes."""
    if not sample.pop("finite"):
        return "nonfinite", {}
    small = small_masks(spec, sample["json"])
    if small is not None:
        return "empty_mask", small
    if spec.screen.enabled:
        scores, reasons = screen_scores(engine, spec, sample)
        return ("screen" if reasons else None), {"reasons": reasons, "scores": scores}
    return None, {}


def _exhausted(spec: RunSpec, plan: SamplePlan, reason: str, details: dict, meta: dict) -> None:
    """Mark the json of a sample whose last attempt still fails (or stop the run for NaN/Inf)."""
    attempts = plan.attempt + 1
    if reason == "nonfinite":
        raise NonFiniteSample(
            f"seed {plan.seed}: the image holds NaN/Inf after {attempts} attempt(s) "
            f"(nonfinite.action={spec.nonfinite.action}, max_attempts={spec.nonfinite.max_attempts}): "
            "check the checkpoints and precision; nothing of this shard was written"
        )
    if reason == "empty_mask":
        outcome = "skipped" if spec.dataset.placement.on_exhausted == "skip" else "flagged"
        meta["empty_mask"] = {**details, "attempts": attempts, outcome: True}
        log.warning("seed %d: a defect mask below its minimum area after %d attempt(s): %s", plan.seed, attempts,
                    outcome)


def made_samples(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[dict]:
    """generate(), then one retry loop: a sample with NaN/Inf, a defect mask below its class's minimum area,
    or (screen.enabled) a screen rejection is made again at the next attempt, a new placement (same background
    and classes) with noise from a derived seed, until it passes or the reason's max_attempts are spent (one
    attempt counter per seed; its json lists each retry with its reason). A seed whose attempts are spent
    writes its last attempt, or with screen.on_exhausted=best the best-ranked screened one (`attempt_rank`).
    Each round makes the failed plans of one batch together, so the batches, and the shards, depend only on
    the seeds and batch_size."""
    done: list[dict | None] = [None] * len(plans)
    retries: list[list[dict]] = [[] for _ in plans]
    rejected: list[list[dict]] = [[] for _ in plans]
    best: list[tuple | None] = [None] * len(plans)  # (rank, attempt, sample, details) of screen rejections
    keep_best = spec.screen.enabled and spec.screen.on_exhausted == "best"
    pending = list(enumerate(plans))
    while pending:
        again = []
        for (i, plan), sample in zip(pending, generate(engine, spec, [p for _, p in pending])):
            reason, details = _check(engine, spec, sample)
            retry = reason is not None and plan.attempt + 1 < _budget(spec, reason)
            if reason == "nonfinite" and spec.nonfinite.action == "stop":
                retry = False
            if reason == "screen":
                rejected[i].append({"attempt": plan.attempt, **details})
                rank = attempt_rank(details["scores"], details["reasons"])
                if keep_best and (best[i] is None or rank < best[i][0]):
                    best[i] = (rank, plan.attempt, sample, details)
            if retry:
                retries[i].append({"attempt": plan.attempt, "reason": reason})
                log.info("seed %d: attempt %d failed (%s): a new placement", plan.seed, plan.attempt, reason)
                again.append((i, plan_sample(plan.seed, spec.dataset, spec.backgrounds, plan.attempt + 1)))
                continue
            attempts, attempt = plan.attempt + 1, plan.attempt
            if reason in ("screen", "empty_mask") and best[i] is not None:
                _, attempt, sample, details = best[i]
                reason = "screen"
            elif reason is not None:
                _exhausted(spec, plan, reason, details, sample["json"])
            meta = sample["json"]
            if retries[i]:
                meta["retries"] = retries[i]
            if spec.screen.enabled:
                reasons = details.get("reasons", [reason] if reason else [])
                meta["screen"] = {"accepted": reason is None, "attempt": attempt, "attempts": attempts,
                                  "reasons": reasons, "scores": details.get("scores", {}),
                                  "rejected": [r for r in rejected[i] if r["attempt"] != attempt]}
                if reason == "screen":
                    meta["screen"]["skipped" if spec.screen.on_exhausted == "skip" else "flagged"] = True
            done[i] = sample
        pending = again
    return done


def skipped_sample(meta: dict) -> bool:
    """A seed whose last attempt failed and whose setting says skip: not written, listed in the record."""
    return bool(meta.get("screen", {}).get("skipped") or meta.get("empty_mask", {}).get("skipped"))


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


def make_shard(engine: Engine, spec: RunSpec, writer: ShardWriter, path: Path, seeds: Sequence[int], bar: ProgressBar,
               check_time: bool = False) -> dict:
    """Generate one shard's samples into the writer; returns the record fields beyond the digest. With the
    screen, a seed skipped after screen.max_attempts is not written; the record lists it. With check_time, the
    second batch (the first pays the warm-up) times the shard for `long_shard_warning`."""
    metrics: dict[str, float] = {}
    skipped = []
    for i in range(0, len(seeds), spec.batch_size):
        start = time.perf_counter()
        plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in seeds[i : i + spec.batch_size]]
        for sample in made_samples(engine, spec, plans):
            meta = sample["json"]
            if "screen" in meta:
                metrics = add_metrics(metrics, screen_metrics(meta))
            if skipped_sample(meta):
                skipped.append(sample["seed"])
                metrics = add_metrics(metrics, retry_metrics(meta))
                continue
            metrics = add_metrics(metrics, sample_metrics(meta))
            sample.pop(GIVEN, None)
            writer.put(sample)
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


def config_problem(spec: RunSpec, digests: dict[str, str], metas: dict[int, dict]) -> str | None:
    """None when every sample's json holds what this run's config and the seed's plan give; else the first
    difference (a shard made with another config, or damaged inside a json)."""
    for seed, meta in metas.items():
        plan = plan_sample(seed, spec.dataset, spec.backgrounds, int(meta.get("attempt", 0) or 0))
        expected = json.loads(json.dumps(config_fields(spec, digests, plan), default=str))
        for key, value in expected.items():
            found = _planned_part(meta.get(key), value) if key == "defects" else meta.get(key)
            if found != value:
                return f"seed {seed}: its json's {key} is {str(found)[:80]}, this run's {str(value)[:80]}"
        problem = _chosen_problem(spec, plan, meta.get("defects"))
        if problem is not None:
            return f"seed {seed}: its json's defects is {problem}"
    return None


def _chosen_problem(spec: RunSpec, plan: SamplePlan, found: object) -> str | None:
    """With candidates the plan fixes the boxes once the choice is known: each defect's window and context box
    must be those of the candidate its `placement.chosen` names."""
    if spec.dataset.source != "images" or not isinstance(found, list):
        return None
    geometry = spec.backgrounds.geometry
    for defect, entry in zip(plan.defects, found):
        if not defect.candidates:
            continue
        chosen = (entry.get("placement") or {}).get("chosen") if isinstance(entry, dict) else None
        if not isinstance(chosen, int) or not 0 <= chosen < len(defect.candidates):
            return f"placement.chosen {chosen!r}, this run's 0..{len(defect.candidates) - 1}"
        expected = planned_defect(defect.placed(chosen, geometry).settled(), geometry)
        for key in ("window_box", "context_box"):
            if entry.get(key) != expected[key]:
                return f"{key} {entry.get(key)}, this run's {expected[key]} (candidate {chosen})"
    return None


def _planned_part(found: object, planned: list[dict]) -> object:
    """A json's per-defect entries cut to the fields their plan gives (as is when not such a list)."""
    if not isinstance(found, list) or len(found) != len(planned) or not all(isinstance(d, dict) for d in found):
        return found
    return [{key: entry.get(key) for key in plan} for entry, plan in zip(found, planned)]


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
        if "screen" in meta:  # the screen's counts, as make_shard sums them
            metrics = add_metrics(metrics, screen_metrics(meta))
        metrics = add_metrics(metrics, sample_metrics(meta))
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
