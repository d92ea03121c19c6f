"""YOLO (Ultralytics) labels: OUT/images/<key>.png, OUT/labels/<key>.txt, OUT/data.yaml.

Segmentation (default): one line per connected part of each defect's mask, `class x1 y1 x2 y2 ...`, the
part's outer outline along pixel edges moved 1/64 px inward (so that OpenCV's `fillPoly`, which Ultralytics
rasterises with, gives back the part's pixels), normalised to [0, 1]. data.yaml has no `path`: Ultralytics
resolves `train`/`val` against the folder data.yaml is in, so a moved export trains on its own images.
With boxes=True (`--boxes`): one line per defect, `class cx cy w h` of its mask's bounding box. Defects with
an empty mask get no line (counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import yaml

from dmgr.export.common import Run, Sample, write_atomic
from dmgr.export.polygons import components, inset, outline


def _num(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".")


def label_lines(sample: Sample, boxes: bool) -> tuple[list[str], int]:
    lines, empty = [], 0
    for defect, own in sample.defect_masks():
        if not own.any():
            empty += 1
            continue
        height, width = own.shape
        cls = int(defect["class_id"])
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


def write_sample(sample: Sample, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    lines, empty = label_lines(sample, bool(options.get("boxes")))
    files = {f"images/{sample.key}.png": sample.png,
             f"labels/{sample.key}.txt": "".join(f"{line}\n" for line in lines).encode()}
    return files, {"lines": len(lines), "empty": empty}


def finish(run: Run, out: Path, records: Callable[[], Iterator[dict]], options: dict) -> dict:
    counts = {"images": 0, "labels": 0, "empty_defects": 0}
    for r in records():
        counts["images"] += 1
        counts["labels"] += r["lines"]
        counts["empty_defects"] += r["empty"]
    # no `path`: Ultralytics then resolves train/val against the folder holding data.yaml, wherever it is moved
    data = {"train": "images", "val": "images", "nc": len(run.classes),
            "names": dict(enumerate(run.classes)), "task": "detect" if options.get("boxes") else "segment"}
    write_atomic(out / "data.yaml", yaml.safe_dump(data, sort_keys=False).encode())
    return counts
