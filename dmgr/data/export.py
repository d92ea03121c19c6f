"""Write the procedural PCB domain as plain folders for training and evaluation.

    python -m dmgr.data.export --out outputs/pcb-data --size 64 --boards 1000 --patches-per-class 500 --test 60

    OUT/global/NNNNNN.png                    defect-free boards (the global model); with --panel WxH,
                                             W x H panels of size-px boards (native-size backgrounds)
    OUT/roi/NNNNNN.<class>.png               with --roi-slack: where each class occurs on each global image,
    OUT/backgrounds.jsonl                    and the manifest that hands both to the synthesis job
    OUT/local/<class>/NNNNNN.png, .mask.png  size//4 defect patches centred on the defect (the local model)
    OUT/local/labels.json                    one entry per patch: file, class, id, seeds, window, box
    OUT/test/NNNNNN.png, .mask.png, .json    held-out defective boards with class, id and box

The three parts draw boards from disjoint seed streams (offsets of STREAM), so the test boards are never
seen in training.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image
from pydantic import Field

from dmgr.cli import add_settings, program, settings_from, stop_on_interrupt, usage_error
from dmgr.data.board import MAX_SIZE, MIN_SIZE, Board, make_board
from dmgr.data.defects import CLASS_NAMES, add_defect, class_id_of, defect_sites
from dmgr.images import bounding_box, save_mask
from dmgr.progress import progress_bar
from dmgr.schema import STRICT_SECTION, Count, Flag

STREAM = 10_000_000
GLOBAL_OFFSET, LOCAL_OFFSET, TEST_OFFSET = 0, STREAM, 2 * STREAM


@dataclass(frozen=True)
class DataExportSettings:
    """The options of `python -m dmgr.data.export`."""

    __pydantic_config__ = STRICT_SECTION
    out: Annotated[Path, Field(description="output folder")]
    size: Annotated[int, Field(strict=True, ge=MIN_SIZE, le=MAX_SIZE,
                               description="board side in pixels (patches are size//4)")] = 64
    boards: Annotated[Count(0), Field(description="defect-free boards for OUT/global")] = 1000
    panel: Annotated[str | None, Field(description="WxH: OUT/global images are W x H panels of --size px boards "
                                                   "(e.g. 160x112), not single boards")] = None
    patches_per_class: Annotated[Count(0), Field(description="defect patches per class for OUT/local")] = 500
    test: Annotated[Count(0), Field(description="held-out defective boards for OUT/test")] = 60
    roi_slack: Annotated[float | None, Field(ge=0, description="also write per-class ROIs of the global images "
                                         "(OUT/roi/, OUT/backgrounds.jsonl): windows centred within this many px "
                                         "of a place the class occurs")] = None
    seed: Annotated[Count(0), Field(description="base seed (each part adds its own offset)")] = 0
    quiet: Annotated[Flag, Field(description="no progress bars")] = False


def board_seed(offset: int, seed: int, index: int) -> int:
    """The board seed of item `index` of a part (offset) of a run with base `seed`."""
    if not 0 <= seed + index < STREAM:
        raise ValueError(f"seed + index must be in [0, {STREAM}) to keep the parts disjoint, got {seed + index}")
    return offset + seed + index


def patch_window(box: list[int], patch: int, size: int) -> list[int]:
    """[x0, y0, x1, y1] of the patch x patch window centred on `box`, moved inside a size x size image."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(min(max(round(cx - patch / 2), 0), size - patch))
    y0 = int(min(max(round(cy - patch / 2), 0), size - patch))
    return [x0, y0, x0 + patch, y0 + patch]


