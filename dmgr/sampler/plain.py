"""Plain DDIM with one model: defect-free twins, baselines and tests."""

from __future__ import annotations

import torch
from torch import nn

from dmgr.diffusion import Diffusion, ddim_step, predict_x0, time_walk
from dmgr.progress import progress_bar
from dmgr.sampler.dmgr import class_eps
from dmgr.sampler.noise import NoiseSource


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    diffusion: Diffusion,
    x_T: torch.Tensor,
    y: torch.Tensor | None = None,
    eta: float = 0.0,
    noise: NoiseSource | None = None,
    precision: str = "fp32",
    progress: bool = False,
    guidance: float = 0.0,
) -> torch.Tensor:
    """DDIM from x_T at the last index down to index 0 (no time travel). guidance > 0: classifier-free
    guidance with that scale (`guided_eps`; a class-conditional model with a null class)."""
    if eta > 0 and noise is None:
        raise ValueError("ddim_sample with eta > 0 needs a noise source")
    x = x_T
    indices = time_walk(diffusion.num_steps)
    for t, target in progress_bar(list(zip(indices[:-1], indices[1:])), desc="ddim", disable=not progress, leave=False):
        steps = diffusion.model_timesteps(t, x.shape[0], x.device)
        eps = class_eps(model, x, steps, y, guidance, precision)
        x0 = predict_x0(x, eps, diffusion.abar(t))
        x = ddim_step(
            x0, eps, diffusion.abar(t), diffusion.abar(target), eta, noise.draw(x, "ddim") if eta > 0 else None
        )
    return x
