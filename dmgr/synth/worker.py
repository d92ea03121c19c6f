"""One worker's share of the job: find its unfinished shards, sample them, stream them to the writer."""

from __future__ import annotations

import json
import logging
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dmgr.shards import ShardWriter, shard_path, verify_shard
from dmgr.synth.config import RunSpec
from dmgr.synth.engine import Engine, generate
from dmgr.synth.plan import plan_sample, shard_blocks, worker_shards

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    worker: int
    shards_done: int
    shards_skipped: int
    images: int
    seconds: float


def expected_members(spec: RunSpec) -> tuple[str, ...]:
    extra = [f"{name}.png" for name in ("crop", "twin", "grid", "input") if spec.extras.get(name, False)]
    if spec.extras.get("masks", False):
        extra += [f"mask_{method}.png" for method in spec.available_masks]
    if spec.extras.get("paste", False):
        extra += ["paste.png", "paste_mask.png"]
    return ("png", "mask.png", "json", *extra)


def pending_shards(spec: RunSpec, shards: list[int], blocks: list[list[int]]) -> tuple[list[int], int]:
    """Shards among `shards` still to do; removes temp leftovers and shards that fail the check."""
    todo, skipped = [], 0
    for k in shards:
        path = shard_path(spec.out_dir, spec.shard_prefix, k)
        for leftover in path.parent.glob(path.name + ".tmp-*"):
            log.info("removing unfinished %s", leftover.name)
            leftover.unlink(missing_ok=True)
        if path.exists():
            problem = verify_shard(path, blocks[k], expected_members(spec))
            if problem is None:
                skipped += 1
                continue
            log.warning("shard %s is damaged (%s): redoing it", path.name, problem)
            path.unlink()
        todo.append(k)
    return todo, skipped


def run_worker(spec: RunSpec, engine: Engine, worker: int, num_workers: int, position: int = 0) -> WorkerStats:
    blocks = shard_blocks(spec.seeds, spec.samples_per_shard)
    mine = worker_shards(len(blocks), worker, num_workers)
    todo, skipped = pending_shards(spec, mine, blocks)
    total = sum(len(blocks[k]) for k in todo)
    log.info(
        "worker %d/%d: %d shards assigned, %d complete, %d to do (%d images) on %s",
        worker,
        num_workers,
        len(mine),
        skipped,
        len(todo),
        total,
        engine.device,
    )
    writer = ShardWriter(spec.writer_queue)
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"worker {worker}", unit="img", position=position, disable=not spec.progress)
    for k in todo:
        writer.open(shard_path(spec.out_dir, spec.shard_prefix, k))
        seeds = blocks[k]
        for i in range(0, len(seeds), spec.batch_size):
            plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in seeds[i : i + spec.batch_size]]
            for sample in generate(engine, spec, plans):
                writer.put(sample)
            bar.update(len(plans))
        writer.close()
    writer.finish()
    bar.close()
    seconds = time.perf_counter() - start
    if total:
        log.info("worker %d: %d images in %.1f s (%.3f images/s)", worker, total, seconds, total / seconds)
    return WorkerStats(worker, len(todo), skipped, total, seconds)


def all_shards(spec: RunSpec) -> list[tuple[int, Path, list[int]]]:
    blocks = shard_blocks(spec.seeds, spec.samples_per_shard)
    return [(k, shard_path(spec.out_dir, spec.shard_prefix, k), seeds) for k, seeds in enumerate(blocks)]


def run_metrics(out_dir: Path, shards: list[Path]) -> dict:
    """Means over the run's sample metadata: the final rectification loss and the mask area."""
    losses, areas, fractions, short = [], [], [], 0
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    losses.append(meta["final_loss"])
                    areas.append(meta["mask_area"])
                    boxes = [d["window_box"] for d in meta.get("defects", [meta])]
                    fractions.append(meta["mask_area"] / sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes))
                    short += len(boxes) < meta.get("defects_requested", 1)
    count = max(len(losses), 1)
    return {
        "final_loss": sum(losses) / count,
        "mask_area": sum(areas) / count,
        "mask_window_fraction": sum(fractions) / count,
        "empty_masks": sum(a == 0 for a in areas),
        "fewer_defects_than_requested": short,  # source=images: no room left in the ROI
    }
