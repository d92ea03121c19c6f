"""COCO instance segmentation: OUT/images/<key>.png + OUT/annotations.json, one annotation per defect with
its mask as compressed RLE (pycocotools' format), category ids = class id + 1, image ids = seeds."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from dmgr.export.common import Run, Sample


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


def write_sample(sample: Sample, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    image_id = int(sample.key)
    mask = sample.mask()
    height, width = mask.shape
    annotations, empty = [], 0
    for k, (defect, own) in enumerate(sample.defect_masks()):
        if not own.any():
            empty += 1
            continue
        ys, xs = np.nonzero(own)
        x0, y0 = int(xs.min()), int(ys.min())
        annotations.append({
            "id": image_id * 1000 + k + 1, "image_id": image_id, "category_id": int(defect["class_id"]) + 1,
            "segmentation": {"size": [height, width], "counts": rle_string(rle_counts(own))},
            "area": int(own.sum()), "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "iscrowd": 0,
        })
    image = {"id": image_id, "file_name": f"{sample.key}.png", "width": width, "height": height}
    return {f"images/{sample.key}.png": sample.png}, {"image": image, "annotations": annotations, "empty": empty}


def finish(run: Run, out: Path, records: Callable[[], Iterator[dict]], options: dict) -> dict:
    """annotations.json, streamed in two passes over the shard records (images, then annotations)."""
    categories = [{"id": i + 1, "name": name, "supercategory": "defect"} for i, name in enumerate(run.classes)]
    counts = {"images": 0, "annotations": 0, "empty_defects": 0}
    tmp = out / f".annotations.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f'{{"info": {json.dumps({"description": f"dmgr run {run.path}"})}, '
                f'"categories": {json.dumps(categories)}, "images": [')
        for r in records():
            f.write((", " if counts["images"] else "") + json.dumps(r["image"]))
            counts["images"] += 1
            counts["empty_defects"] += r["empty"]
        f.write('], "annotations": [')
        for r in records():
            for a in r["annotations"]:
                f.write((", " if counts["annotations"] else "") + json.dumps(a))
                counts["annotations"] += 1
        f.write("]}\n")
    os.replace(tmp, out / "annotations.json")
    return counts
