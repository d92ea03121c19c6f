"""A contact sheet to eyeball the procedural domain: per board size, the clean board and one defect of
each class (mask outlined in red), then the size//4 patches centred on each defect.

    python -m dmgr.data.sheet --out /tmp/pcb_sheet.png --seed 3 --sizes 256 64
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from dmgr.cli import add_settings, program, settings_from, stop_on_interrupt
from dmgr.data.board import MAX_SIZE, MIN_SIZE, make_board
from dmgr.data.defects import CLASS_NAMES, add_defect
from dmgr.data.export import patch_window
from dmgr.schema import STRICT_SECTION, fail

LABEL = 14


@dataclass(frozen=True)
class SheetSettings:
    """The options of `python -m dmgr.data.sheet`."""

    __pydantic_config__ = STRICT_SECTION
    out: Annotated[Path, Field(description="the sheet's PNG")] = Path("pcb_sheet.png")
    seed: Annotated[int, Field(description="board seed")] = 3
    defect_seed: Annotated[int, Field(description="defect seed")] = 0
    sizes: Annotated[tuple[int, ...], Field(description="board sides in pixels, two rows each")] = (256, 64)

    def __post_init__(self) -> None:
        if not all(MIN_SIZE <= size <= MAX_SIZE for size in self.sizes):
            fail("sizes", list(self.sizes), f"each board side must be in [{MIN_SIZE}, {MAX_SIZE}]")


def outlined_tile(image: np.ndarray, cell: int, mask: np.ndarray | None = None) -> np.ndarray:
    """`image` (H, W, 3) uint8 scaled (nearest) to cell x cell, with the outline of the bool `mask`
    drawn in red just outside it (2 px; it does not wrap around the image edges)."""
    big = np.asarray(Image.fromarray(image).resize((cell, cell), Image.NEAREST)).copy()
    if mask is not None:
        m = np.asarray(Image.fromarray(mask).resize((cell, cell), Image.NEAREST))
        grown = m.copy()
        for _ in range(2):
            p = np.pad(grown, 1)
            grown = grown | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        big[grown & ~m] = (255, 0, 0)
    return big


def domain_sheet(seed: int = SheetSettings.seed, sizes: Sequence[int] = SheetSettings.sizes,
                 defect_seed: int = SheetSettings.defect_seed, cell: int = 192) -> Image.Image:
    rows = []
    for size in sizes:
        board = make_board(seed, size)
        boards, patches = [outlined_tile(board.image, cell)], [outlined_tile(board.image, cell)]
        for cid in range(len(CLASS_NAMES)):
            image, mask, box = add_defect(board, cid, defect_seed)
            boards.append(outlined_tile(image, cell, mask))
            x0, y0, x1, y1 = patch_window(box, size // 4, size)
            patches.append(outlined_tile(image[y0:y1, x0:x1], cell))
        for tiles, what in ((boards, "board"), (patches, "patch")):
            row = Image.new("RGB", (cell * len(tiles), cell + LABEL), "white")
            draw = ImageDraw.Draw(row)
            for i, tile in enumerate(tiles):
                row.paste(Image.fromarray(tile), (i * cell, LABEL))
                name = ("clean",) + CLASS_NAMES
                draw.text((i * cell + 3, 1), f"{size}px {what} {name[i]}", fill=(0, 0, 0))
            rows.append(row)
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    return sheet


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.data.sheet"), description=__doc__.split("\n\n")[0])
    add_settings(p, SheetSettings)
    return p


@stop_on_interrupt(program("dmgr.data.sheet"))
def main(argv: list[str] | None = None) -> None:
    cli = parser()
    settings = settings_from(cli, cli.parse_args(argv), SheetSettings)
    domain_sheet(settings.seed, settings.sizes, settings.defect_seed).save(settings.out)
    print(settings.out)


if __name__ == "__main__":
    main()
