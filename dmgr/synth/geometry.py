"""Between a context crop in image pixels and the models' pixels: resizing images and masks, and where a
defect's model window lies in the image."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dmgr.synth.backgrounds import Geometry
from dmgr.synth.plan import Defect, model_window


def to_model(crops: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, c, c) context crops -> (B, 3, size, size): bilinear with antialiasing (an area-like filter when
    shrinking); unchanged when c == size."""
    if crops.shape[-1] == size:
        return crops
    return F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_image(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """Model-pixel results (B, 3, S, S) back to a context crop of `side` image pixels (bilinear, antialiased);
    unchanged when S == side."""
    if pixels.shape[-1] == side:
        return pixels
    return F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def mask_to_image(masks: torch.Tensor, side: int) -> np.ndarray:
    """(B, S, S) bool model-pixel masks -> (B, side, side) bool numpy, nearest neighbour."""
    if masks.shape[-1] != side:
        masks = F.interpolate(masks[:, None].float(), size=(side, side), mode="nearest")[:, 0] > 0.5
    return masks.cpu().numpy()


def square(x: int, y: int, side: int) -> list[int]:
    """[x0, y0, x1, y1] of the square of `side` at top-left (x, y)."""
    return [x, y, x + side, y + side]


def image_window_box(defect: Defect, geometry: Geometry) -> list[int]:
    """The image pixels [x0, y0, x1, y1] that the defect's model window covers once resized back (the
    nearest-neighbour masks fall inside it)."""
    ratio = geometry.crop / geometry.image_size
    (mx, my), (cx, cy) = model_window(defect, geometry), defect.context
    w = geometry.window_size
    return [cx + math.ceil(mx * ratio), cy + math.ceil(my * ratio),
            cx + math.ceil((mx + w) * ratio), cy + math.ceil((my + w) * ratio)]


def context_box(defect: Defect, geometry: Geometry) -> list[int]:
    """The image pixels [x0, y0, x1, y1] of the defect's context crop."""
    return square(*defect.context, geometry.crop)
