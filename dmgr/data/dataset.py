"""Torch datasets over the exported folders (OUT/global, OUT/local) for the training command.

Flipping is deterministic (no random generator): with flip=True the dataset is twice as long and item
n + i is item i mirrored left-right.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dmgr.data.defects import CLASS_NAMES
from dmgr.images import list_images, load_rgb, resize_center_crop


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
