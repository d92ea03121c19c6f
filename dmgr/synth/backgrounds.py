"""The user's real defect-free images (`dataset.source=images`): listing, checking, fitting, placement.

Input: a folder of images (searched recursively; `*.mask.png` files are left out), or a JSONL manifest with
one object per line, `{"image": "a/b.png", "roi": "a/b.roi.png"}` (UTF-8, a byte-order mark allowed; paths
relative to the manifest's folder; `roi` optional: non-zero pixels are where defects may go). A manifest
that names an image twice is used as written (the image is drawn twice as often) with one warning that
counts the repeated lines. Each image is recorded by its path relative to the input root, normalised
(`a/./b/../c.png` is `a/c.png`); an image outside the root by its normalised absolute path.

Every file is decoded by the one rule of `dmgr.images.decode_rgb` (EXIF orientation applied, 16-bit grey
scaled by its bit depth, alpha dropped ...; the conversions are counted and logged once per scan); an ROI
is turned by its own EXIF orientation the same way. Every image is fitted to the model the same documented
way: its shorter side is scaled to `image_size` (Lanczos; the ROI with nearest neighbour) and the centre
square is cut. An image that cannot be decoded, whose shorter side is below `window_size`, or whose ROI
cannot be read, has another size than the image, or leaves no room for a window, is skipped, logged and
counted; none usable is an error.

Provenance: the sha256 recorded for an image is of the very bytes that are decoded. A file that changes
after the scan (whose sha256 is part of the run's identity) stops the run with one line instead of being
used under the old digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr.images import Conversions, decode_mask, decode_rgb, list_images, resize_center_crop
from dmgr.schema import fail

log = logging.getLogger(__name__)
DEMO_BACKGROUNDS = Path("outputs/pcb-backgrounds")  # the demo's boards (`make backgrounds`), rendered on first use
DEMO_BOARDS = 256


class BackgroundError(ValueError):
    """No usable input, or an input list that cannot be read."""


@dataclass(frozen=True)
class Background:
    path: Path  # the image file
    name: str  # its path relative to the input root (recorded in each sample's json)
    sha256: str  # of the file's bytes, the very bytes decoded
    roi: Path | None  # where defects may go (non-zero), or None: anywhere
    roi_sha256: str = ""  # of the ROI file's bytes


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
        """(S, S, 3) uint8: background `index` exactly as the model sees it, decoded from bytes whose sha256
        is the recorded one."""
        item = self.items[index]
        return _fitted_image(item.path, item.name, item.sha256, self.image_size)

    def allowed_corners(self, index: int) -> np.ndarray:
        """(S, S) bool: True at each top-left (x, y) -> [y, x] whose window lies inside the ROI and the margins."""
        item = self.items[index]
        roi = None if item.roi is None else (str(item.roi), item.name, item.roi_sha256)
        return _corners(roi, self.image_size, self.window_size, self.margin)

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


def _verified_bytes(path: Path, name: str, sha256: str) -> bytes:
    """The file's bytes, whose sha256 must be the one the scan recorded (the run's identity holds it)."""
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        fail("dataset.images", name, f"{path} changed since the run started (sha256 {found[:12]}, the run holds "
             f"{sha256[:12]}): restore the file, or rerun to start a run on the new inputs")
    return data


@lru_cache(maxsize=64)
def _fitted_image(path: Path, name: str, sha256: str, size: int) -> np.ndarray:
    image, _ = decode_rgb(_verified_bytes(path, name, sha256))
    array = np.asarray(fit(image, size))
    array.setflags(write=False)
    return array


@lru_cache(maxsize=256)
def _corners(roi: tuple[str, str, str] | None, size: int, window: int, margin: int) -> np.ndarray:
    """roi: (path, image name, sha256) or None."""
    corners = np.zeros((size, size), dtype=bool)
    low, high = margin, size - window - margin  # top-left in [low, high), as for generated boards
    if high <= low:
        return corners
    corners[low:high, low:high] = True
    if roi is None:
        return corners
    mask = decode_mask(_verified_bytes(Path(roi[0]), roi[1], roi[2]))
    inside = (np.asarray(fit(mask, size, nearest=True)) > 0).astype(np.int64)
    integral = np.zeros((size + 1, size + 1), dtype=np.int64)
    integral[1:, 1:] = inside.cumsum(0).cumsum(1)
    n = size - window + 1
    sums = integral[window:, window:] - integral[:n, window:] - integral[window:, :n] + integral[:n, :n]
    full = np.zeros((size, size), dtype=bool)
    full[:n, :n] = sums == window * window
    corners &= full
    corners.setflags(write=False)
    return corners


def _normal(path: Path) -> Path:
    """The absolute path with `.` and `..` resolved textually (symlinks kept, as the user named them)."""
    return Path(os.path.normpath(path.absolute()))


def _manifest_lines(source: Path) -> list[str]:
    try:
        return source.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise BackgroundError(f"{source}: not UTF-8 text (byte {exc.start}); a manifest holds one JSON object a "
                              'line, {"image": "path.png", "roi": "optional-roi.png"}') from None
    except OSError as exc:
        raise BackgroundError(f"{source}: cannot read the manifest ({exc.strerror or exc})") from None


def _manifest(source: Path) -> list[tuple[Path, Path | None]]:
    root, entries, first_line, repeated = _normal(source.parent), [], {}, []
    for number, line in enumerate(_manifest_lines(source), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image = _normal(root / str(item["image"]))
            roi = item.get("roi")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackgroundError(
                f'{source}:{number}: not a JSON object with an "image" ({type(exc).__name__}); '
                'each line reads {"image": "path.png", "roi": "optional-roi.png"}'
            ) from None
        if image in first_line:
            repeated.append(f"{number} (= {first_line[image]})")
        first_line.setdefault(image, number)
        entries.append((image, None if roi in (None, "") else _normal(root / str(roi))))
    if repeated:
        log.warning("%s: %d lines name an image an earlier line names (lines %s%s): each is used as often as it is "
                    "listed", source, len(repeated), ", ".join(repeated[:10]), " ..." if len(repeated) > 10 else "")
    return entries


def _entries(source: Path) -> tuple[Path, list[tuple[Path, Path | None]]]:
    """(root, [(image path, roi path or None)]) from a folder or a JSONL manifest."""
    if source.is_dir():
        return source, [(p, None) for p in list_images(source)]
    if source.is_file() and source.suffix.lower() in (".jsonl", ".json"):
        return source.parent, _manifest(source)
    raise BackgroundError(f"{source}: no such folder or .jsonl manifest")


def _relative(path: Path, root: Path) -> str:
    """The path relative to the root when inside it, else its normalised absolute path."""
    path, root = _normal(path), _normal(root)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _decoded_size(data: bytes, conversions: Conversions, name: str) -> tuple[int, int]:
    image, notes = decode_rgb(data)
    conversions.add(notes, name)
    return image.size


def _check(image: Path, roi: Path | None, size: int, window: int, margin: int,
           conversions: Conversions) -> tuple[str | None, str, str]:
    """(reason to skip or None, sha256 of the image file, sha256 of the ROI file or "")."""
    try:
        data = image.read_bytes()
    except (OSError, MemoryError) as exc:
        return f"cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})", "", ""
    digest = hashlib.sha256(data).hexdigest()
    try:
        width, height = _decoded_size(data, conversions, image.name)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a skipped image
        return f"unreadable image ({type(exc).__name__}: {str(exc)[:160]})", digest, ""
    if min(width, height) < window:
        return f"{width}x{height} is smaller than the {window} px window", digest, ""
    if roi is None:
        return None, digest, ""
    try:
        roi_data = roi.read_bytes()
        roi_size = decode_mask(roi_data).size
    except Exception as exc:  # noqa: BLE001
        return f"ROI {roi.name} unreadable ({type(exc).__name__})", digest, ""
    roi_digest = hashlib.sha256(roi_data).hexdigest()
    if roi_size != (width, height):
        return f"ROI is {roi_size[0]}x{roi_size[1]}, the image {width}x{height} (both upright)", digest, roi_digest
    if not _corners((str(roi), roi.name, roi_digest), size, window, margin).any():
        return f"ROI leaves no room for a {window} px window (margin {margin})", digest, roi_digest
    return None, digest, roi_digest


def scan_backgrounds(source: str | Path, image_size: int, window_size: int, margin: int) -> Backgrounds:
    """Check every input once (a full decode); returns the usable list with its digest."""
    source = Path(source).expanduser()
    root, entries = _entries(source)
    if not entries:
        raise BackgroundError(f"{source} holds no images ({', '.join(('.png', '.jpg', '.bmp', '.tif'))} ...)")
    items, skipped, conversions = [], [], Conversions()
    digest = hashlib.sha256(f"fit={image_size}".encode())
    for image, roi in entries:
        name = _relative(image, root)
        reason, sha, roi_sha = _check(image, roi, image_size, window_size, margin, conversions)
        if reason is not None:
            skipped.append((name, reason))
            log.warning("skipping background %s: %s", name, reason)
            continue
        items.append(Background(image.resolve(), name, sha, None if roi is None else roi.resolve(), roi_sha))
        digest.update(f"{name}\0{sha}\0{roi_sha}\n".encode())
    conversions.report(log, f"backgrounds in {source}")
    if not items:
        first = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise BackgroundError(f"{source}: none of its {len(entries)} images is usable{first}")
    log.info("backgrounds: %d usable images in %s, %d skipped", len(items), source, len(skipped))
    return Backgrounds(
        root.resolve(), tuple(items), tuple(skipped), digest.hexdigest(), image_size, window_size, margin
    )


def demo_backgrounds(value: str | Path, boards: int | None = None) -> Path | None:
    """The demo's default input (DEMO_BACKGROUNDS/global), rendered on first use as `make backgrounds` renders
    it, relative to the working directory; None for any other path."""
    if _normal(Path(value)) != _normal(DEMO_BACKGROUNDS / "global"):
        return None
    from dmgr.data.export import export_all  # the procedural boards, only when needed

    boards = DEMO_BOARDS if boards is None else boards
    log.info("rendering the demo's %d defect-free boards into %s (first use; `make backgrounds` does the same)",
             boards, DEMO_BACKGROUNDS)
    staging = DEMO_BACKGROUNDS.with_name(f".{DEMO_BACKGROUNDS.name}.tmp-{os.getpid()}")
    export_all(staging, 64, boards, 0, 0, progress=False)
    (staging / ".exported").touch()
    try:
        staging.rename(DEMO_BACKGROUNDS)  # whole or not at all; another worker may have finished first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    found = DEMO_BACKGROUNDS / "global"
    return found.resolve() if found.is_dir() else None
