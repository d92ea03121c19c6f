"""Contact sheet of a shard: image, mask overlay with the window, and the crop, one sample per row.

python -m dmgr.preview outputs/<run>/shards/dmgr-000000.tar --out sheet.png --max 16
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from pydantic import Field

from dmgr.cli import add_settings, program, settings_from, stop_on_interrupt
from dmgr.schema import STRICT_SECTION, Count

LABEL_HEIGHT = 14


@dataclass(frozen=True)
class PreviewSettings:
    """The options of `python -m dmgr.preview`."""

    __pydantic_config__ = STRICT_SECTION
    out: Annotated[str, Field(description="output PNG")] = "preview.png"
    max: Annotated[Count(), Field(description="samples to show")] = 16
    cell: Annotated[Count(), Field(description="pixel size of each tile")] = 128
    columns: Annotated[Count(), Field(description="samples side by side")] = 2


def overlay(image: Image.Image, mask: Image.Image, *window_boxes: list[int]) -> Image.Image:
    """The image with the mask tinted red and the window(s) outlined in yellow."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    m = (np.asarray(mask.convert("L")) > 127)[..., None]
    tinted = np.where(m, 0.45 * rgb + 0.55 * np.array([255, 0, 0]), rgb).astype(np.uint8)
    out = Image.fromarray(tinted)
    for x0, y0, x1, y1 in window_boxes:
        ImageDraw.Draw(out).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 220, 0))
    return out


def whole(tile: Image.Image, cell: int) -> Image.Image:
    """The whole tile scaled to fit a cell x cell square, its aspect ratio kept (nearest neighbour, so
    pixels stay visible; a box filter when shrinking a large frame)."""
    f = cell / max(tile.size)
    size = (max(1, round(tile.width * f)), max(1, round(tile.height * f)))
    return tile.resize(size, Image.NEAREST if f >= 1 else Image.BOX)


def sample_row(sample: dict, cell: int) -> Image.Image:
    image, mask, meta = sample["png"], sample["mask.png"], sample["json"]
    x0, y0, x1, y1 = meta["window_box"]
    crop = sample.get("crop.png") or image.crop((x0, y0, x1, y1))
    boxes = [d["window_box"] for d in meta.get("defects", [meta])]
    tiles = [image, overlay(image, mask, *boxes), crop]
    if "input.png" in sample:  # real backgrounds: the input, and its window beside the result's
        given = sample["input.png"]
        tiles = [given, *tiles[:2], given.crop((x0, y0, x1, y1)), image.crop((x0, y0, x1, y1))]
    if "twin.png" in sample:
        tiles.append(sample["twin.png"])
    row = Image.new("RGB", (cell * len(tiles), cell + LABEL_HEIGHT), "white")
    for i, tile in enumerate(tiles):
        fitted = whole(tile.convert("RGB"), cell)
        row.paste(fitted, (i * cell + (cell - fitted.width) // 2, LABEL_HEIGHT + (cell - fitted.height) // 2))
    label = f"seed {meta['seed']}  {meta['class_name']}  mask {meta['mask_area']} px"
    ImageDraw.Draw(row).text((2, 1), label, fill=(0, 0, 0))
    return row


class PreviewError(ValueError):
    pass


def shard_rows(shard: str, cell: int, limit: int) -> list[Image.Image]:
    """Up to `limit` rows from one shard; a damaged shard or sample is a PreviewError naming it."""
    rows = []
    try:
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False).decode("pil"):
            if len(rows) >= limit:
                break
            rows.append(sample_row(sample, cell))
    except Exception as exc:  # noqa: BLE001 - any reader or decoder failure: the shard is damaged
        reason = " ".join(str(exc).split())[:200]
        raise PreviewError(f"{shard}: unreadable after {len(rows)} sample(s) ({type(exc).__name__}: {reason}); "
                           "a rerun of the synthesis command repairs a run's damaged shard") from None
    return rows


def contact_sheet(shards: list[str], max_samples: int = PreviewSettings.max, cell: int = PreviewSettings.cell,
                  columns: int = PreviewSettings.columns) -> Image.Image:
    rows = []
    for shard in shards:
        rows += shard_rows(shard, cell, max_samples - len(rows))
        if len(rows) >= max_samples:
            break
    if not rows:
        raise PreviewError(f"no samples in {', '.join(shards) or 'the given paths'}")
    width, height = rows[0].width, max(r.height for r in rows)
    count_rows = (len(rows) + columns - 1) // columns
    sheet = Image.new("RGB", (width * min(columns, len(rows)), height * count_rows), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, ((i % columns) * width, (i // columns) * height))
    return sheet


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.preview"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard tar files (or a run's shards/ folder)")
    add_settings(p, PreviewSettings)
    return p


@stop_on_interrupt(program("dmgr.preview"))
def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    settings = settings_from(cli, args, PreviewSettings)
    shards = []
    for item in args.shards:
        path = Path(item)
        shards += sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else [str(path)]
    try:
        sheet = contact_sheet(shards, settings.max, settings.cell, settings.columns)
        sheet.save(settings.out)
    except (PreviewError, OSError, ValueError) as exc:
        print(f"{cli.prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {settings.out} ({sheet.width}x{sheet.height}) from {len(shards)} shard(s)")


if __name__ == "__main__":
    main()
