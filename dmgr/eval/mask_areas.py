"""Per class, the distribution of mask areas in a run against real defects of the same class, and how strongly
each defect stands out from the frame it went into (its contrast) against real defects'.

A mask that says which pixels are the defect should have the area of a real defect; a mask of
everything that changed, or a fixed disc, does not. A defect's contrast is the mean change under its mask,
|image - frame| over the channels in grey levels: for a run into real frames the frame is the background the
sample records, for a real defect its board without the defect. Real defects come from the procedural domain's
held-out validation stream (exact masks), drawn at the run's image size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmgr.data.board import make_board
from dmgr.data.defects import CLASS_NAMES, add_defect
from dmgr.eval.real import VALIDATION
from dmgr.eval.shards import shard_paths
from dmgr.images import decode_rgb

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


def frames_root(run_dir: str | Path) -> Path | None:
    """The folder the run's background names are relative to (`dataset.images`: a folder, or a manifest's
    folder); None for a run on generated boards (`dataset.source=generate`)."""
    dataset = json.loads((Path(run_dir) / "run.json").read_text())["config"]["dataset"]
    if dataset.get("source") != "images":
        return None
    return Path(dataset["images"]) if Path(dataset["images"]).is_dir() else Path(dataset["images"]).parent


def run_contrast(run_dir: str | Path) -> dict[str, list[float]]:
    """Every defect's contrast in a run into real frames, by class name: the mean of |image - background| (channel
    mean, grey levels) over its mask pixels inside its mask box. Empty for a run on generated boards, or where the
    frame file has another size than the sample (a rescaled input)."""
    import webdataset as wds

    root, contrast = frames_root(run_dir), {}
    if root is None:
        return {}
    for sample in wds.WebDataset(shard_paths(run_dir), shardshuffle=False).decode("pil"):
        meta = sample["json"]
        image = np.asarray(sample["png"].convert("RGB"), dtype=np.float64)
        frame = np.asarray(decode_rgb((root / meta["background"]["image"]).read_bytes())[0], dtype=np.float64)
        if frame.shape != image.shape:
            continue
        change = np.abs(image - frame).mean(-1)
        mask = np.asarray(sample["mask.png"].convert("L")) > 127
        for defect in meta.get("defects", [meta]):
            x0, y0, x1, y1 = defect["mask_box"]
            inside = mask[y0:y1, x0:x1]
            if inside.any():
                contrast.setdefault(defect["class_name"], []).append(float(change[y0:y1, x0:x1][inside].mean()))
    return contrast


def real_measures(per_class: int, size: int) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Mask areas and contrasts of real defects, by class: the validation boards VALIDATION + i with one defect
    each (class i % 6, defect seed i; exact masks), the contrast |the board with its defect - the same board
    clean| over the defect's mask."""
    areas: dict[str, list[int]] = {name: [] for name in CLASS_NAMES}
    contrast: dict[str, list[float]] = {name: [] for name in CLASS_NAMES}
    for i in range(per_class * len(CLASS_NAMES)):
        board = make_board(VALIDATION + i, size)
        image, mask, _ = add_defect(board, i % len(CLASS_NAMES), i)
        name = CLASS_NAMES[i % len(CLASS_NAMES)]
        areas[name].append(int(mask.sum()))
        contrast[name].append(float(np.abs(image.astype(np.float64) - board.image).mean(-1)[mask].mean()))
    return areas, contrast


def _stats(values: list[float]) -> dict:
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
    """Per class of the run: its mask areas and real ones (`run`, `real`), and with real frames the contrasts
    (`run_contrast`, `real_contrast`)."""
    synth, contrast = run_areas(run_dir), run_contrast(run_dir)
    real, real_c = real_measures(per_class, size)
    table = {name: {"run": _stats(synth.get(name, [])), "real": _stats(real[name])} for name in CLASS_NAMES
             if name in synth}
    for name in table:
        if name in contrast:
            table[name] |= {"run_contrast": _stats(contrast[name]), "real_contrast": _stats(real_c[name])}
    return table


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
    contrasts = {name: row for name, row in table.items() if "run_contrast" in row}
    if contrasts:
        lines += ["", "Contrast: the mean change under the mask against the frame (grey levels, 0-255).", "",
                  "| class | run n | run mean | run p10 / p90 | real mean | real p10 / p90 |",
                  "|---|---|---|---|---|---|"]
        for name, row in contrasts.items():
            r, q = row["run_contrast"], row["real_contrast"]
            lines.append(f"| {name} | {r['n']} | {r['mean']:.1f} | {r['p10']:.0f} / {r['p90']:.0f} | {q['mean']:.1f} | "
                         f"{q['p10']:.0f} / {q['p90']:.0f} |")
    return "\n".join(lines) + "\n"


def write_areas(run_dir: Path, out_dir: Path, size: int, per_class: int = REAL_PER_CLASS) -> dict[str, Path]:
    table = compare_areas(run_dir, size, per_class)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mask-areas.json").write_text(json.dumps(table, indent=1))
    (out_dir / "mask-areas.md").write_text(f"# Mask areas and contrast: {run_dir} against real defects (pixels)\n\n"
                                           + areas_markdown(table))
    return {"json": out_dir / "mask-areas.json", "markdown": out_dir / "mask-areas.md"}

