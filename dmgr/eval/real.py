"""Real data for evaluation, drawn from the procedural PCB domain with exact masks.

Every set comes from its own board-seed stream, so nothing here overlaps another set:

    GLOBAL_OFFSET + i   defect-free boards the global model trained on (cut-paste and Perlin backgrounds)
    LOCAL_OFFSET + i    boards whose defect patches the local model trained on (classifier, cut-paste)
    TEST_OFFSET + i     the held-out defective test boards (`python -m dmgr.data.export` writes the same)
    CLEAN_TEST + i      held-out defect-free test boards (image-level AUROC needs negatives)
    VALIDATION + i      held-out patches for checking the classifier and the real-vs-real references
    USER + i            the "few real images a user has" of the downstream benchmark (the few-defect curve's
                        N defects per class: dmgr.eval.fewshot)
    JUDGE + i           the evaluation judge's training patches (dmgr.eval.judge), read by nothing else

Panels (`panel=(W, H)`, the demo backgrounds' layout: W x H panels of `size`-px boards, row by row) hold the
same board i of each set in one tile (the same defect, exact mask); the other tiles are defect-free boards
of the same stream's sub-stream offset + PANEL_FILL + i * tiles + j, never used by anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dmgr.data.board import make_board
from dmgr.data.defects import CLASS_NAMES, add_defect
from dmgr.data.export import STREAM, TEST_OFFSET, Defect, panel_tiles
from dmgr.images import from_uint8
from dmgr.models.classifier import Patches

CLEAN_TEST = TEST_OFFSET + STREAM // 2
VALIDATION = 3 * STREAM
USER = 4 * STREAM
JUDGE = 5 * STREAM
CLEAN = len(CLASS_NAMES)  # the classifier's extra class: a defect-free patch
PATCH_CLASSES = (*CLASS_NAMES, "clean")
PANEL_FILL = STREAM // 4  # per stream: the defect-free boards around a panel's own board
Panel = tuple[int, int] | None  # (width, height) of the frames; None: one square board per frame


@dataclass
class Boards:
    """Boards with masks: images (N, 3, S, S) in [-1, 1], masks (N, 1, S, S) bool, class ids (-1: clean)."""

    images: torch.Tensor
    masks: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def in_panel(
    image: np.ndarray, mask: np.ndarray, box: list[int] | None, offset: int, i: int, size: int, panel: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Board offset + i's `image` (with `mask` and its defect's `box`; box None: a clean board) as one tile of a
    W x H panel laid out as `make_panel` lays the demo backgrounds, whose other tiles are the defect-free boards
    offset + PANEL_FILL + i * tiles + j. The tile is drawn (from the board seed) among those that hold the whole
    box inside the panel."""
    width, height = panel
    columns = -(-width // size)
    corners = [(k % columns * size, k // columns * size) for k in range(panel_tiles(size, panel))]
    x1, y1 = (box[2], box[3]) if box is not None else (1, 1)
    fits = [k for k, (x, y) in enumerate(corners) if x + x1 <= width and y + y1 <= height]
    if not fits:
        raise ValueError(f"the defect of board {offset + i} fits no tile of a {width}x{height} panel")
    pick = fits[int(np.random.default_rng((offset + i, PANEL_FILL)).integers(len(fits)))]
    fill = [offset + PANEL_FILL + i * len(corners) + k for k in range(len(corners)) if k != pick]
    tiles = [make_board(seed, size).image for seed in fill]
    tiles.insert(pick, image)
    rows = [np.concatenate(tiles[r : r + columns], 1) for r in range(0, len(tiles), columns)]
    out = np.ascontiguousarray(np.concatenate(rows, 0)[:height, :width])
    x, y = corners[pick]
    out_mask = np.zeros((height, width), dtype=bool)
    out_mask[y : y + size, x : x + size] = mask[: height - y, : width - x]
    return out, out_mask


def defective_boards(offset: int, n: int, size: int, first: int = 0, panel: Panel = None) -> Boards:
    """Boards offset + first + i with one defect each, classes in turn (i % 6), defect seed first + i; with
    `panel`, each in one tile of a W x H panel (`in_panel`)."""
    defects = [Defect(offset + i, i % len(CLASS_NAMES), i) for i in range(first, first + n)]
    return boards_of(defects, size, panel, [(offset, i) for i in range(first, first + n)])


def boards_of(
    defects: Sequence[Defect], size: int, panel: Panel = None, places: Sequence[tuple[int, int]] | None = None
) -> Boards:
    """One real defective board per defect (its board with its defect, exact mask); with `panel`, each in one
    tile of a W x H panel (`in_panel` at the defect's place (offset, i); default (board seed, 0))."""
    images, masks, classes = [], [], []
    for k, d in enumerate(defects):
        image, mask, box = add_defect(make_board(d.board_seed, size), d.class_id, d.defect_seed)
        if panel is not None:
            image, mask = in_panel(image, mask, box, *(places[k] if places else (d.board_seed, 0)), size, panel)
        images.append(image)
        masks.append(mask)
        classes.append(d.class_id)
    return Boards(from_uint8(np.stack(images)), torch.from_numpy(np.stack(masks))[:, None], torch.tensor(classes))


def clean_boards(offset: int, n: int, size: int, first: int = 0, panel: Panel = None) -> Boards:
    images = []
    for i in range(first, first + n):
        image = make_board(offset + i, size).image
        if panel is not None:
            image, _ = in_panel(image, np.zeros((size, size), dtype=bool), None, offset, i, size, panel)
        images.append(image)
    width, height = panel or (size, size)
    stacked = np.stack(images) if images else np.zeros((0, height, width, 3), dtype=np.uint8)
    return Boards(from_uint8(stacked), torch.zeros(n, 1, height, width, dtype=torch.bool), torch.full((n,), -1))


def heldout_boards(defective: int, clean: int, size: int, panel: Panel = None) -> Boards:
    """The held-out test set: `defective` boards of TEST_OFFSET (classes in turn), then `clean` ones; with
    `panel`, the same boards each in a W x H panel."""
    a = defective_boards(TEST_OFFSET, defective, size, panel=panel)
    b = clean_boards(CLEAN_TEST, clean, size, panel=panel)
    return Boards(torch.cat([a.images, b.images]), torch.cat([a.masks, b.masks]), torch.cat([a.classes, b.classes]))


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
