"""Real data for evaluation, drawn from the procedural PCB domain with exact masks.

Every set comes from its own board-seed stream, so nothing here overlaps another set:

    GLOBAL_OFFSET + i   defect-free boards the global model trained on (cut-paste and Perlin backgrounds)
    LOCAL_OFFSET + i    boards whose defect patches the local model trained on (classifier, cut-paste)
    TEST_OFFSET + i     the held-out defective test boards (`python -m dmgr.data.export` writes the same)
    CLEAN_TEST + i      held-out defect-free test boards (image-level AUROC needs negatives)
    VALIDATION + i      held-out patches for checking the classifier and the real-vs-real references
    USER + i            the "few real images a user has" of the downstream benchmark
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dmgr.data.board import make_board
from dmgr.data.defects import CLASS_NAMES, add_defect
from dmgr.data.export import STREAM, TEST_OFFSET
from dmgr.images import from_uint8

CLEAN_TEST = TEST_OFFSET + STREAM // 2
VALIDATION = 3 * STREAM
USER = 4 * STREAM
CLEAN = len(CLASS_NAMES)  # the classifier's extra class: a defect-free patch
PATCH_CLASSES = (*CLASS_NAMES, "clean")


@dataclass
class Boards:
    """Boards with masks: images (N, 3, S, S) in [-1, 1], masks (N, 1, S, S) bool, class ids (-1: clean)."""

    images: torch.Tensor
    masks: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def defective_boards(offset: int, n: int, size: int, first: int = 0) -> Boards:
    """Boards offset + first + i with one defect each, classes in turn (i % 6), defect seed first + i."""
    images, masks, classes = [], [], []
    for i in range(first, first + n):
        class_id = i % len(CLASS_NAMES)
        image, mask, _ = add_defect(make_board(offset + i, size), class_id, i)
        images.append(image)
        masks.append(mask)
        classes.append(class_id)
    return Boards(from_uint8(np.stack(images)), torch.from_numpy(np.stack(masks))[:, None], torch.tensor(classes))


def clean_boards(offset: int, n: int, size: int, first: int = 0) -> Boards:
    images = np.stack([make_board(offset + i, size).image for i in range(first, first + n)])
    return Boards(from_uint8(images), torch.zeros(n, 1, size, size, dtype=torch.bool), torch.full((n,), -1))


def heldout_boards(defective: int, clean: int, size: int) -> Boards:
    """The held-out test set: `defective` boards of TEST_OFFSET (classes in turn), then `clean` ones."""
    a, b = defective_boards(TEST_OFFSET, defective, size), clean_boards(CLEAN_TEST, clean, size)
    return Boards(torch.cat([a.images, b.images]), torch.cat([a.masks, b.masks]), torch.cat([a.classes, b.classes]))


@dataclass
class Patches:
    """Window-sized crops: images (N, 3, w, w) in [-1, 1], masks (N, 1, w, w), labels 0-5 defect, 6 clean."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor


def defect_patches(offset: int, per_class: int, size: int, window: int, jitter: int, seed: int) -> Patches:
    """Per board offset + i: one window around each class's defect (centre moved by up to `jitter` px),
    and the window of class i % 6 also cut from the clean board, labelled clean (a hard negative: the same
    place without the defect). 7 * per_class patches, per_class of each label."""
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for i in range(per_class):
        board = make_board(offset + i, size)
        for class_id in range(len(CLASS_NAMES)):
            image, mask, box = add_defect(board, class_id, i)
            cx = (box[0] + box[2]) // 2 + int(rng.integers(-jitter, jitter + 1))
            cy = (box[1] + box[3]) // 2 + int(rng.integers(-jitter, jitter + 1))
            x = int(np.clip(cx - window // 2, 0, size - window))
            y = int(np.clip(cy - window // 2, 0, size - window))
            crops = [(image, mask, class_id)]
            if class_id == i % len(CLASS_NAMES):
                crops.append((board.image, np.zeros_like(mask), CLEAN))
            for crop, crop_mask, label in crops:
                images.append(crop[y : y + window, x : x + window])
                masks.append(crop_mask[y : y + window, x : x + window])
                labels.append(label)
    return Patches(from_uint8(np.stack(images)), torch.from_numpy(np.stack(masks))[:, None], torch.tensor(labels))
