"""The user's real defect-free images (`dataset.source=images`): listing, checking, placement at native size.

Input: a folder of images (searched recursively; `*.mask.png` files are left out), or a JSONL manifest with
one object per line, `{"image": "a/b.png", "roi": "a/b.roi.png"}` (paths relative to the manifest's folder;
`roi` optional, at the image's own size: non-zero pixels are where defects may go).

Every image is used whole, at its own size: windows are placed in image pixels and each defect is made in a
context crop of `image_size / scale` image pixels around its window (`dataset.scale`: model pixels per image
pixel). Pixels are decoded as PIL's `convert("RGB")` gives them: grey-level and palette images become RGB
with equal channels, RGBA loses its alpha, 16-bit images are clipped to 8 bits, EXIF orientation is not
applied (the pixels as stored); each of these is logged at the scan. An image that cannot be decoded, is
smaller than one context crop, or whose ROI cannot be read, has another size than the image, or leaves no
room for a window, is skipped, logged and counted; none usable is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr.images import list_images, resize_center_crop

log = logging.getLogger(__name__)
LOSSY_MODES = {"I;16": "16-bit: clipped to 8 bits", "I": "32-bit integer: clipped to 8 bits",
               "F": "float: clipped to 8 bits", "RGBA": "alpha dropped", "LA": "alpha dropped",
               "P": "palette: expanded to RGB", "CMYK": "CMYK: converted to RGB"}


class BackgroundError(ValueError):
    """No usable input, or an input list that cannot be read."""


@dataclass(frozen=True)
class Background:
    path: Path  # the image file
    name: str  # its path relative to the input root (recorded in each sample's json)
    sha256: str  # of the file's bytes
    roi: Path | None  # where defects may go (non-zero), or None: anywhere
    size: tuple[int, int] = (0, 0)  # (width, height) in pixels


@dataclass(frozen=True)
class Geometry:
    """Model sizes and their footprint in image pixels at `scale` (model pixels per image pixel)."""

    image_size: int  # the global model's side: one context crop, in model pixels
    window_size: int  # the local model's side, in model pixels
    margin: int  # model pixels between a window and the image's edge
    scale: float = 1.0

    @property
    def crop(self) -> int:
        """Side of a context crop in image pixels."""
        return max(1, round(self.image_size / self.scale))

    @property
    def window(self) -> int:
        """Side of a window in image pixels."""
        return max(1, round(self.window_size / self.scale))

    @property
    def border(self) -> int:
        """The margin in image pixels."""
        return round(self.margin / self.scale)


@dataclass(frozen=True)
class Backgrounds:
    root: Path  # the folder the names are relative to
    items: tuple[Background, ...]  # the usable images, in input order
    skipped: tuple[tuple[str, str], ...]  # (name, reason) of every image left out
    digest: str  # sha256 over the usable list (names, file digests, ROIs): part of the run's identity
    image_size: int
    window_size: int
    margin: int
    scale: float = 1.0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.image_size, self.window_size, self.margin, self.scale)

    def image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8: background `index`, the whole frame at its own size (decoded on each call: a
        large frame is never kept here)."""
        return load_frame(self.items[index].path)

    def allowed_corners(self, index: int) -> np.ndarray:
        """(H, W) bool: True at each top-left (x, y) -> [y, x] in image pixels whose window lies inside the
        ROI and the margins."""
        item, g = self.items[index], self.geometry
        roi = None if item.roi is None else str(item.roi)
        return _corners(roi, item.size, g.window, g.border)

    def summary(self) -> dict:
        g = self.geometry
        return {
            "root": str(self.root),
            "usable": len(self.items),
            "skipped": len(self.skipped),
            "skipped_files": [{"image": name, "reason": reason} for name, reason in self.skipped[:100]],
            "digest": self.digest,
            "scale": self.scale,
            "fit": f"native size; context crops of {g.crop} image px (image_size {self.image_size} / scale "
                   f"{self.scale:g}), windows of {g.window} image px",
        }


def fit(image: Image.Image, size: int, nearest: bool = False) -> Image.Image:
    """Shorter side to `size`, centre square (the preview's thumbnails, importers)."""
    return resize_center_crop(image, size, nearest=nearest)


