"""Which of a defect's candidate windows the local model finds most plausible for its class (real
backgrounds, dataset.placement.candidates > 1): the class-conditional denoising error of each clean window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dmgr.diffusion import Diffusion
from dmgr.images import from_uint8
from dmgr.sampler.dmgr import model_eps
from dmgr.sampler.noise import generator
from dmgr.synth.backgrounds import Geometry
from dmgr.synth.geometry import to_model
from dmgr.synth.plan import Defect, SamplePlan, model_window, stream_seed

# The placement score's noise levels lie evenly from LEVEL_LOW to LEVEL_LOW + LEVEL_WIDTH of the respaced grid
# (fractions of its length): low and middle noise, where the local model's error still sees the window's texture.
LEVEL_LOW = 0.1
LEVEL_WIDTH = 0.4
LEVEL_ONE = 0.3  # a single level: the span's middle
PLACEMENT_ROWS = 512  # windows x classes x levels per forward of the placement score (the default's 72: one)


@dataclass(frozen=True)
class Placement:
    """The choice among a defect's candidate windows: how many, which, and its score (lower: more plausible)."""

    candidates: int
    chosen: int
    score: float


def placement_levels(num_steps: int, count: int) -> list[int]:
    """`count` indices of the respaced grid, evenly over the span from LEVEL_LOW (one: LEVEL_ONE)."""
    if count == 1:
        return [max(0, round(LEVEL_ONE * (num_steps - 1)))]
    return [round((LEVEL_LOW + LEVEL_WIDTH * i / (count - 1)) * (num_steps - 1)) for i in range(count)]


@torch.no_grad()
def placement_scores(model: torch.nn.Module, diffusion: Diffusion, windows: torch.Tensor, class_id: int,
                     num_classes: int, levels: list[int], g: torch.Generator, precision: str = "fp32") -> torch.Tensor:
    """(K,) how much better class `class_id` explains each clean window (K, 3, w, w) than the classes on
    average: the local model's class-conditional denoising error (epsilon MSE on the colour channels) under
    the class minus its mean over all classes, averaged over the noise `levels`; lower is more plausible.
    The noise comes from `g` (per level, (K, C_in, w, w)); a mask channel is given pure noise (its clean value
    is unknown). One forward over levels x classes x windows."""
    k, w = windows.shape[0], windows.shape[-1]
    channels = getattr(model, "in_channels", 3)
    inputs, noises, steps = [], [], []
    for index in levels:
        eps = torch.randn((k, channels, w, w), generator=g).to(windows.device)
        abar = diffusion.abar(index)
        x_t = eps.clone()
        x_t[:, :3] = abar**0.5 * windows + (1 - abar) ** 0.5 * eps[:, :3]
        inputs.append(x_t.repeat(num_classes, 1, 1, 1))
        noises.append(eps[:, :3].repeat(num_classes, 1, 1, 1))
        steps.append(diffusion.model_timesteps(index, k * num_classes, windows.device))
    labels = torch.arange(num_classes, device=windows.device).repeat_interleave(k).repeat(len(levels))
    inputs, steps = torch.cat(inputs), torch.cat(steps)
    predicted = torch.cat([model_eps(model, inputs[i : i + PLACEMENT_ROWS], steps[i : i + PLACEMENT_ROWS],
                                     labels[i : i + PLACEMENT_ROWS], precision)[:, :3]
                           for i in range(0, len(labels), PLACEMENT_ROWS)])
    error = (predicted - torch.cat(noises)).pow(2).flatten(1).mean(1).view(len(levels), num_classes, k)
    return (error[:, class_id] - error.mean(1)).mean(0).cpu()


def clean_window(frame: np.ndarray, defect: Defect, geometry: Geometry) -> torch.Tensor:
    """(1, 3, w, w) the defect's window as the sampler sees it: its context crop resized to image_size."""
    side, w = geometry.crop, geometry.window_size
    cx, cy = defect.context
    crop = to_model(from_uint8(np.ascontiguousarray(frame[None, cy : cy + side, cx : cx + side])),
                    geometry.image_size)
    mx, my = model_window(defect, geometry)
    return crop[:, :, my : my + w, mx : mx + w]


def choose_placement(local_model: torch.nn.Module, diffusion: Diffusion, geometry: Geometry, num_classes: int,
                     noise_levels: int, precision: str, frame: np.ndarray, plan: SamplePlan, k: int,
                     defect: Defect, device: torch.device) -> tuple[Defect, Placement | None]:
    """(the defect at its most plausible candidate window, the choice), scored on `frame` in a batch of this
    defect's candidates only (so the choice never depends on batch-mates); ties go to the lower index. A
    defect without candidates is returned as planned, with None."""
    if len(defect.candidates) < 2:
        return defect, None
    placed = [defect.placed(j, geometry) for j in range(len(defect.candidates))]
    windows = torch.cat([clean_window(frame, d, geometry) for d in placed]).to(device)
    key = stream_seed(plan.seed, "placement", k, *((plan.attempt,) if plan.attempt else ()))
    levels = placement_levels(diffusion.num_steps, noise_levels)
    scores = placement_scores(local_model, diffusion, windows, defect.class_id, num_classes, levels,
                              generator(key), precision).tolist()
    chosen = min(range(len(scores)), key=lambda j: (scores[j], j))
    return placed[chosen], Placement(len(scores), chosen, scores[chosen])
