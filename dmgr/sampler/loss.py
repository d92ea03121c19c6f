"""The Dynamic Multi-Scale Loss between the global window prediction and the local prediction.

Every function returns one value per sample (shape (B,), float64) so that samples in a batch stay
independent: the sampler differentiates the sum and backtracks per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The reference's numbers in docs/algorithm.md step 5: w_low = max(1 - a, LOW_PASS_FLOOR) and
# D = LAPLACIAN_GAIN (1 - a) L_lap + a L_pix; the weight map m = clamp(d / (DISAGREEMENT_SCALE max d), 0, 1).
LOW_PASS_FLOOR = 0.1
LAPLACIAN_GAIN = 100.0
DISAGREEMENT_SCALE = 0.2
DIVISION_GUARD = 1e-8  # keeps an all-agreeing window (max d = 0) at m = 0


def laplacian_pyramid(image: torch.Tensor, levels: int = 4) -> list[torch.Tensor]:
    """`levels` band-pass images (finest first) followed by the low-pass residual."""
    pyramid, current = [], image
    for _ in range(levels):
        down = F.avg_pool2d(current, kernel_size=2, stride=2)
        up = F.interpolate(down, size=current.shape[2:], mode="bilinear", align_corners=False)
        pyramid.append(current - up)
        current = down
    pyramid.append(current)
    return pyramid


def pyramid_weights(sqrt_abar: float, levels: int = 4) -> list[float]:
    """Band-pass weights then the low-pass weight: noisy steps favour the low-pass (topology)."""
    low = max(1.0 - sqrt_abar, LOW_PASS_FLOOR)
    return [(1.0 - low) / levels] * levels + [low]


def _sum_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).sum(dim=1).double()


def pixel_loss(u: torch.Tensor, v: torch.Tensor, weight_map: torch.Tensor | None = None) -> torch.Tensor:
    if weight_map is not None:
        u, v = u * weight_map, v * weight_map
    return _sum_squares(u, v)


def multiscale_loss(
    u: torch.Tensor,
    v: torch.Tensor,
    sqrt_abar: float,
    weight_map: torch.Tensor | None = None,
    levels: int = 4,
) -> torch.Tensor:
    """LAPLACIAN_GAIN (1 - a) L_lap + a L_pix with a = sqrt(abar_t); L_lap sums squared pyramid differences
    / levels."""
    if weight_map is not None:
        u, v = u * weight_map, v * weight_map
    lap = (
        sum(
            w * _sum_squares(pu, pv)
            for pu, pv, w in zip(
                laplacian_pyramid(u, levels), laplacian_pyramid(v, levels), pyramid_weights(sqrt_abar, levels)
            )
        )
        / levels
    )
    return LAPLACIAN_GAIN * (1.0 - sqrt_abar) * lap + sqrt_abar * _sum_squares(u, v)


def rectification_loss(
    window_x0: torch.Tensor,
    local_x0: torch.Tensor,
    sqrt_abar: float,
    multiscale: bool,
    weight_map: torch.Tensor | None = None,
    levels: int = 4,
) -> torch.Tensor:
    if multiscale:
        return multiscale_loss(window_x0, local_x0, sqrt_abar, weight_map, levels)
    return pixel_loss(window_x0, local_x0, weight_map)


def disagreement_map(window_x0: torch.Tensor, local_x0: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Where the two manifolds disagree: clamp(d / (DISAGREEMENT_SCALE max d), 0, 1), accumulated by maximum."""
    d = ((window_x0 - local_x0) ** 2).mean(dim=1, keepdim=True)
    upper = d.amax(dim=(2, 3), keepdim=True) * DISAGREEMENT_SCALE
    new = (d / (upper + DIVISION_GUARD)).clamp(0, 1)
    if previous is None:
        return new
    return (previous + (new - previous).clamp(0, 1)).clamp(0, 1)
