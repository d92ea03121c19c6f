"""The user's real defect-free images (`dataset.source=images`): listing, checking, placement at native size.

Input: a folder of images (searched recursively; `*.mask.png` files are left out), or a JSONL manifest with
one object per line, `{"image": "a/b.png", "roi": "a/b.roi.png"}` (UTF-8, a byte-order mark allowed; paths
relative to the manifest's folder; `roi` optional, at the image's own size: non-zero pixels are where defects
may go; or per class, `"roi": {"missinghole": "pads.png", "short": "traces.png"}`: each named class only
inside its own ROI, a class not named anywhere inside the margins). A manifest
that names an image twice is used as written (the image is drawn twice as often) with one warning that
counts the repeated lines. Each image is recorded by its path relative to the input root, normalised
(`a/./b/../c.png` is `a/c.png`); an image outside the root by its normalised absolute path.

Every file is decoded by the one rule of `dmgr.images.decode_rgb` (EXIF orientation applied, 16-bit grey
scaled by its bit depth, alpha dropped ...; the conversions are counted and logged once per scan); an ROI
is turned by its own EXIF orientation the same way. Every image is used whole, at its own (upright) size:
windows are placed in image pixels and each defect is made in a context crop of `image_size / scale` image
pixels around its window (`dataset.scale`: model pixels per image pixel). An image that cannot be decoded,
is smaller than one context crop, or whose ROI cannot be read, has another size than the image, or leaves
no room for a window, is skipped, logged and counted; none usable is an error.

Provenance: the sha256 recorded for an image is of the very bytes that are decoded. A file that changes
after the scan (whose sha256 is part of the run's identity) stops the run with one line instead of being
used under the old digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr import DEMO_DATA
from dmgr.images import Conversions, decode_mask, decode_rgb, is_grey, list_images, resize_center_crop
from dmgr.schema import fail

log = logging.getLogger(__name__)
DEMO_BACKGROUNDS = Path("outputs/pcb-backgrounds")  # the demo's boards (`make backgrounds`), rendered on first use
DEMO_BOARDS = 256
DEMO_PANEL = (160, 112)  # each demo background: W x H of 64 px boards at the demo models' pixel scale
DEMO_ROI_SLACK = 2.0  # the demo's per-class ROIs: windows centred within 2 px of a place the class occurs
DEMO_PATCHES = 1000  # the demo's defect patches per class (DEMO_DATA/local, as `make data` writes them)


class BackgroundError(ValueError):
    """No usable input, or an input list that cannot be read."""


@dataclass(frozen=True)
class Background:
    path: Path  # the image file
    name: str  # its path relative to the input root (recorded in each sample's json)
    sha256: str  # of the file's bytes, the very bytes decoded
    roi: Path | None  # where defects may go (non-zero), or None: anywhere
    roi_sha256: str = ""  # of the ROI file's bytes
    size: tuple[int, int] = (0, 0)  # (width, height) in pixels, upright
    class_rois: tuple[ClassRoi, ...] = ()  # per-class ROIs (a manifest's {"class": "roi.png"})
    grey: bool = False  # a one-channel image: its samples are written grey (L), as it came


@dataclass(frozen=True)
class ClassRoi:
    """Where one class may go on one image: its ROI file, that file's sha256, and whether a window fits."""

    class_name: str
    path: Path
    sha256: str
    room: bool


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
        """(H, W, 3) uint8: background `index`, the whole frame at its own size, decoded from bytes whose
        sha256 is the recorded one (on each call: a large frame is never kept here)."""
        item = self.items[index]
        return load_frame(item.path, item.name, item.sha256)

    def allowed_corners(self, index: int, class_name: str | None = None) -> np.ndarray:
        """(H, W) bool: True at each top-left (x, y) -> [y, x] in image pixels whose window lies inside the
        ROI (the class's own when the manifest gives one) and the margins."""
        item, g = self.items[index], self.geometry
        roi = None if item.roi is None else (str(item.roi), item.name, item.roi_sha256)
        for own in item.class_rois:
            if own.class_name == class_name:
                roi = (str(own.path), item.name, own.sha256)
        return _corners(roi, item.size, g.window, g.border)

    def has_room(self, index: int, class_name: str) -> bool:
        """Whether a window of the class fits anywhere on image `index` (known from the scan, nothing read)."""
        for own in self.items[index].class_rois:
            if own.class_name == class_name:
                return own.room
        return True  # the image's own ROI (or none) has room: the scan skips images without

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


def _verified_bytes(path: Path, name: str, sha256: str) -> bytes:
    """The file's bytes, whose sha256 must be the one the scan recorded (the run's identity holds it)."""
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        fail("dataset.images", name, f"{path} changed since the run started (sha256 {found[:12]}, the run holds "
             f"{sha256[:12]}): restore the file, or rerun to start a run on the new inputs")
    return data


