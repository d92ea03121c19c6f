"""Image helpers shared by the job, training, data tools and evaluation: files, uint8 tensors, boxes, colours.

torch is imported only by the tensor conversions, so the procedural data tools run without it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(".mask.png")


def list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under `root` (sorted; defect masks `*.mask.png` left out)."""
    root = Path(root)
    files = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not is_mask_file(p))


def load_rgb(path: str | Path) -> Image.Image:
    """The decoded RGB image (raises OSError/ValueError and friends on a corrupt file)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, nearest: bool = False) -> Image.Image:
    """Scale the shorter side to `size` (Lanczos; nearest neighbour for masks), then cut the centre square."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    f = size / min(w, h)
    nw, nh = max(size, round(w * f)), max(size, round(h * f))
    img = img.resize((nw, nh), Image.NEAREST if nearest else Image.LANCZOS)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    return img.crop((x0, y0, x0 + size, y0 + size))


def save_mask(mask: np.ndarray, path: str | Path) -> None:
    """A bool mask as an L png with 0/255."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, guided-diffusion's conversion."""
    import torch

    return ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the inverse of `to_uint8`."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def bounding_box(mask: np.ndarray | torch.Tensor) -> list[int] | None:
    """[x0, y0, x1, y1] (exclusive end) of an (H, W) or (1, H, W) bool mask, None when empty."""
    if hasattr(mask, "detach"):  # a torch tensor, on any device
        mask = mask.detach().cpu().numpy()
    ys, xs = np.nonzero(mask.reshape(mask.shape[-2:]))
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def viridis(fraction: float) -> tuple[int, int, int]:
    """The colour of `fraction` (clipped to [0, 1]) on a 5-stop viridis ramp, for heatmaps and bars."""
    fraction = min(max(fraction, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(fraction), len(VIRIDIS) - 2)
    a, b, f = VIRIDIS[i], VIRIDIS[i + 1], fraction - i
    return tuple(int(round(a[k] + (b[k] - a[k]) * f)) for k in range(3))