def load_frame(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, the file's pixels as `convert("RGB")` gives them."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def _roi_array(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("L")) > 0


@lru_cache(maxsize=8)
def _corners(roi: str | None, size: tuple[int, int], window: int, margin: int) -> np.ndarray:
    width, height = size
    corners = np.zeros((height, width), dtype=bool)
    corners[margin : height - window - margin + 1, margin : width - window - margin + 1] = True
    if roi is None:
        corners.setflags(write=False)
        return corners
    inside = _roi_array(Path(roi)).astype(np.int32)
    integral = np.zeros((height + 1, width + 1), dtype=np.int64 if height * width >= 2**31 else np.int32)
    integral[1:, 1:] = inside.cumsum(0).cumsum(1)
    ny, nx = height - window + 1, width - window + 1
    sums = integral[window:, window:] - integral[:ny, window:] - integral[window:, :nx] + integral[:ny, :nx]
    full = np.zeros_like(corners)
    full[:ny, :nx] = sums == window * window
    corners &= full
    corners.setflags(write=False)
    return corners


def _entries(source: Path) -> tuple[Path, list[tuple[Path, Path | None]]]:
    """(root, [(image path, roi path or None)]) from a folder or a JSONL manifest."""
    if source.is_dir():
        return source, [(p, None) for p in list_images(source)]
    if source.is_file() and source.suffix.lower() in (".jsonl", ".json"):
        root, entries = source.parent, []
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                image = root / str(item["image"])
                roi = item.get("roi")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BackgroundError(
                    f'{source}:{number}: not a JSON object with an "image" ({type(exc).__name__}); '
                    'each line reads {"image": "path.png", "roi": "optional-roi.png"}'
                ) from None
            entries.append((image, None if roi in (None, "") else root / str(roi)))
        return root, entries
    raise BackgroundError(f"{source}: no such folder or .jsonl manifest")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _check(image: Path, roi: Path | None, g: Geometry) -> tuple[str | None, str, tuple[int, int]]:
    """(reason to skip or None, sha256 of the image file, (width, height) or (0, 0) when undecodable)."""
    try:
        data = image.read_bytes()
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})", "", (0, 0)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size, mode, rotated = img.size, img.mode, img.getexif().get(0x0112, 1) not in (1, None)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a skipped image
        return f"unreadable image ({type(exc).__name__})", digest, (0, 0)
    width, height = size
    if min(width, height) < g.crop:
        return (f"{width}x{height} is smaller than one context crop ({g.crop} px at dataset.scale={g.scale:g})",
                digest, size)
    if mode in LOSSY_MODES:
        log.info("background %s (%s): %s", image.name, mode, LOSSY_MODES[mode])
    if rotated:
        log.info("background %s: EXIF orientation not applied (the pixels as stored)", image.name)
    if roi is not None:
        try:
            with Image.open(roi) as r:
                r.load()
                roi_size = r.size
        except Exception as exc:  # noqa: BLE001
            return f"ROI {roi.name} unreadable ({type(exc).__name__})", digest, size
        if roi_size != size:
            return f"ROI is {roi_size[0]}x{roi_size[1]}, the image {width}x{height}", digest, size
    if not _corners(None if roi is None else str(roi), size, g.window, g.border).any():
        return f"no room for a {g.window} px window (margin {g.border} px)", digest, size
    return None, digest, size


def fitting_scale(image_size: int, shorter_side: int) -> float:
    """The smallest dataset.scale (2 decimals, rounded up) at which an image of this shorter side holds one
    context crop."""
    return math.ceil(100 * image_size / shorter_side) / 100


def scan_backgrounds(source: str | Path, image_size: int, window_size: int, margin: int,
                     scale: float = 1.0) -> Backgrounds:
    """Check every input once (a full decode); returns the usable list with its digest."""
    source = Path(source).expanduser()
    root, entries = _entries(source)
    if not entries:
        raise BackgroundError(f"{source} holds no images ({', '.join(('.png', '.jpg', '.bmp', '.tif'))} ...)")
    g = Geometry(image_size, window_size, margin, scale)
    items, skipped, sides = [], [], []
    digest = hashlib.sha256(f"native size={image_size} window={window_size} scale={scale!r}".encode())
    for image, roi in entries:
        name = _relative(image, root)
        reason, sha, size = _check(image, roi, g)
        sides.append(min(size))
        if reason is not None:
            skipped.append((name, reason))
            log.warning("skipping background %s: %s", name, reason)
            continue
        roi_sha = "" if roi is None else hashlib.sha256(roi.read_bytes()).hexdigest()
        items.append(Background(image.resolve(), name, sha, None if roi is None else roi.resolve(), size))
        digest.update(f"{name}\0{sha}\0{roi_sha}\n".encode())
    if not items:
        first = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        hint = ""
        if max(sides) and max(sides) < g.crop:
            hint = (f"; the largest holds a context crop from dataset.scale={fitting_scale(image_size, max(sides))} "
                    "up (or use a smaller model)")
        raise BackgroundError(f"{source}: none of its {len(entries)} images is usable{first}{hint}")
    log.info("backgrounds: %d usable images in %s, %d skipped", len(items), source, len(skipped))
    return Backgrounds(
        root.resolve(), tuple(items), tuple(skipped), digest.hexdigest(), image_size, window_size, margin, scale
    )
