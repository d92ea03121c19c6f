"""COCO instance segmentation: OUT/images/{train,val}/<name>.png + OUT/instances_{train,val}.json, one
annotation per defect with its mask as compressed RLE (pycocotools' format), category ids = class id + 1.

Image and annotation ids count from 1 in each file (valid for any seed: a seed can be up to 2^63 - 1); every
image record names its source: `seed` (or `real`, the path of one of the user's images) and, for a tile,
`frame`, `offset` and `frame_size`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from dmgr.export.common import Run, Sample
from dmgr.export.items import SPLITS, Item, sample_item
from dmgr.export.tiles import tiled


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of the mask in column-major order, starting with a run of zeros (COCO's RLE)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat.size and flat[0] else counts


def rle_string(counts: list[int]) -> str:
    """pycocotools' compressed counts string (rleToString): 5-bit groups, deltas from the run two before."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def write_item(item: Item, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    """The image and its annotations, without ids (finish numbers them)."""
    width, height = item.size
    annotations = []
    for cls, own in item.labels:
        if not own.any():
            continue
        ys, xs = np.nonzero(own)
        x0, y0 = int(xs.min()), int(ys.min())
        annotations.append({
            "category_id": cls + 1, "segmentation": {"size": [height, width], "counts": rle_string(rle_counts(own))},
            "area": int(own.sum()), "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "iscrowd": 0,
        })
    image = {"file_name": f"{item.name}.png", "width": width, "height": height, **item.source}
    empty = sum(not own.any() for _, own in item.labels)
    record = {"split": item.split, "image": image, "annotations": annotations, "empty": empty}
    return {f"images/{item.split}/{item.name}.png": item.png}, record


def write_sample(sample: Sample, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    """The sample's frame (or its tiles); its defects with an empty mask counted once."""
    item = sample_item(sample, float(options["val"]))
    files, items = {}, []
    for part in tiled(item, options):
        written, record = write_item(part, run, options)
        files.update(written)
        items.append({k: v for k, v in record.items() if k != "empty"})
    return files, {"items": items, "empty": sum(not mask.any() for _, mask in item.labels)}


def _images(records: Callable[[], Iterator[dict]], split: str) -> Iterator[dict]:
    for r in records():
        yield from (i for i in r.get("items", [r]) if i["split"] == split)


def _write_split(run: Run, out: Path, records: Callable[[], Iterator[dict]], split: str) -> dict:
    """instances_<split>.json, streamed in two passes over the records (images, then annotations)."""
    categories = [{"id": i + 1, "name": name, "supercategory": "defect"} for i, name in enumerate(run.classes)]
    counts = {"images": 0, "annotations": 0}
    tmp = out / f".instances_{split}.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f'{{"info": {json.dumps({"description": f"dmgr run {run.path}, {split} split"})}, '
                f'"categories": {json.dumps(categories)}, "images": [')
        for image_id, item in enumerate(_images(records, split), 1):
            f.write((", " if image_id > 1 else "") + json.dumps({"id": image_id, **item["image"]}))
            counts["images"] = image_id
        f.write('], "annotations": [')
        for image_id, item in enumerate(_images(records, split), 1):
            for a in item["annotations"]:
                counts["annotations"] += 1
                f.write((", " if counts["annotations"] > 1 else "") +
                        json.dumps({"id": counts["annotations"], "image_id": image_id, **a}))
        f.write("]}\n")
    os.replace(tmp, out / f"instances_{split}.json")
    return counts


def finish(run: Run, out: Path, records: Callable[[], Iterator[dict]], options: dict) -> dict:
    written = {split: _write_split(run, out, records, split) for split in SPLITS}
    counts = {what: {split: written[split][what] for split in SPLITS} for what in ("images", "annotations")}
    counts["empty_defects"] = sum(r["empty"] for r in records())
    if options.get("tile"):
        counts["tiles"] = sum(1 for split in SPLITS for i in _images(records, split) if "offset" in i["image"])
    return counts
