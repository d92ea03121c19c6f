"""Small image-file helpers shared by the exporters, importers and datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
