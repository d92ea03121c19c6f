"""Torch datasets over the exported folders (OUT/global, OUT/local) for the training command.

The global model learns from `TileDataset`: random image_size tiles of the defect-free images resized by
`scale` (model pixels per image pixel, synthesis's `dataset.scale`), drawn by `TileSampler` from generators
keyed by (seed, rank, step). Each frame is decoded and resized once into a frame cache (uint8 .npy, one
channel for grey frames, memory-mapped; keyed by the file's content and the scale), so a tile costs a crop,
not a PNG decode: the loader keeps up with a GPU at any frame size. `PatchDataset` holds its patches as one
tensor. In the other datasets flipping is deterministic (no random generator): with flip=True the dataset
is twice as long and item n + i is item i mirrored left-right.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dmgr.data.defects import CLASS_NAMES
from dmgr.images import list_images, load_rgb, resize_center_crop
from dmgr.sampler.noise import generator, stream_seed
from dmgr.synth.backgrounds import fitting_scale

log = logging.getLogger(__name__)
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (decode_rgb turns them upright)


def to_tensor(img, size: int | None = None) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from a PIL image (resized and centre-cropped to `size` if given)."""
    if size is not None:
        img = resize_center_crop(img, size)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Every image under `root` (recursive, masks left out) as a (3, size, size) tensor in [-1, 1]."""

    def __init__(self, root: str | Path, size: int, flip: bool = False) -> None:
        self.files = list_images(root)
        if not self.files:
            raise FileNotFoundError(f"no images under {root}")
        self.size, self.flip = size, flip

    def __len__(self) -> int:
        return len(self.files) * (2 if self.flip else 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self.files)
        x = to_tensor(load_rgb(self.files[i % n]), self.size)
        return x.flip(-1) if i >= n else x


class TileError(ValueError):
    """No image holds one tile at the scale."""


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(width, height) of an image of `size` resized by `scale`."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def holds_tile(size: tuple[int, int], tile: int, scale: float) -> bool:
    """Whether an image of `size` (width, height) resized by `scale` holds one tile x tile square."""
    return min(scaled_size(size, scale)) >= tile


def resize_by(img: Image.Image, scale: float) -> Image.Image:
    """The image resized by `scale`: bilinear, antialiased when shrinking (the filter of synthesis's context
    crops); unchanged at its own size."""
    size = scaled_size(img.size, scale)
    return img if size == img.size else img.resize(size, Image.BILINEAR)


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image `decode_rgb` makes of this file, from its header."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112) in ROTATED else (w, h)


def too_small_error(what: str, sizes: Sequence[tuple[int, int]], tile: int, scale: float, key: str) -> str:
    """The one line for a folder of which no image holds a tile at `scale` (`key`: the setting to change)."""
    largest = max(sizes, key=min)
    return (f"none of the {len(sizes)} images {what} holds one {tile} px tile at {key}={scale:g} (the largest, "
            f"{largest[0]}x{largest[1]}, holds one from {key}={fitting_scale(tile, min(largest)):g} up): raise "
            f"{key} or give larger images")


def cpus_given() -> int:
    """The CPUs this process may run on (its affinity mask: what a job scheduler gave it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def frame_key(path: Path, scale: float) -> str:
    """The cache key of one frame at `scale`: its content (sha256 of the file) and the scale."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]
    return f"{digest}-{float(scale)!r}"


def frame_array(path: Path, scale: float) -> np.ndarray:
    """(H, W, C) uint8 of the image resized by `scale`: C = 1 when its three channels are equal (grey)."""
    arr = np.asarray(resize_by(load_rgb(path), scale))
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., :1]
    return np.ascontiguousarray(arr)


def default_cache(root: Path) -> Path:
    """ROOT/.frames, or a folder under the temporary directory when ROOT is not writable."""
    folder = Path(root) / ".frames"
    try:
        folder.mkdir(exist_ok=True)
        return folder
    except OSError:
        return Path(tempfile.gettempdir()) / "dmgr-frames"


def build_frame_cache(files: Sequence[Path], scale: float, folder: Path, workers: int | None = None) -> list[Path]:
    """The cache file of each frame (FOLDER/<key>.npy), decoding the missing ones on `workers` threads (default:
    the CPUs given); written atomically, so ranks and workers may build the same cache at once."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{frame_key(f, scale)}.npy" for f in files]
    missing = [(f, p) for f, p in zip(files, paths) if not p.is_file()]

    def write(item: tuple[Path, Path]) -> None:
        src, dst = item
        tmp = dst.with_name(f"{dst.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, frame_array(src, scale))
        tmp.replace(dst)

    if missing:
        log.info("decoding %d frames at scale %g into the frame cache %s", len(missing), scale, folder)
        with ThreadPoolExecutor(max(1, workers or cpus_given())) as pool:
            list(pool.map(write, missing))
    return paths


class TileDataset(Dataset):
    """Tiles of the images under `root` (recursive, masks left out) at `scale`: each image is resized by
    `scale`, then item (i, u, v, flip) is the size x size tile of image i whose top-left is u, v in [0, 1) of
    the free range, mirrored left-right when flip. Images smaller than one tile are skipped and counted
    (one warning); none usable is a TileError (key: the scale's setting, for the message).

    Frames come from the frame cache (`cache`: a folder, default ROOT/.frames; built here on first use):
    the same tiles as decoding each frame, at the cost of a crop. cache=False decodes each tile's frame.
    raw=True gives the tiles as (3, size, size) uint8, a quarter of the bytes between loader workers and to
    the device; `to_model_range` turns them into the float tiles, the same values."""

    def __init__(self, root: str | Path, size: int, scale: float = 1.0, key: str = "scale",
                 cache: Path | bool = True, exclude: Collection[str] = (), raw: bool = False) -> None:
        files = [f for f in list_images(root) if f.name not in exclude]
        if not files:
            raise FileNotFoundError(f"no images under {root}")
        self.size, self.scale, self.raw = size, scale, raw
        self._frames: dict[int, np.ndarray] = {}
        if cache is False:
            self.cached = None
            fits = [holds_tile(upright_size(f), size, scale) for f in files]
        else:  # the cached frames' shapes are their sizes at the scale: no header is read twice
            folder = default_cache(Path(root)) if cache is True else Path(cache)
            paths = build_frame_cache(files, scale, folder)
            arrays = [np.load(p, mmap_mode="r") for p in paths]
            fits = [min(a.shape[:2]) >= size for a in arrays]
            self.cached = [p for p, ok in zip(paths, fits) if ok]
            self._frames = dict(enumerate(a for a, ok in zip(arrays, fits) if ok))
        self.files = [f for f, ok in zip(files, fits) if ok]
        self.skipped = [str(f) for f, ok in zip(files, fits) if not ok]
        if not self.files:
            raise TileError(too_small_error(f"under {root}", [upright_size(f) for f in files], size, scale, key))
        if self.skipped:
            log.warning("%d of %d images under %s are smaller than one %d px tile at %s=%g: skipped, e.g. %s",
                        len(self.skipped), len(files), root, size, key, scale, self.skipped[0])

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self) -> dict:  # a spawned loader worker maps the cache files again, never copies them
        return {**self.__dict__, "_frames": {}}

    def frame(self, i: int) -> np.ndarray:
        """Image i resized by the scale, (H, W, C) uint8: memory-mapped from the cache, else decoded."""
        if self.cached is None:
            return frame_array(self.files[i], self.scale)
        if i not in self._frames:
            self._frames[i] = np.load(self.cached[i], mmap_mode="r")
        return self._frames[i]

    def __getitem__(self, key: tuple[int, float, float, bool]) -> torch.Tensor:
        i, u, v, flip = key
        img = self.frame(i)
        height, width = img.shape[:2]
        x = min(int(u * (width - self.size + 1)), width - self.size)
        y = min(int(v * (height - self.size + 1)), height - self.size)
        crop = img[y:y + self.size, x:x + self.size]
        tile = torch.from_numpy(np.array(crop[:, ::-1] if flip else crop)).permute(2, 0, 1).expand(3, -1, -1)
        return tile.contiguous() if self.raw else to_model_range(tile)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [-1, 1] (v / 127.5 - 1, as `to_tensor`); float tensors unchanged."""
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x


class TileSampler:
    """A batch sampler for `TileDataset`: the keys of one batch per training step from `start` to `stop`, each
    step's (image, position, flip) drawn from its own generator keyed by (seed, rank, step): the same tiles
    for the same step whatever the workers, the resumed step or the global random state."""

    def __init__(self, images: int, batch_size: int, seed: int, rank: int, start: int, stop: int) -> None:
        self.images, self.batch_size, self.seed, self.rank = images, batch_size, seed, rank
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def batch(self, step: int) -> list[tuple[int, float, float, bool]]:
        g = generator(stream_seed(self.seed, "tiles", self.rank, step))
        index = torch.randint(0, self.images, (self.batch_size,), generator=g).tolist()
        u, v, flip = torch.rand(3, self.batch_size, generator=g, dtype=torch.float64).tolist()
        return [(i, a, b, c < 0.5) for i, a, b, c in zip(index, u, v, flip)]

    def __iter__(self) -> Iterator[list[tuple[int, float, float, bool]]]:
        return (self.batch(step) for step in range(self.start, self.stop))


def mask_path(image: Path) -> Path:
    """The defect mask beside a patch: NAME.png -> NAME.mask.png."""
    return image.with_name(image.stem + ".mask.png")


def mask_to_tensor(img, size: int | None = None) -> torch.Tensor:
    """(1, H, W) float32: -1 background, +1 defect, from an L mask (non-zero = defect)."""
    img = img.convert("L")
    if size is not None and img.size != (size, size):
        img = resize_center_crop(img, size, nearest=True)
    arr = (np.asarray(img) > 0).astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(arr)[None]


class PatchDataset(Dataset):
    """(patch tensor in [-1, 1], class id) from root/<class>/*.png; the id is the class's position in `classes`.

    with_masks=True appends the defect mask (root/<class>/NAME.mask.png) as a fourth channel, -1 background
    and +1 defect: the training data of a local model that generates each defect together with its mask.
    The patches are decoded once, at construction, and held as tensors (one stacked tensor when they share
    a size). `exclude` leaves out patches by their path relative to root (`<class>/NAME.png`), `only` keeps
    just those: training's held-out slice.
    """

    def __init__(self, root: str | Path, classes: Sequence[str] = CLASS_NAMES, size: int | None = None,
                 flip: bool = False, with_masks: bool = False, exclude: Collection[str] = (),
                 only: Collection[str] | None = None) -> None:
        root = Path(root)
        self.classes = tuple(classes)
        self.items = [(p, k) for k, c in enumerate(self.classes) for p in list_images(root / c, recursive=False)
                      if f"{c}/{p.name}" not in exclude and (only is None or f"{c}/{p.name}" in only)]
        if not self.items:
            raise FileNotFoundError(f"no patches under {root}/<class>/ for classes {', '.join(self.classes)}")
        if with_masks:
            missing = [p for p, _ in self.items if not mask_path(p).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} patches have no mask beside them, e.g. {mask_path(missing[0])}: "
                    "a mask-generating local model needs NAME.mask.png for every NAME.png"
                )
        self.size, self.flip, self.with_masks = size, flip, with_masks
        patches = [self.decode(path) for path, _ in self.items]
        shapes = {p.shape for p in patches}
        self.patches = torch.stack(patches) if len(shapes) == 1 else patches
        self.labels = [label for _, label in self.items]

    def decode(self, path: Path) -> torch.Tensor:
        x = to_tensor(load_rgb(path), self.size)
        if self.with_masks:
            with Image.open(mask_path(path)) as mask:
                x = torch.cat([x, mask_to_tensor(mask, self.size)])
        return x

    def __len__(self) -> int:
        return len(self.items) * (2 if self.flip else 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.items)
        x = self.patches[i % n]
        return (x.flip(-1) if i >= n else x), self.labels[i % n]
