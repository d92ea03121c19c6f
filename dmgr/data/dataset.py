"""Torch datasets over the exported folders (OUT/global, OUT/local) for the training command.

The global model learns from `TileDataset`: random image_size tiles of the defect-free images resized by
`scale` (model pixels per image pixel, synthesis's `dataset.scale`), drawn by `TileSampler` from generators
keyed by (seed, rank, step). In the other datasets flipping is deterministic (no random generator): with
flip=True the dataset is twice as long and item n + i is item i mirrored left-right.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
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


class TileDataset(Dataset):
    """Tiles of the images under `root` (recursive, masks left out) at `scale`: each image is resized by
    `scale`, then item (i, u, v, flip) is the size x size tile of image i whose top-left is u, v in [0, 1) of
    the free range, mirrored left-right when flip. Images smaller than one tile are skipped and counted
    (one warning); none usable is a TileError (key: the scale's setting, for the message)."""

    def __init__(self, root: str | Path, size: int, scale: float = 1.0, key: str = "scale", cached: int = 8) -> None:
        files = list_images(root)
        if not files:
            raise FileNotFoundError(f"no images under {root}")
        sizes = [upright_size(f) for f in files]
        self.files = [f for f, wh in zip(files, sizes) if holds_tile(wh, size, scale)]
        self.skipped = [str(f) for f, wh in zip(files, sizes) if not holds_tile(wh, size, scale)]
        if not self.files:
            raise TileError(too_small_error(f"under {root}", sizes, size, scale, key))
        if self.skipped:
            log.warning("%d of %d images under %s are smaller than one %d px tile at %s=%g: skipped, e.g. %s",
                        len(self.skipped), len(files), root, size, key, scale, self.skipped[0])
        self.size, self.scale, self.cached = size, scale, cached
        self._frames: OrderedDict[int, Image.Image] = OrderedDict()

    def __len__(self) -> int:
        return len(self.files)

    def frame(self, i: int) -> Image.Image:
        """Image i resized by the scale (the last `cached` kept)."""
        if i not in self._frames:
            self._frames[i] = resize_by(load_rgb(self.files[i]), self.scale)
            while len(self._frames) > self.cached:
                self._frames.popitem(last=False)
        self._frames.move_to_end(i)
        return self._frames[i]

    def __getitem__(self, key: tuple[int, float, float, bool]) -> torch.Tensor:
        i, u, v, flip = key
        img = self.frame(i)
        x = min(int(u * (img.width - self.size + 1)), img.width - self.size)
        y = min(int(v * (img.height - self.size + 1)), img.height - self.size)
        tile = to_tensor(img.crop((x, y, x + self.size, y + self.size)))
        return tile.flip(-1) if flip else tile


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
    """

    def __init__(self, root: str | Path, classes: Sequence[str] = CLASS_NAMES, size: int | None = None,
                 flip: bool = False, with_masks: bool = False) -> None:
        root = Path(root)
        self.classes = tuple(classes)
        self.items = [(p, k) for k, c in enumerate(self.classes) for p in list_images(root / c, recursive=False)]
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

    def __len__(self) -> int:
        return len(self.items) * (2 if self.flip else 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.items)
        path, label = self.items[i % n]
        x = to_tensor(load_rgb(path), self.size)
        if self.with_masks:
            with Image.open(mask_path(path)) as mask:
                x = torch.cat([x, mask_to_tensor(mask, self.size)])
        return (x.flip(-1) if i >= n else x), label
