"""Tiles of large frames for detectors trained at a fixed input size (`--tile SIZE`).

A frame larger than SIZE on either side becomes SIZE x SIZE tiles (narrower where the frame is): one centred on
every defect (a defect already whole inside an earlier tile gets none of its own), and defect-free tiles from the
frame's grid, `background` of them per defect tile (rounded half up), chosen by a hash of the frame and the tile's
place. Every defect is clipped to each tile it reaches; a tile records its frame, offset and the frame's size.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from dmgr.export.items import Item, png_bytes


def _start(centre: float, size: int, length: int) -> int:
    return int(min(max(round(centre - size / 2), 0), length - size))


def _grid(length: int, size: int) -> list[int]:
    starts = list(range(0, length - size + 1, size))
    return starts if starts[-1] == length - size else [*starts, length - size]


def tile_places(labels: list[tuple[int, np.ndarray]], width: int, height: int, size: int,
                background: float, name: str) -> list[tuple[int, int]]:
    """Top-left corners of the tiles of one frame: defect tiles first, then the chosen defect-free ones."""
    tw, th = min(size, width), min(size, height)
    union = np.zeros((height, width), dtype=bool)
    places: list[tuple[int, int]] = []
    for _, mask in labels:
        if not mask.any():
            continue
        union |= mask
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        if any(px <= x0 and x1 <= px + tw and py <= y0 and y1 <= py + th for px, py in places):
            continue
        places.append((_start((x0 + x1) / 2, tw, width), _start((y0 + y1) / 2, th, height)))
    free = [(x, y) for y in _grid(height, th) for x in _grid(width, tw) if not union[y:y + th, x:x + tw].any()]
    free.sort(key=lambda p: hashlib.sha256(f"{name}:{p[0]}:{p[1]}".encode()).hexdigest())
    return places + free[:int(background * len(places) + 0.5)]  # half up: 0.5 x one defect tile gives one


def tile_item(item: Item, size: int, background: float) -> list[Item]:
    """The item itself when it fits in a size x size tile, else its tiles."""
    width, height = item.size
    if width <= size and height <= size:
        return [item]
    places = tile_places(item.labels, width, height, size, background, item.name)
    if not places:
        return []
    tw, th = min(size, width), min(size, height)
    with Image.open(io.BytesIO(item.png)) as frame:
        frame.load()
        tiles = []
        for x, y in places:
            labels = [(cls, mask[y:y + th, x:x + tw]) for cls, mask in item.labels if mask[y:y + th, x:x + tw].any()]
            source = {**item.source, "frame": item.name, "offset": [x, y], "frame_size": [width, height]}
            png = png_bytes(frame.crop((x, y, x + tw, y + th)))
            tiles.append(Item(f"{item.name}_{x}_{y}", png, (tw, th), labels, item.split, source))
    return tiles


def tiled(item: Item, options: dict) -> list[Item]:
    """The item as the export writes it: whole, or its tiles with `--tile`."""
    return tile_item(item, options["tile"], float(options["tile_background"])) if options.get("tile") else [item]
