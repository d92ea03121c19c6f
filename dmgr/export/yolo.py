"""YOLO (Ultralytics) labels: OUT/images/{train,val}/<name>.png, OUT/labels/{train,val}/<name>.txt, OUT/data.yaml.

Segmentation (default): one line per connected part of each defect's mask, `class x1 y1 x2 y2 ...`, the
part's outer outline along pixel edges moved 1/64 px inward (so that OpenCV's `fillPoly`, which Ultralytics
rasterises with, gives back the part's pixels), normalised to [0, 1]. data.yaml has no `path`: Ultralytics
resolves `train`/`val` against the folder data.yaml is in, so a moved export trains on its own images.
With boxes=True (`--boxes`): one line per defect, `class cx cy w h` of its mask's bounding box. Defects with
an empty mask get no line (counted). With tiles, OUT/tiles.json maps each tile to its frame and offset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import yaml

from dmgr.export.common import Run, Sample, write_atomic, write_json
from dmgr.export.items import SPLITS, Item, sample_item
from dmgr.export.polygons import components, inset, outline
from dmgr.export.tiles import tiled

log = logging.getLogger(__name__)


def _num(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".")


def label_lines(labels: list[tuple[int, np.ndarray]], boxes: bool) -> tuple[list[str], int]:
    lines, empty = [], 0
    for cls, own in labels:
        if not own.any():
            empty += 1
            continue
        height, width = own.shape
        if boxes:
            ys, xs = np.nonzero(own)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            values = [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
            lines.append(" ".join([str(cls), *map(_num, values)]))
            continue
        for part in components(own):
            points = [v for x, y in inset(outline(part)) for v in (x / width, y / height)]
            lines.append(" ".join([str(cls), *map(_num, points)]))
    return lines, empty


def write_item(item: Item, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    lines, empty = label_lines(item.labels, bool(options.get("boxes")))
    image = f"images/{item.split}/{item.name}.png"
    files = {image: item.png, f"labels/{item.split}/{item.name}.txt": "".join(f"{line}\n" for line in lines).encode()}
    record = {"split": item.split, "lines": len(lines), "empty": empty}
    return files, ({**record, "tile": {"image": image, **item.source}} if "offset" in item.source else record)


def write_sample(sample: Sample, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    """The sample's frame (or its tiles) in one record; its defects with an empty mask counted once."""
    item = sample_item(sample, float(options["val"]))
    files, record = {}, {"images": {s: 0 for s in SPLITS}, "lines": 0, "tiles": [],
                         "empty": sum(not mask.any() for _, mask in item.labels)}
    for part in tiled(item, options):
        written, r = write_item(part, run, options)
        files.update(written)
        record["images"][r["split"]] += 1
        record["lines"] += r["lines"]
        record["tiles"] += [r["tile"]] if "tile" in r else []
    return files, record


def finish(run: Run, out: Path, records: Callable[[], Iterator[dict]], options: dict) -> dict:
    counts = {"images": {s: 0 for s in SPLITS}, "labels": 0, "empty_defects": 0}
    tiles = {}
    for r in records():
        for split, n in (r["images"].items() if "images" in r else [(r["split"], 1)]):
            counts["images"][split] += n
        counts["labels"] += r["lines"]
        counts["empty_defects"] += r["empty"]
        for tile in r.get("tiles", [r["tile"]] if "tile" in r else []):
            tiles[tile["image"]] = {k: v for k, v in tile.items() if k != "image"}
    for split in SPLITS:  # Ultralytics needs both folders, even an empty one
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    if options.get("tile"):
        write_json(out / "tiles.json", {"tile": options["tile"], "tiles": tiles})
        counts["tiles"] = len(tiles)
    # no `path`: Ultralytics then resolves train/val against the folder holding data.yaml, wherever it is moved;
    # it cannot train without val images, so an empty val split names the train images (and says so)
    val = "images/val" if counts["images"]["val"] else "images/train"
    if not counts["images"]["val"]:
        log.warning("yolo: the val split is empty: data.yaml's val names the train images (raise --val)")
    data = {"train": "images/train", "val": val, "nc": len(run.classes),
            "names": dict(enumerate(run.classes)), "task": "detect" if options.get("boxes") else "segment"}
    write_atomic(out / "data.yaml", yaml.safe_dump(data, sort_keys=False).encode())
    return counts