def load_frame(path: Path, name: str, sha256: str) -> np.ndarray:
    """(H, W, 3) uint8: the file decoded by `decode_rgb`, from bytes whose sha256 is the recorded one."""
    image, _ = decode_rgb(_verified_bytes(path, name, sha256))
    return np.asarray(image)


@lru_cache(maxsize=8)
def _corners(roi: tuple[str, str, str] | None, size: tuple[int, int], window: int, margin: int) -> np.ndarray:
    """roi: (path, image name, sha256) or None; size: (width, height) of the upright image."""
    width, height = size
    corners = np.zeros((height, width), dtype=bool)
    corners[margin : height - window - margin + 1, margin : width - window - margin + 1] = True
    if roi is None:
        corners.setflags(write=False)
        return corners
    inside = (np.asarray(decode_mask(_verified_bytes(Path(roi[0]), roi[1], roi[2]))) > 0).astype(np.int32)
    integral = np.zeros((height + 1, width + 1), dtype=np.int64 if height * width >= 2**31 else np.int32)
    integral[1:, 1:] = inside.cumsum(0).cumsum(1)
    ny, nx = height - window + 1, width - window + 1
    sums = integral[window:, window:] - integral[:ny, window:] - integral[window:, :nx] + integral[:ny, :nx]
    full = np.zeros_like(corners)
    full[:ny, :nx] = sums == window * window
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


Roi = Path | dict[str, Path] | None  # all classes' ROI, per-class ROIs, or none


def _roi(value: object, root: Path, where: str) -> Roi:
    """A manifest line's "roi": a path (all classes), {class: path} (per class), or absent."""
    if value in (None, ""):
        return None
    if isinstance(value, str):
        return _normal(root / value)
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, str) and k and v
                                                 for k, v in value.items()):
        return {k: _normal(root / v) for k, v in value.items()}
    raise BackgroundError(f'{where}: "roi" is {json.dumps(value)[:80]}; give a path ("roi.png") or one path per '
                          'class ({"missinghole": "pads.png", "short": "traces.png"})')


def _manifest(source: Path) -> list[tuple[Path, Roi]]:
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
        entries.append((image, _roi(roi, root, f"{source}:{number}")))
    if repeated:
        log.warning("%s: %d lines name an image an earlier line names (lines %s%s): each is used as often as it is "
                    "listed", source, len(repeated), ", ".join(repeated[:10]), " ..." if len(repeated) > 10 else "")
    return entries


def _entries(source: Path) -> tuple[Path, list[tuple[Path, Roi]]]:
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


def _decoded_size(data: bytes, conversions: Conversions, name: str) -> tuple[tuple[int, int], bool]:
    """((width, height) of the upright image, whether it is one-channel), the conversions counted."""
    image, notes = decode_rgb(data)
    conversions.add(notes, name)
    return image.size, is_grey(notes)


