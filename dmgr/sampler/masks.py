"""Defect masks for a finished sample (the reference writes none).

* `local`: the defect mask the local model generated with the defect (its fourth channel, optionally
  smoothed, > 0), placed at the window: the pixels that are the defect, from a model trained on patches
  with exact masks.
* `diff`: where the final image departs from its defect-free twin (plain global DDIM from the same
  x_T; on real backgrounds, the background itself), inside the window, Gaussian-smoothed and
  thresholded by Otsu's method with a contrast floor.
* `gate`: the support of the rectification gate G_x at the last falloff, inside the window:
  the disc in which rectification acted at full strength, G_x >= 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmgr.sampler.gates import global_gate

MASK_METHODS = ("local", "diff", "gate")


def window_support(height: int, width: int, windows: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) bool: True inside each sample's window."""
    ys = torch.arange(height, device=windows.device).view(1, 1, -1, 1)
    xs = torch.arange(width, device=windows.device).view(1, 1, 1, -1)
    wx = windows[:, 0].view(-1, 1, 1, 1)
    wy = windows[:, 1].view(-1, 1, 1, 1)
    return (xs >= wx) & (xs < wx + size) & (ys >= wy) & (ys < wy + size)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return image
    radius = max(1, int(round(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """The threshold that maximises the between-class variance of a 1-D set of values."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return hi
    hist = torch.histc(values.float(), bins=bins, min=lo, max=hi).double()
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[:-1] + (hi - lo) / bins / 2
    weight_low = torch.cumsum(hist, 0)
    weight_high = hist.sum() - weight_low
    mean_low = torch.cumsum(hist * centers, 0) / weight_low.clamp(min=1e-12)
    mean_high = ((hist * centers).sum() - torch.cumsum(hist * centers, 0)) / weight_high.clamp(min=1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centers[int(torch.argmax(between))] + (hi - lo) / bins / 2)


def diff_mask(
    image: torch.Tensor,
    twin: torch.Tensor,
    windows: torch.Tensor,
    window_size: int,
    sigma: float = 1.0,
    min_contrast: float = 0.1,
) -> torch.Tensor:
    """(B, 1, H, W) bool mask of where `image` differs from its defect-free `twin` inside the window.

    Differences are the channel mean of |image - twin| on the [-1, 1] scale; `min_contrast` is the
    smallest smoothed difference that can count as defect, whatever Otsu says.
    """
    difference = gaussian_blur((image - twin).abs().mean(dim=1, keepdim=True), sigma)
    inside = window_support(image.shape[2], image.shape[3], windows, window_size)
    masks = []
    for d, keep in zip(difference, inside):
        values = d[keep]
        threshold = max(otsu_threshold(values), min_contrast)
        masks.append((d > threshold) & keep)
    return torch.stack(masks)


def gate_mask(
    height: int, width: int, windows: torch.Tensor, window_size: int, radius: float, falloff: float
) -> torch.Tensor:
    """(B, 1, H, W) bool: G_x >= 0.5 at the last falloff, inside the window."""
    centers = windows + window_size // 2
    gate = global_gate(height, width, centers, radius, falloff)
    return (gate >= 0.5) & window_support(height, width, windows, window_size)


def local_mask(crop: torch.Tensor, windows: torch.Tensor, height: int, width: int, sigma: float = 0.0) -> torch.Tensor:
    """(B, 1, H, W) bool: the crop's mask channel (index 3) > 0, placed at each sample's window; with `sigma`
    > 0 each pixel then takes the Gaussian-weighted majority of its neighbourhood (the +-1 mask smoothed, > 0),
    which drops the isolated pixels a weak model scatters over the window and keeps compact regions. The
    vote is on the thresholded mask because such a model's channel hovers near 0 where there is no defect."""
    size = crop.shape[-1]
    inside = crop[:, 3:4] > 0
    if sigma > 0:
        inside = gaussian_blur(inside.float() * 2 - 1, sigma) > 0
    masks = torch.zeros(crop.shape[0], 1, height, width, dtype=torch.bool, device=crop.device)
    for i, (x, y) in enumerate(windows.tolist()):
        masks[i, 0, y : y + size, x : x + size] = inside[i, 0]
    return masks
