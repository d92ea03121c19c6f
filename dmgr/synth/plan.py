"""Seed -> sample plan, and seeds -> shards -> workers. Pure functions of their arguments; no models.

A sample is a function of (config, seed, the input list): its background, classes and windows come from
the seed's plan stream, its noise from the seed's own stream (attempt a > 0 and defect k > 0 from their own
streams). Every stream is a generator built by dmgr.sampler.noise.generator from a key: the seed, or
stream_seed(seed, name, index...); distinct keys give independent streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dmgr.sampler.noise import generator, stream_seed
from dmgr.synth.backgrounds import Backgrounds
from dmgr.synth.config import DatasetSpec


@dataclass(frozen=True)
class Defect:
    class_id: int
    class_name: str
    window: tuple[int, int]  # top-left (x, y)


@dataclass(frozen=True)
class SamplePlan:
    seed: int
    defects: tuple[Defect, ...]  # one or more, windows never overlapping
    background: int | None = None  # index into the usable backgrounds (dataset.source=images)
    attempt: int = 0  # > 0: the sample is retried with noise from a derived seed (same plan)

    @property
    def noise_seed(self) -> int:
        """The key of the sample's noise stream (dmgr.sampler.make_generators): the seed at attempt 0."""
        return self.seed if self.attempt == 0 else retry_seed(self.seed, self.attempt)

    @property
    def class_id(self) -> int:
        return self.defects[0].class_id

    @property
    def class_name(self) -> str:
        return self.defects[0].class_name

    @property
    def window(self) -> tuple[int, int]:
        return self.defects[0].window


def retry_seed(seed: int, attempt: int) -> int:
    """The noise key of attempt > 0 (a NaN retry or a gate rejection): its own stream, same plan."""
    return stream_seed(seed, "attempt", attempt)


def plan_generator(seed: int) -> torch.Generator:
    """The generator of a seed's plan draws (background, classes, windows)."""
    return generator(stream_seed(seed, "plan"))


def _class(dataset: DatasetSpec, g: torch.Generator) -> int:
    if dataset.class_choice == "fixed":
        return dataset.classes.index(dataset.fixed_class)
    if dataset.class_choice == "weighted":
        weights = torch.tensor(dataset.class_weights, dtype=torch.float64)
        return int(torch.multinomial(weights, 1, generator=g))
    return int(torch.randint(len(dataset.classes), (1,), generator=g))


def _free_corners(allowed: np.ndarray, taken: list[tuple[int, int]], window: int) -> np.ndarray:
    """(N, 2) top-left (x, y) among `allowed` whose window overlaps none of `taken`."""
    free = allowed.copy()
    for x, y in taken:
        free[max(0, y - window + 1) : y + window, max(0, x - window + 1) : x + window] = False
    ys, xs = np.nonzero(free)
    return np.stack([xs, ys], 1)


def plan_sample(seed: int, dataset: DatasetSpec, backgrounds: Backgrounds | None = None) -> SamplePlan:
    """Class(es), window(s) and background of one seed, from the seed's own plan generator.

    Generated boards: one defect, window uniform in [margin, size - window - margin) per axis. Real
    backgrounds: the image uniform among the usable ones, then each defect's class and a window drawn
    uniformly among the top-left corners inside the ROI and margins that overlap no earlier window (an
    image with no room left gets fewer defects; its json says so).
    """
    g = plan_generator(seed)
    if backgrounds is None:
        class_id = _class(dataset, g)
        if dataset.window_choice == "fixed":
            window = dataset.fixed_window
        else:
            low, high = dataset.margin, dataset.image_size - dataset.window_size - dataset.margin
            x, y = torch.randint(low, high, (2,), generator=g).tolist()
            window = (int(x), int(y))
        return SamplePlan(seed, (Defect(class_id, dataset.classes[class_id], window),))
    background = int(torch.randint(len(backgrounds), (1,), generator=g))
    allowed = backgrounds.allowed_corners(background)
    defects: list[Defect] = []
    for _ in range(dataset.defects_per_image):
        class_id = _class(dataset, g)
        if dataset.window_choice == "fixed":  # validation allows one defect per image here
            defects.append(Defect(class_id, dataset.classes[class_id], dataset.fixed_window))
            break
        corners = _free_corners(allowed, [d.window for d in defects], dataset.window_size)
        if len(corners) == 0:
            break
        x, y = corners[int(torch.randint(len(corners), (1,), generator=g))].tolist()
        defects.append(Defect(class_id, dataset.classes[class_id], (int(x), int(y))))
    return SamplePlan(seed, tuple(defects), background)


def num_shards(num_seeds: int, samples_per_shard: int) -> int:
    return -(-num_seeds // samples_per_shard)


def shard_seeds(seeds: Sequence[int], samples_per_shard: int, k: int) -> Sequence[int]:
    """Shard k holds seeds[k * n : (k + 1) * n] (a range stays a range: no list of every seed is built)."""
    return seeds[k * samples_per_shard : (k + 1) * samples_per_shard]


def worker_shards(num_shards: int, worker: int, num_workers: int) -> range:
    """The shards of one worker: those with k % num_workers == worker."""
    return range(worker, num_shards, num_workers)


def worker_index(rank: int, world_size: int, task_id: int, task_count: int) -> tuple[int, int]:
    """Combine a Slurm array task and a torchrun rank into one worker index among all workers."""
    return task_id * world_size + rank, task_count * world_size