def _file_bytes(path: Path) -> bytes:
    """The bytes of a regular file; a FIFO, device or socket (whose read could block forever) is an OSError."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise OSError(f"not a regular file (a FIFO, device or socket): {path}")
    return path.read_bytes()


def _read_roi(roi: Path, size: tuple[int, int]) -> tuple[str | None, str]:
    """(reason the ROI cannot be used or None, sha256 of its bytes or "")."""
    try:
        roi_data = _file_bytes(roi)
        roi_size = decode_mask(roi_data).size
    except Exception as exc:  # noqa: BLE001
        return f"ROI {roi.name} unreadable ({type(exc).__name__})", ""
    digest = hashlib.sha256(roi_data).hexdigest()
    if roi_size != size:
        return (f"ROI is {roi_size[0]}x{roi_size[1]}, the image {size[0]}x{size[1]} (both upright)",
                digest)
    return None, digest


def _check(image: Path, roi: Roi, g: Geometry,
           conversions: Conversions) -> tuple[str | None, str, str, tuple[int, int], tuple[ClassRoi, ...], bool]:
    """(reason to skip or None, sha256 of the image file, sha256 of the ROI file or "", (width, height) or
    (0, 0) when undecodable, per-class ROIs, whether the image is one-channel)."""
    try:
        data = _file_bytes(image)
    except (OSError, MemoryError) as exc:
        why = getattr(exc, "strerror", None) or (str(exc).split(":")[0] if isinstance(exc, OSError) else "")
        return f"cannot read ({why or type(exc).__name__})", "", "", (0, 0), (), False
    digest = hashlib.sha256(data).hexdigest()
    try:
        size, grey = _decoded_size(data, conversions, image.name)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a skipped image
        return f"unreadable image ({type(exc).__name__}: {str(exc)[:160]})", digest, "", (0, 0), (), False
    width, height = size
    if min(width, height) < g.crop:
        return (f"{width}x{height} is smaller than one context crop ({g.crop} px at dataset.scale={g.scale:g})",
                digest, "", size, (), grey)
    if isinstance(roi, dict):
        own = []
        for class_name, path in roi.items():
            reason, roi_digest = _read_roi(path, size)
            if reason is not None:
                return f"{reason} (class {class_name}: {path.name})", digest, "", size, (), grey
            room = bool(_corners((str(path), path.name, roi_digest), size, g.window, g.border).any())
            own.append(ClassRoi(class_name, path.resolve(), roi_digest, room))
        return None, digest, "", size, tuple(own), grey
    roi_digest = ""
    if roi is not None:
        reason, roi_digest = _read_roi(roi, size)
        if reason is not None:
            return reason, digest, roi_digest, size, (), grey
    key = None if roi is None else (str(roi), roi.name, roi_digest)
    if not _corners(key, size, g.window, g.border).any():
        return f"no room for a {g.window} px window (margin {g.border} px)", digest, roi_digest, size, (), grey
    return None, digest, roi_digest, size, (), grey


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
    items, skipped, sides, conversions = [], [], [], Conversions()
    digest = hashlib.sha256(f"native size={image_size} window={window_size} scale={scale!r}".encode())
    for image, roi in entries:
        name = _relative(image, root)
        reason, sha, roi_sha, size, class_rois, grey = _check(image, roi, g, conversions)
        sides.append(min(size))
        if reason is not None:
            skipped.append((name, reason))
            log.warning("skipping background %s: %s", name, reason)
            continue
        plain = roi.resolve() if isinstance(roi, Path) else None
        items.append(Background(image.resolve(), name, sha, plain, roi_sha, size, class_rois, grey))
        own = "".join(f"\0{c.class_name}={c.sha256}" for c in class_rois)
        digest.update(f"{name}\0{sha}\0{roi_sha}{own}\n".encode())
    conversions.report(log, f"backgrounds in {source}")
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


def demo_backgrounds(value: str | Path, boards: int | None = None) -> Path | None:
    """The demo's default input (DEMO_BACKGROUNDS/backgrounds.jsonl: the boards with their per-class ROIs, or
    DEMO_BACKGROUNDS/global: the boards alone), rendered on first use as `make backgrounds` renders it, relative
    to the working directory; None for any other path. A render from before the ROIs is replaced whole."""
    wanted = [DEMO_BACKGROUNDS / name for name in ("backgrounds.jsonl", "global")]
    if _normal(Path(value)) not in [_normal(p) for p in wanted]:
        return None
    from dmgr.data.export import export_all  # the procedural boards, only when needed

    boards = DEMO_BOARDS if boards is None else boards
    log.info("rendering the demo's %d defect-free boards and their per-class ROIs into %s (first use; "
             "`make backgrounds` does the same)", boards, DEMO_BACKGROUNDS)
    staging = DEMO_BACKGROUNDS.with_name(f".{DEMO_BACKGROUNDS.name}.tmp-{os.getpid()}")
    old = DEMO_BACKGROUNDS.with_name(f".{DEMO_BACKGROUNDS.name}.old-{os.getpid()}")
    try:
        export_all(staging, 64, boards, 0, 0, progress=False, panel=DEMO_PANEL, roi_slack=DEMO_ROI_SLACK)
        (staging / ".exported").touch()
        if DEMO_BACKGROUNDS.is_dir() and not wanted[0].is_file():
            DEMO_BACKGROUNDS.rename(old)
        staging.rename(DEMO_BACKGROUNDS)  # whole or not at all; another worker may have finished first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    except BaseException:  # Ctrl-C or an error while rendering: no half-rendered staging folder is left
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    found = DEMO_BACKGROUNDS / Path(value).name
    return found.resolve() if found.exists() else None


def demo_patches(value: str | Path, classes: tuple[str, ...], per_class: int | None = None) -> Path | None:
    """The demo's screen data (DEMO_DATA/local: the defect patches and masks per class that `make data`
    writes, byte for byte), rendered on first use relative to the working directory; the data root, or None
    for any other path or for classes the demo does not have."""
    from dmgr.data.export import CLASS_NAMES, export_local  # the procedural patches, only when needed

    if _normal(Path(value)) != _normal(DEMO_DATA) or not set(classes) <= set(CLASS_NAMES):
        return None

    per_class = DEMO_PATCHES if per_class is None else per_class
    log.info("rendering the demo's %d defect patches per class into %s (first use; `make data` writes the same)",
             per_class, DEMO_DATA / "local")
    staging = DEMO_DATA.with_name(f".{DEMO_DATA.name}.tmp-{os.getpid()}")
    try:
        export_local(staging, 64, per_class, 0, progress=False)
        DEMO_DATA.mkdir(parents=True, exist_ok=True)
        (staging / "local").rename(DEMO_DATA / "local")  # whole or not at all; another worker may have finished
    except OSError:
        pass
    finally:  # Ctrl-C or an error while rendering: no half-rendered staging folder is left
        shutil.rmtree(staging, ignore_errors=True)
    return DEMO_DATA.resolve() if (DEMO_DATA / "local").is_dir() else None
