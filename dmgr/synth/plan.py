"""Seed -> sample plan, and seeds -> shards -> workers. Pure functions of their arguments; no models.

A sample is a function of (config, seed, the input list): its background, classes and windows come from
a CPU generator seeded by the seed (offset so that this stream differs from the noise stream), its noise
from another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dmgr.synth.backgrounds import Backgrounds, Geometry
from dmgr.synth.config import DatasetSpec

PLAN_STREAM = 1 << 40  # the plan generator's seed is seed + PLAN_STREAM (in effect the noise seed: see below)
RETRY_STREAM = 4 << 40  # attempt a > 0 (a NaN retry or a gate rejection): see retry_seed
# torch's CPU generator keeps only the low 32 bits of its seed, so offsets of 1 << 40 and up select the same
# stream as the seed itself: retry_seed and stream_seed mix their inputs into the low 32 bits. (The plan
# generator keeps its historical seed: changing it would change every sample of every existing run.)


def _with_hashed_low_bits(seed: int, key: str) -> int:
    """`seed` with its low 32 bits (all torch's CPU generator keeps) replaced by a hash of `key`."""
    return seed - (seed & 0xFFFFFFFF) + int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def stream_seed(seed: int, stream: str, index: int = 0) -> int:
    """The seed of a named side stream of `seed` (defect k > 0 of an image, the paste baseline): the low 32
    bits hash (seed, stream, index), so its draws differ from the seed's own."""
    return _with_hashed_low_bits(seed, f"{seed}:{stream}:{index}")


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
    """The noise seed of attempt > 0: low 32 bits from a hash of (seed, attempt), so the stream differs
    from attempt 0's (a collision with another seed's stream has odds ~ seeds / 2^32)."""
    return _with_hashed_low_bits(seed, f"{seed}:{attempt}") + attempt * RETRY_STREAM


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
    g = torch.Generator().manual_seed(seed + PLAN_STREAM)
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
