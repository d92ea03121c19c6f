"""Seed -> sample plan, and seeds -> shards -> workers. Pure functions; no models, no files.

A sample is a function of (config, seed): its class and window come from a CPU generator seeded by
the seed (offset so that this stream differs from the noise stream), its noise from another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmgr.synth.config import DatasetSpec

PLAN_STREAM = 1 << 40  # the plan generator's seed is seed + PLAN_STREAM; the noise generator's is seed
PASTE_STREAM = 2 << 40  # the paste baseline's local-model noise (extras.paste)


@dataclass(frozen=True)
class SamplePlan:
    seed: int
    class_id: int
    class_name: str
    window: tuple[int, int]  # top-left (x, y)


def plan_sample(seed: int, dataset: DatasetSpec) -> SamplePlan:
    g = torch.Generator().manual_seed(seed + PLAN_STREAM)
    if dataset.class_choice == "fixed":
        class_id = dataset.classes.index(dataset.fixed_class)
    elif dataset.class_choice == "weighted":
        weights = torch.tensor(dataset.class_weights, dtype=torch.float64)
        class_id = int(torch.multinomial(weights, 1, generator=g))
    else:
        class_id = int(torch.randint(len(dataset.classes), (1,), generator=g))
    if dataset.window_choice == "fixed":
        window = dataset.fixed_window
    else:
        low, high = dataset.margin, dataset.image_size - dataset.window_size - dataset.margin
        x, y = torch.randint(low, high, (2,), generator=g).tolist()
        window = (int(x), int(y))
    return SamplePlan(seed, class_id, dataset.classes[class_id], window)


def shard_blocks(seeds: list[int], samples_per_shard: int) -> list[list[int]]:
    """Shard k holds seeds[k * n : (k + 1) * n]."""
    return [seeds[i : i + samples_per_shard] for i in range(0, len(seeds), samples_per_shard)]


def worker_shards(num_shards: int, worker: int, num_workers: int) -> list[int]:
    """The shards of one worker: those with k % num_workers == worker."""
    return [k for k in range(num_shards) if k % num_workers == worker]


def worker_index(rank: int, world_size: int, task_id: int, task_count: int) -> tuple[int, int]:
    """Combine a Slurm array task and a torchrun rank into one worker index among all workers."""
    return task_id * world_size + rank, task_count * world_size
