"""Per class, the distribution of mask areas in a run against real defects of the same class.

A mask that says which pixels are the defect should have the area of a real defect; a mask of
everything that changed, or a fixed disc, does not. Real defects come from the procedural domain's
held-out validation stream (exact masks), drawn at the run's image size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmgr.data.defects import CLASS_NAMES
from dmgr.eval.real import VALIDATION, defective_boards
from dmgr.eval.shards import shard_paths

REAL_PER_CLASS = 100  # real defects rendered per class, by default


def run_areas(run_dir: str | Path) -> dict[str, list[int]]:
    """Every defect's mask area in a run, by class name (a real-image run lists each defect)."""
    import webdataset as wds

    areas: dict[str, list[int]] = {}
    for sample in wds.WebDataset(shard_paths(run_dir), shardshuffle=False).decode():
        meta = sample["json"]
        for defect in meta.get("defects", [meta]):
            areas.setdefault(defect["class_name"], []).append(int(defect["mask_area"]))
    return areas


def real_areas(per_class: int, size: int) -> dict[str, list[int]]:
    boards = defective_boards(VALIDATION, per_class * len(CLASS_NAMES), size)
    counts = boards.masks.flatten(1).sum(1)
    return {name: counts[boards.classes == k].tolist() for k, name in enumerate(CLASS_NAMES)}


def _stats(values: list[int]) -> dict:
    if not values:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    return {
        "n": len(v),
        "mean": float(v.mean()),
        "p10": float(np.percentile(v, 10)),
        "median": float(np.median(v)),
        "p90": float(np.percentile(v, 90)),
        "empty": int((v == 0).sum()),
    }


def compare_areas(run_dir: str | Path, size: int, per_class: int = REAL_PER_CLASS) -> dict:
    synth, real = run_areas(run_dir), real_areas(per_class, size)
    return {name: {"run": _stats(synth.get(name, [])), "real": _stats(real[name])} for name in CLASS_NAMES
            if name in synth}


def areas_markdown(table: dict) -> str:
    lines = [
        "| class | run n | run mean | run p10 / median / p90 | empty | real mean | real p10 / median / p90 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        r, q = row["run"], row["real"]
        lines.append(
            f"| {name} | {r['n']} | {r['mean']:.1f} | {r['p10']:.0f} / {r['median']:.0f} / {r['p90']:.0f} | "
            f"{r['empty']} | {q['mean']:.1f} | {q['p10']:.0f} / {q['median']:.0f} / {q['p90']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_areas(run_dir: Path, out_dir: Path, size: int, per_class: int = REAL_PER_CLASS) -> dict[str, Path]:
    table = compare_areas(run_dir, size, per_class)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mask-areas.json").write_text(json.dumps(table, indent=1))
    (out_dir / "mask-areas.md").write_text(f"# Mask areas: {run_dir} against real defects (pixels)\n\n"
                                           + areas_markdown(table))
    return {"json": out_dir / "mask-areas.json", "markdown": out_dir / "mask-areas.md"}

