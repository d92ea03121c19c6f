"""The anomalib Folder layout: OUT/normal/, OUT/abnormal/<key>.png, OUT/ground_truth/<key>.png (0/255 masks,
the same names as abnormal/).

normal/ holds the defect-free inputs the run recorded (`extras.input=true`), one file per distinct
background (named by its sha256); a run without input.png gives none (bring your own defect-free images).
A sample whose mask is empty is no anomaly: it is left out of abnormal/ (counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from dmgr.export.common import Run, Sample


def write_sample(sample: Sample, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    files = {}
    if sample.input_png is not None:
        background = sample.meta.get("background") or {}
        name = str(background.get("sha256", ""))[:16] or sample.key
        files[f"normal/{name}.png"] = sample.input_png
    empty = not sample.mask().any()
    if not empty:
        files[f"abnormal/{sample.key}.png"] = sample.png
        files[f"ground_truth/{sample.key}.png"] = sample.mask_png
    return files, {"normal": [f for f in files if f.startswith("normal/")], "empty": int(empty)}


def finish(run: Run, out: Path, records: Callable[[], Iterator[dict]], options: dict) -> dict:
    normal, abnormal, empty = set(), 0, 0
    for r in records():
        normal.update(r["normal"])
        abnormal += 1 - r["empty"]
        empty += r["empty"]
    return {"normal": len(normal), "abnormal": abnormal, "empty_masks": empty,
            "folder_datamodule": {"root": str(out.resolve()), "normal_dir": "normal", "abnormal_dir": "abnormal",
                                  "mask_dir": "ground_truth"}}
