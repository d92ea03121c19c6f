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
from dmgr.synth.backgrounds import Backgrounds, Geometry
from dmgr.synth.config import DatasetSpec


@dataclass(frozen=True)
class Defect:
    class_id: int
    class_name: str
    window: tuple[int, int]  # top-left (x, y); in image pixels on real backgrounds
    context: tuple[int, int] | None = None  # real backgrounds: top-left (x, y) of the context crop, image pixels


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


def _draw_free(allowed: np.ndarray, taken: list[tuple[int, int]], window: int,
               g: torch.Generator) -> tuple[int, int] | None:
    """A top-left (x, y) drawn uniformly among `allowed` whose window overlaps none of `taken` (row-major
    order, as np.nonzero lists them; per-row counts instead of a list of every corner), or None."""
    free = allowed.copy()
    for x, y in taken:
        free[max(0, y - window + 1) : y + window, max(0, x - window + 1) : x + window] = False
    ends = np.cumsum(free.sum(1, dtype=np.int64))
    if ends[-1] == 0:
        return None
    r = int(torch.randint(int(ends[-1]), (1,), generator=g))
    row = int(np.searchsorted(ends, r, side="right"))
    column = np.flatnonzero(free[row])[r - (int(ends[row - 1]) if row else 0)]
    return int(column), row


def context_origin(window: tuple[int, int], size: tuple[int, int], geometry: Geometry) -> tuple[int, int]:
    """Top-left of the context crop around a window (image pixels): centred on the window, shifted inside
    the (width, height) image."""
    half = geometry.window // 2 - geometry.crop // 2
    return tuple(min(max(0, w + half), side - geometry.crop) for w, side in zip(window, size))


def model_window(defect: Defect, geometry: Geometry) -> tuple[int, int]:
    """The defect's window top-left in its context crop's model pixels (the crop resized to image_size)."""
    high = geometry.image_size - geometry.window_size
    return tuple(min(max(0, round((w - c) * geometry.scale)), high) for w, c in zip(defect.window, defect.context))


def plan_sample(seed: int, dataset: DatasetSpec, backgrounds: Backgrounds | None = None) -> SamplePlan:
    """Class(es), window(s) and background of one seed, from the seed's own plan generator.

    Generated boards: one defect, window uniform in [margin, size - window - margin) per axis. Real
    backgrounds: the image uniform among the usable ones, then each defect's class and a window drawn
    uniformly among the top-left corners (image pixels) inside the ROI and margins that overlap no earlier
    window (an image with no room left gets fewer defects; its json says so), and its context crop.
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
    geometry, size = backgrounds.geometry, backgrounds.items[background].size
    defects: list[Defect] = []
    for _ in range(dataset.defects_per_image):
        class_id = _class(dataset, g)
        if dataset.window_choice == "fixed":  # validation allows one defect per image here
            window = tuple(dataset.fixed_window)
        else:
            window = _draw_free(backgrounds.allowed_corners(background), [d.window for d in defects],
                                geometry.window, g)
            if window is None:
                break
        defects.append(Defect(class_id, dataset.classes[class_id], window, context_origin(window, size, geometry)))
        if dataset.window_choice == "fixed":
            break
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
