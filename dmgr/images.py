"""Image helpers shared by the job, training, data tools and evaluation: files, uint8 tensors, boxes, colours.

torch is imported only by the tensor conversions, so the procedural data tools run without it."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


class UnsupportedImage(ValueError):
    """An image whose pixel format has no defined 8-bit RGB meaning (the message says why and what to do)."""


def _scaled(array: np.ndarray, top: int) -> np.ndarray:
    """Integer grey values in [0, top] -> uint8 by the bit depth: round(value * 255 / top), never clipped."""
    wide = array.astype(np.int64)
    return ((wide * 255 + top // 2) // top).astype(np.uint8)


def _grey(img: Image.Image) -> tuple[np.ndarray, str]:
    """(H, W) uint8 of a one-channel image, and the conversion made."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img.convert("L")), "1-bit to RGB (0/255)"
    if mode == "L":
        return np.asarray(img), "grey to RGB"
    array = np.asarray(img)
    if mode.startswith("I;16"):
        if array.size and 0 < int(array.max()) < 4096:  # a 12-bit camera's values in the low bits
            return _scaled(array, 65535), ("16-bit grey to 8 bits (value * 255 / 65535, rounded) with no value "
                                            "above 4095: dark; store 12-bit data shifted left by 4 bits")
        return _scaled(array, 65535), "16-bit grey to 8 bits (value * 255 / 65535, rounded)"
    if mode == "I":
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 65535:
            raise UnsupportedImage(f"32-bit integer grey with values {low}..{high}: only 0..65535 (16 bits) has a "
                                   "defined 8-bit scale; save it as 8- or 16-bit")
        return _scaled(array, 65535), "32-bit integer grey (0..65535) to 8 bits (value * 255 / 65535, rounded)"
    if mode == "F":
        finite = np.isfinite(array).all()
        low, high = (float(array.min()), float(array.max())) if array.size and finite else (0.0, 0.0)
        if not finite or low < 0 or high > 1:
            what = "NaN/Inf" if not finite else f"values {low:g}..{high:g}"
            raise UnsupportedImage(f"float grey with {what}: only 0..1 has a defined 8-bit scale; save it as 8- or "
                                   "16-bit")
        return np.round(array.astype(np.float64) * 255).astype(np.uint8), "float grey (0..1) to 8 bits (x 255)"
    raise UnsupportedImage(f"mode {mode} has no defined grey scale")


def _oriented(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """The image turned upright by its EXIF orientation tag (as ImageOps.exif_transpose), and the note made."""
    orientation = img.getexif().get(0x0112, 1)
    if orientation in (None, 1):
        return img, []
    return ImageOps.exif_transpose(img), [f"EXIF orientation {orientation} applied"]


def _rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """The RGB image of a decoded image of any mode, and the conversions made (empty for RGB)."""
    mode, notes = img.mode, []
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        notes.append("alpha dropped (colours kept as stored)")
        if mode in ("LA", "La"):
            img, mode = img.getchannel(0), "L"
    if mode in ("P", "PA"):
        return img.convert("RGB"), [*notes, "palette to RGB"]
    if mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        return img.convert("RGB"), notes
    if mode in ("CMYK", "YCbCr"):
        return img.convert("RGB"), [*notes, f"{mode} to RGB"]
    grey, note = _grey(img)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB"), [*notes, note]


def _open(data: bytes) -> Image.Image:
    """Pillow's image of the bytes; its 'cannot identify' error without the repr of the buffer it read."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError("not an image format Pillow reads, or a damaged file") from None


def decode_rgb(data: bytes) -> tuple[Image.Image, list[str]]:
    """The one decoder of user images: (the RGB image the bytes hold, the conversions made).

    EXIF orientation is applied first (the image as viewers show it, so ROIs drawn there align). Then:
    RGB as is; grey (L) and 1-bit to three equal channels (1-bit as 0/255); 16-bit grey (I;16*) and 32-bit
    integer grey within 0..65535 scaled by the bit depth, round(value * 255 / 65535), never clipped; float
    grey within 0..1 times 255, rounded; alpha (RGBA, LA, PA, P with transparency) dropped, the colours kept
    as stored; palette (P) through its palette; CMYK and YCbCr by Pillow's conversion. Any other mode, 32-bit
    integers outside 0..65535 and floats outside 0..1 raise UnsupportedImage; undecodable bytes raise
    Pillow's error (OSError, ValueError, DecompressionBombError ...).
    """
    with _open(data) as img:
        img.load()
        img, notes = _oriented(img)
        rgb, more = _rgb(img)
        return rgb, notes + more


def decode_mask(data: bytes) -> Image.Image:
    """A mask or ROI file as an L image with 0/255 (255 where any colour channel is non-zero), turned upright
    by its EXIF orientation exactly as `decode_rgb` turns the image."""
    with _open(data) as img:
        img.load()
        img, _ = _oriented(img)
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA" if img.mode == "PA" else "RGB")
        if img.mode in ("RGBA", "RGBa", "LA", "La"):
            img = img.convert("RGB") if img.mode.startswith("RGB") else img.getchannel(0)
        if img.mode == "CMYK":
            img = img.convert("RGB")
        array = np.asarray(img)
        inside = array.reshape(*array.shape[:2], -1).any(axis=2) if array.ndim == 3 else array != 0
        return Image.fromarray(np.where(inside, 255, 0).astype(np.uint8), "L")


def is_grey(notes: list[str]) -> bool:
    """Whether `decode_rgb` made these notes of a one-channel image (grey, 1-bit, 16-bit, 32-bit or float)."""
    return any("grey" in note or note.startswith("1-bit") for note in notes)


class Conversions:
    """What `decode_rgb` did to the images of one run, counted, to log once (`report`)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.images = 0

    def add(self, notes: list[str], name: str | Path) -> None:
        self.images += 1
        for note in notes:
            self.counts[note] += 1
            self.examples.setdefault(note, str(name))

    @property
    def grey(self) -> int:
        """Images that were one-channel (grey, 1-bit, 16-bit, 32-bit or float)."""
        return sum(n for note, n in self.counts.items() if is_grey([note]))

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def report(self, logger: logging.Logger, what: str = "images") -> None:
        if self.counts:
            done = "; ".join(f"{n} {note} (e.g. {self.examples[note]})" for note, n in sorted(self.counts.items()))
            logger.info("%s: of %d decoded, %s", what, self.images, done)


def load_rgb(path: str | Path, conversions: Conversions | None = None) -> Image.Image:
    """The file's RGB image by `decode_rgb`, its conversions counted into `conversions` (raises OSError,
    UnsupportedImage and Pillow's errors on a file that cannot be used)."""
    image, notes = decode_rgb(Path(path).read_bytes())
    if conversions is not None:
        conversions.add(notes, path)
    return image


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
