"""One-step maths of DDIM sampling as plain functions of tensors.

`abar_*` are float64 Python numbers; coefficients are cast to float32 before they meet an image,
the way guided-diffusion extracts them.
"""

from __future__ import annotations

import math

import torch


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float, clip: bool = True) -> torch.Tensor:
    """x0_hat = sqrt(1/abar) x - sqrt(1/abar - 1) eps, clipped to [-1, 1]."""
    x0 = _f32(math.sqrt(1 / abar_t), x_t) * x_t - _f32(math.sqrt(1 / abar_t - 1), x_t) * eps
    return x0.clamp(-1, 1) if clip else x0


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    abar_t: float,
    abar_prev: float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM update from index t to an earlier index; `noise` is needed only when eta > 0."""
    a_t, a_prev = _f32(abar_t, x0), _f32(abar_prev, x0)
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
    mean = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * eps
    if eta == 0:
        return mean
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    return mean + sigma * noise


def undo_step(x: torch.Tensor, beta_next: float, noise: torch.Tensor) -> torch.Tensor:
    """Forward one index (time travel): x <- sqrt(1 - beta) x + sqrt(beta) z."""
    beta = _f32(beta_next, x)
    return torch.sqrt(1 - beta) * x + torch.sqrt(beta) * noise
