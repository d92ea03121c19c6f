"""Uncertainty-Adaptive Spatial Gating: radial masks around the window centre.

Computed in float32 like the reference so that the falloff near f = 0 is the same number.
"""

from __future__ import annotations

import torch

# G_c's numbers in docs/algorithm.md "The spatial gates": R = max(int(CROP_MIN_RADIUS w),
# int(CROP_RADIUS_PER_FALLOFF w f)) and alpha = sigmoid(ALPHA_SLOPE (f - ALPHA_ONSET)).
CROP_MIN_RADIUS = 0.45
CROP_RADIUS_PER_FALLOFF = 0.5
ALPHA_SLOPE = 20
ALPHA_ONSET = 0.03


def _distance(height: int, width: int, centers: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) distances from each sample's (x, y) centre."""
    device = centers.device
    ys = torch.linspace(0, height - 1, height, device=device)
    xs = torch.linspace(0, width - 1, width, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    cx = centers[:, 0].float().view(-1, 1, 1, 1)
    cy = centers[:, 1].float().view(-1, 1, 1, 1)
    return torch.sqrt((gx - cx) ** 2 + (gy - cy) ** 2)


def _log32(value: float, device: torch.device) -> torch.Tensor:
    return torch.log(torch.tensor(value, dtype=torch.float32, device=device))


def global_gate(height: int, width: int, centers: torch.Tensor, radius: float, falloff: float) -> torch.Tensor:
    """G_x: 1 within `radius`, Gaussian decay outside with s = r / sqrt(2 ln(1 + f)).

    f -> 0 spreads the update over the whole image; f -> 1 concentrates it near the defect.
    """
    distance = _distance(height, width, centers)
    if falloff <= 0.0:
        return torch.ones_like(distance)
    std = radius / torch.sqrt(2 * _log32(1 + falloff, centers.device))
    gaussian = torch.exp(-((distance - radius) ** 2) / (2 * std**2))
    return torch.where(distance <= radius, torch.ones_like(distance), gaussian)


def crop_gate(size: int, falloff: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """G_c (1, 1, size, size): 1 - alpha * shape, protecting the crop centre as f grows."""
    center = torch.tensor([[size // 2, size // 2]], device=device)
    distance = _distance(size, size, center)
    if falloff <= 0.0:
        return torch.ones_like(distance)
    radius = max(int(size * CROP_MIN_RADIUS), int(size * CROP_RADIUS_PER_FALLOFF * falloff))
    onset = torch.tensor(ALPHA_ONSET, device=device)
    alpha = torch.sigmoid(ALPHA_SLOPE * (torch.tensor(falloff, device=device) - onset))
    std = radius / torch.sqrt(2 * _log32(2 - falloff, torch.device(device)))
    gaussian = torch.exp(-((distance - radius) ** 2) / (2 * std**2))
    shape = torch.where(distance <= radius, torch.ones_like(distance), gaussian)
    return 1 - shape * alpha