def _check(size: int, **counts: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"--size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    for name, n in counts.items():
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")


def panel_tiles(size: int, panel: tuple[int, int]) -> int:
    """Boards per W x H panel of size-px boards."""
    return -(-panel[0] // size) * -(-panel[1] // size)


def make_panel(seeds: list[int], size: int, panel: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: boards of side `size` (their own pixel scale) side by side, row by row, cut to W x H."""
    return tile([make_board(s, size).image for s in seeds], panel)


def tile(tiles: list[np.ndarray], panel: tuple[int, int]) -> np.ndarray:
    """Equal square arrays (size, size, ...) side by side, row by row, cut to the W x H panel."""
    width, height = panel
    columns = -(-width // tiles[0].shape[0])
    rows = [np.concatenate(tiles[r : r + columns], 1) for r in range(0, len(tiles), columns)]
    return np.ascontiguousarray(np.concatenate(rows, 0)[:height, :width])


def class_roi(board: Board, class_name: str, window: int, slack: float) -> np.ndarray:
    """(size, size) bool: the union of squares of side window + 2 slack centred on the board's sites of the
    class (`defect_sites`), so a window lies inside it where its centre is within `slack` px of a site."""
    roi = np.zeros((board.size, board.size), dtype=bool)
    half = window / 2 + slack
    for x, y in defect_sites(board, class_name):
        x0, y0 = max(int(np.floor(x - half)), 0), max(int(np.floor(y - half)), 0)
        roi[y0 : max(int(np.ceil(y + half)), 0), x0 : max(int(np.ceil(x + half)), 0)] = True
    return roi


def export_global(out: str | Path, size: int, n: int, seed: int = 0, progress: bool = True,
                  panel: tuple[int, int] | None = None, roi_slack: float | None = None) -> list[Path]:
    """Write `n` defect-free boards (or W x H panels of them) to OUT/global/NNNNNN.png; returns their paths.

    With `roi_slack`, also each image's per-class ROIs (`class_roi`, windows of size//4) to
    OUT/roi/NNNNNN.<class>.png and the synthesis job's manifest of both to OUT/backgrounds.jsonl."""
    _check(size, boards=n)
    folder = Path(out) / "global"
    folder.mkdir(parents=True, exist_ok=True)
    if roi_slack is not None:
        (Path(out) / "roi").mkdir(exist_ok=True)
    tiles = 1 if panel is None else panel_tiles(size, panel)
    frame = panel or (size, size)
    paths, lines = [], []
    for i in progress_bar(range(n), desc="global", disable=not progress):
        boards = [make_board(board_seed(GLOBAL_OFFSET, seed, i * tiles + j), size) for j in range(tiles)]
        path = folder / f"{i:06d}.png"
        Image.fromarray(tile([b.image for b in boards], frame)).save(path)
        paths.append(path)
        if roi_slack is None:
            continue
        rois = {}
        for name in CLASS_NAMES:
            rois[name] = f"roi/{i:06d}.{name}.png"
            save_mask(tile([class_roi(b, name, size // 4, roi_slack) for b in boards], frame), Path(out) / rois[name])
        lines.append(json.dumps({"image": f"global/{i:06d}.png", "roi": rois}))
    if roi_slack is not None:
        (Path(out) / "backgrounds.jsonl").write_text("".join(f"{line}\n" for line in lines))
    return paths


@dataclass(frozen=True)
class Defect:
    """One real defect: class `class_id` drawn with `defect_seed` on the clean board `board_seed`."""

    board_seed: int
    class_id: int
    defect_seed: int


def write_patches(out: str | Path, defects: Sequence[Defect], size: int, progress: bool = True) -> list[dict]:
    """OUT/local/<class>/NNNNNN.png (+ .mask.png, NNNNNN the defect seed): the size//4 window centred on each
    defect, with OUT/local/labels.json; returns the labels. Every class of CLASS_NAMES gets a folder."""
    patch = size // 4
    root = Path(out) / "local"
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    labels = []
    for d in progress_bar(defects, desc="local", disable=not progress):
        image, mask, box = add_defect(make_board(d.board_seed, size), d.class_id, d.defect_seed)
        x0, y0, x1, y1 = window = patch_window(box, patch, size)
        crop, crop_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        name = f"{CLASS_NAMES[d.class_id]}/{d.defect_seed:06d}"
        Image.fromarray(crop).save(root / f"{name}.png")
        save_mask(crop_mask, root / f"{name}.mask.png")
        labels.append({"file": f"{name}.png", "mask": f"{name}.mask.png", "class_name": CLASS_NAMES[d.class_id],
                       "class_id": d.class_id, "board_seed": d.board_seed, "defect_seed": d.defect_seed,
                       "window": window, "box": bounding_box(crop_mask)})
    meta = {"classes": list(CLASS_NAMES), "patch_size": patch, "board_size": size, "items": labels}
    (root / "labels.json").write_text(json.dumps(meta, indent=1))
    return labels


def local_defects(per_class: int, seed: int = 0, classes: tuple[str, ...] = CLASS_NAMES) -> list[Defect]:
    """The local model's training defects: board i carries one defect of every class in turn (each on the
    clean board), defect seed i."""
    ids = [class_id_of(c) for c in classes]
    return [Defect(board_seed(LOCAL_OFFSET, seed, i), cid, i) for i in range(per_class) for cid in ids]


def export_local(out: str | Path, size: int, per_class: int, seed: int = 0,
                 classes: tuple[str, ...] = CLASS_NAMES, progress: bool = True) -> list[dict]:
    """Write `per_class` defect patches of side size//4 per class (`local_defects`); returns the labels (also
    in labels.json)."""
    _check(size, patches_per_class=per_class)
    return write_patches(out, local_defects(per_class, seed, classes), size, progress)


def export_test(out: str | Path, size: int, n: int, seed: int = 0, progress: bool = True) -> list[dict]:
    """Write `n` held-out defective boards (classes in turn) with masks and json; returns the metadata."""
    _check(size, test=n)
    folder = Path(out) / "test"
    folder.mkdir(parents=True, exist_ok=True)
    metas = []
    for i in progress_bar(range(n), desc="test", disable=not progress):
        bseed = board_seed(TEST_OFFSET, seed, i)
        cid = i % len(CLASS_NAMES)
        image, mask, box = add_defect(make_board(bseed, size), cid, i)
        Image.fromarray(image).save(folder / f"{i:06d}.png")
        save_mask(mask, folder / f"{i:06d}.mask.png")
        meta = {"class_name": CLASS_NAMES[cid], "class_id": cid, "box": box, "mask_area": int(mask.sum()),
                "board_seed": bseed, "defect_seed": i, "size": size}
        (folder / f"{i:06d}.json").write_text(json.dumps(meta))
        metas.append(meta)
    return metas


def export_all(out: str | Path, size: int, boards: int, per_class: int, test: int, seed: int = 0,
               progress: bool = True, panel: tuple[int, int] | None = None, roi_slack: float | None = None) -> None:
    export_global(out, size, boards, seed, progress, panel, roi_slack)
    export_local(out, size, per_class, seed, progress=progress)
    export_test(out, size, test, seed, progress)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.data.export"), description=__doc__.split("\n\n")[0])
    add_settings(p, DataExportSettings)
    return p


@stop_on_interrupt(program("dmgr.data.export"))
def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = settings_from(cli, cli.parse_args(argv), DataExportSettings)
    try:
        panel = parse_panel(args.panel)
        tiles = 1 if panel is None else panel_tiles(args.size, panel)
        board_seed(0, args.seed, max(args.boards * tiles, args.patches_per_class, args.test, 1) - 1)
    except ValueError as err:
        usage_error(cli.prog, str(err))
    export_all(args.out, args.size, args.boards, args.patches_per_class, args.test, args.seed, not args.quiet, panel,
               args.roi_slack)
    print(json.dumps({"out": str(args.out), "global": args.boards, "local_per_class": args.patches_per_class,
                      "test": args.test, "size": args.size, "patch": args.size // 4,
                      **({"panel": list(panel)} if panel else {})}))


def parse_panel(text: str | None) -> tuple[int, int] | None:
    """"160x112" -> (160, 112); None stays None."""
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--panel={text}: give WxH in pixels, e.g. 160x112") from None
    if min(width, height) < 1 or max(width, height) > 16384:
        raise ValueError(f"--panel={text}: W and H must be in [1, 16384]")
    return width, height


if __name__ == "__main__":
    main()
