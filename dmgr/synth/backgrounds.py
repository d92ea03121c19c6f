"""The user's real defect-free images (`dataset.source=images`): listing, checking, fitting, placement.

Input: a folder of images (searched recursively; `*.mask.png` files are left out), or a JSONL manifest with
one object per line, `{"image": "a/b.png", "roi": "a/b.roi.png"}` (paths relative to the manifest's folder;
`roi` optional: non-zero pixels are where defects may go).

Every image is fitted to the model the same documented way: its shorter side is scaled to `image_size`
(Lanczos; the ROI with nearest neighbour) and the centre square is cut. Grey-level and palette images are
converted to RGB. An image that cannot be decoded, whose shorter side is below `window_size`, or whose
ROI cannot be read, has another size than the image, or leaves no room for a window, is skipped, logged
and counted; none usable is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr.images import list_images, resize_center_crop

log = logging.getLogger(__name__)


class BackgroundError(ValueError):
    """No usable input, or an input list that cannot be read."""


@dataclass(frozen=True)
class Background:
    path: Path  # the image file
    name: str  # its path relative to the input root (recorded in each sample's json)
    sha256: str  # of the file's bytes
    roi: Path | None  # where defects may go (non-zero), or None: anywhere


@dataclass(frozen=True)
class Backgrounds:
    root: Path  # the folder the names are relative to
    items: tuple[Background, ...]  # the usable images, in input order
    skipped: tuple[tuple[str, str], ...]  # (name, reason) of every image left out
    digest: str  # sha256 over the usable list (names, file digests, ROIs): part of the run's identity
    image_size: int
    window_size: int
    margin: int

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> np.ndarray:
        """(S, S, 3) uint8: background `index` exactly as the model sees it."""
        return _fitted_image(self.items[index].path, self.image_size)

    def allowed_corners(self, index: int) -> np.ndarray:
        """(S, S) bool: True at each top-left (x, y) -> [y, x] whose window lies inside the ROI and the margins."""
        roi = self.items[index].roi
        return _corners(None if roi is None else str(roi), self.image_size, self.window_size, self.margin)

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "usable": len(self.items),
            "skipped": len(self.skipped),
            "skipped_files": [{"image": name, "reason": reason} for name, reason in self.skipped[:100]],
            "digest": self.digest,
            "fit": f"shorter side scaled to {self.image_size} px (Lanczos), centre square",
        }


def fit(image: Image.Image, size: int, nearest: bool = False) -> Image.Image:
    """The documented fitting rule: shorter side to `size`, centre square."""
    return resize_center_crop(image, size, nearest=nearest)


@lru_cache(maxsize=64)
def _fitted_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        array = np.asarray(fit(img.convert("RGB"), size))
    array.setflags(write=False)
    return array


def _roi_array(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.asarray(fit(img.convert("L"), size, nearest=True)) > 0


@lru_cache(maxsize=256)
def _corners(roi: str | None, size: int, window: int, margin: int) -> np.ndarray:
    corners = np.zeros((size, size), dtype=bool)
    low, high = margin, size - window - margin  # top-left in [low, high), as for generated boards
    if high <= low:
        return corners
    corners[low:high, low:high] = True
    if roi is None:
        return corners
    inside = _roi_array(Path(roi), size).astype(np.int64)
    integral = np.zeros((size + 1, size + 1), dtype=np.int64)
    integral[1:, 1:] = inside.cumsum(0).cumsum(1)
    n = size - window + 1
    sums = integral[window:, window:] - integral[:n, window:] - integral[window:, :n] + integral[:n, :n]
    full = np.zeros((size, size), dtype=bool)
    full[:n, :n] = sums == window * window
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


def _check(image: Path, roi: Path | None, size: int, window: int, margin: int) -> tuple[str | None, str]:
    """(reason to skip or None, sha256 of the image file)."""
    try:
        data = image.read_bytes()
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})", ""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a skipped image
        return f"unreadable image ({type(exc).__name__})", digest
    if min(width, height) < window:
        return f"{width}x{height} is smaller than the {window} px window", digest
    if roi is not None:
        try:
            with Image.open(roi) as r:
                r.load()
                roi_size = r.size
        except Exception as exc:  # noqa: BLE001
            return f"ROI {roi.name} unreadable ({type(exc).__name__})", digest
        if roi_size != (width, height):
            return f"ROI is {roi_size[0]}x{roi_size[1]}, the image {width}x{height}", digest
        if not _corners(str(roi), size, window, margin).any():
            return f"ROI leaves no room for a {window} px window (margin {margin})", digest
    return None, digest


def scan_backgrounds(source: str | Path, image_size: int, window_size: int, margin: int) -> Backgrounds:
    """Check every input once (a full decode); returns the usable list with its digest."""
    source = Path(source).expanduser()
    root, entries = _entries(source)
    if not entries:
        raise BackgroundError(f"{source} holds no images ({', '.join(('.png', '.jpg', '.bmp', '.tif'))} ...)")
    items, skipped = [], []
    digest = hashlib.sha256(f"fit={image_size}".encode())
    for image, roi in entries:
        name = _relative(image, root)
        reason, sha = _check(image, roi, image_size, window_size, margin)
        if reason is not None:
            skipped.append((name, reason))
            log.warning("skipping background %s: %s", name, reason)
            continue
        roi_sha = "" if roi is None else hashlib.sha256(roi.read_bytes()).hexdigest()
        items.append(Background(image.resolve(), name, sha, None if roi is None else roi.resolve()))
        digest.update(f"{name}\0{sha}\0{roi_sha}\n".encode())
    if not items:
        first = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise BackgroundError(f"{source}: none of its {len(entries)} images is usable{first}")
    log.info("backgrounds: %d usable images in %s, %d skipped", len(items), source, len(skipped))
    return Backgrounds(
        root.resolve(), tuple(items), tuple(skipped), digest.hexdigest(), image_size, window_size, margin
    )
