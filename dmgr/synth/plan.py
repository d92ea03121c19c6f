"""Seed -> sample plan, and seeds -> shards -> workers. Pure functions of their arguments; no models.

A sample is a function of (config, seed, the input list): its background, classes and windows come from
the seed's plan stream, its noise from the seed's own stream (attempt a > 0 and defect k > 0 from their own
streams). Every stream is a generator built by dmgr.sampler.noise.generator from a key: the seed, or
stream_seed(seed, name, index...); distinct keys give independent streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from dmgr.sampler.noise import generator, stream_seed
from dmgr.synth.backgrounds import Backgrounds, Geometry
from dmgr.synth.config import DatasetSettings, class_weights


@dataclass(frozen=True)
class Defect:
    class_id: int
    class_name: str
    window: tuple[int, int]  # top-left (x, y); in image pixels on real backgrounds
    context: tuple[int, int] | None = None  # real backgrounds: top-left (x, y) of the context crop, image pixels
    candidates: tuple[tuple[int, int], ...] = ()  # real backgrounds, placement.candidates > 1: the windows the
    #   engine chooses among (window is the first until it chooses)
    image_size: tuple[int, int] = (0, 0)  # with candidates: (width, height) of the image, for their contexts

    def placed(self, index: int, geometry: Geometry) -> Defect:
        """This defect at its candidate `index` (the window and its context crop)."""
        window = self.candidates[index]
        return replace(self, window=window, context=context_origin(window, self.image_size, geometry))

    def settled(self) -> Defect:
        """This defect at the window it holds now, its candidates forgotten (what a one-window plan records)."""
        return replace(self, candidates=())


@dataclass(frozen=True)
class SamplePlan:
    seed: int
    defects: tuple[Defect, ...]  # one or more, windows never overlapping
    background: int | None = None  # index into the usable backgrounds (dataset.source=images)
    attempt: int = 0  # > 0: the sample is retried: noise from a derived seed, windows from a new placement
    #   (same background and classes on real backgrounds)

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
    """The noise key of attempt > 0 (a NaN, an empty mask or a screen rejection): its own stream."""
    return stream_seed(seed, "attempt", attempt)


def plan_generator(seed: int) -> torch.Generator:
    """The generator of a seed's plan draws (background, classes, windows)."""
    return generator(stream_seed(seed, "plan"))


def replacement_generator(seed: int, attempt: int) -> torch.Generator:
    """The generator of attempt a > 0's windows (re-placement: same background and classes)."""
    return generator(stream_seed(seed, "replace", attempt))


def _class(dataset: DatasetSettings, g: torch.Generator, allowed: Sequence[bool] | None = None) -> int:
    """A class drawn by dataset.class_choice among the `allowed` ones (all when None; all allowed draws as the
    unrestricted choice does, so a run without per-class ROIs draws the same classes)."""
    allowed = [True] * len(dataset.classes) if allowed is None else allowed
    if dataset.class_choice == "fixed":
        return dataset.classes.index(dataset.fixed_class)
    if dataset.class_choice == "weighted":
        weights = torch.tensor([w * a for w, a in zip(dataset.class_weights, allowed)], dtype=torch.float64)
        return int(torch.multinomial(weights, 1, generator=g))
    ids = [i for i, a in enumerate(allowed) if a]
    return ids[int(torch.randint(len(ids), (1,), generator=g))]


def allowed_classes(dataset: DatasetSettings, backgrounds: Backgrounds, index: int) -> list[bool]:
    """Per class: it has a chance (weight > 0) and a window of it fits on background `index`."""
    return [w > 0 and backgrounds.has_room(index, c) for c, w in zip(dataset.classes, class_weights(dataset))]


def eligible_backgrounds(dataset: DatasetSettings, backgrounds: Backgrounds) -> list[int]:
    """The backgrounds on which at least one drawable class fits (every one without per-class ROIs)."""
    return [i for i in range(len(backgrounds)) if any(allowed_classes(dataset, backgrounds, i))]


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


def plan_sample(seed: int, dataset: DatasetSettings, backgrounds: Backgrounds | None = None,
                attempt: int = 0) -> SamplePlan:
    """Class(es), window(s) and background of one seed, from the seed's own plan generator.

    Generated boards: one defect, window uniform in [margin, size - window - margin) per axis. Real
    backgrounds: the image uniform among those where a drawable class fits, then each defect's class among
    the classes that fit there, and `dataset.placement.candidates` windows drawn uniformly among the top-left
    corners (image pixels) inside the class's ROI and the margins that overlap no earlier defect's candidate
    (an image with no room left gets fewer defects; its json says so), and its context crop. The engine
    chooses among the candidates. Attempt a > 0 keeps the background and classes and draws the windows
    again from `replacement_generator(seed, a)`.
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
        return SamplePlan(seed, (Defect(class_id, dataset.classes[class_id], window),), attempt=attempt)
    eligible = eligible_backgrounds(dataset, backgrounds)
    background = eligible[int(torch.randint(len(eligible), (1,), generator=g))]
    planned = _place(dataset, backgrounds, background, g, None)
    if attempt == 0:
        return SamplePlan(seed, planned, background)
    again = _place(dataset, backgrounds, background, replacement_generator(seed, attempt),
                   [d.class_id for d in planned])
    return SamplePlan(seed, again, background, attempt)


def _place(dataset: DatasetSettings, backgrounds: Backgrounds, background: int, g: torch.Generator,
           classes: list[int] | None) -> tuple[Defect, ...]:
    """The defects on one background: classes drawn from g (or given), candidate windows drawn from g."""
    geometry, size = backgrounds.geometry, backgrounds.items[background].size
    allowed = allowed_classes(dataset, backgrounds, background)
    count = dataset.defects_per_image if classes is None else len(classes)
    defects: list[Defect] = []
    for k in range(count):
        class_id = _class(dataset, g, allowed) if classes is None else classes[k]
        name = dataset.classes[class_id]
        if dataset.window_choice == "fixed":  # validation allows one defect per image here
            window = tuple(dataset.fixed_window)
            return (Defect(class_id, name, window, context_origin(window, size, geometry)),)
        corners = backgrounds.allowed_corners(background, name)
        taken = [w for d in defects for w in (d.candidates or (d.window,))]
        candidates = []
        for _ in range(dataset.placement.candidates):
            window = _draw_free(corners, taken, geometry.window, g)
            if window is None:
                break
            candidates.append(window)
        if not candidates:
            break
        kept = tuple(candidates) if dataset.placement.candidates > 1 else ()
        defects.append(Defect(class_id, name, candidates[0], context_origin(candidates[0], size, geometry),
                              kept, size if kept else (0, 0)))
    return tuple(defects)


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
