"""Evaluation reports: markdown + JSON + PNG, written next to what they evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dmgr.data.defects import CLASS_NAMES
from dmgr.data.sheet import outlined_tile
from dmgr.eval.real import PATCH_CLASSES, Boards
from dmgr.images import to_uint8, viridis

SAMPLE_COLUMNS = [  # (key, header)
    ("class_accuracy", "class accuracy (higher)"),
    ("classified_clean", "read as clean (lower)"),
    ("kid_defect", "KID defect (lower)"),
    ("kid_background", "KID background (lower)"),
    ("seam_ratio", "seam ratio (real ~ 1)"),
    ("diversity_ratio", "diversity / real (~1)"),
    ("background_change_vs_twin", "change outside window vs twin"),
]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def confusion_png(confusion: list[list[int]], path: Path, title: str, cell: int = 44) -> None:
    """Rows: requested class; columns: what the classifier read (6 defects + clean); row-normalised colour."""
    left, top = 110, 96
    rows, cols = len(confusion), len(confusion[0])
    image = Image.new("RGB", (left + cols * cell + 10, top + rows * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill=(0, 0, 0))
    draw.text((4, 20), "rows: requested class, columns: classifier", fill=(0, 0, 0))
    for j, name in enumerate(PATCH_CLASSES[:cols]):
        draw.text((left + j * cell + 2, top - 16 - 12 * (j % 2)), name[:8], fill=(0, 0, 0))
    for i, row in enumerate(confusion):
        total = max(sum(row), 1)
        draw.text((4, top + i * cell + cell // 2 - 6), CLASS_NAMES[i], fill=(0, 0, 0))
        for j, count in enumerate(row):
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2]
            fill = viridis(count / total)
            draw.rectangle(box, fill=fill)
            draw.text((box[0] + 6, box[1] + cell // 2 - 6), str(count), fill=(0, 0, 0) if sum(fill) > 380 else "white")
    image.save(path)


def write_sample_report(out_dir: Path, run_dir: Path, sets: dict, classifier: dict) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "samples.json", "markdown": out_dir / "samples.md"}
    written["json"].write_text(json.dumps({"run": str(run_dir), "classifier": classifier, "sets": sets}, indent=1))
    lines = [
        f"# Sample metrics: {run_dir}",
        "",
        f"{sets['dmgr']['count']} synthesised images. Features and class reads come from the judge, a classifier "
        f"independent of the quality screen (held-out accuracy {classifier['validation_accuracy']:.3f} on real "
        "procedural patches). `real` is held-out real data scored the same way: the value a perfect generator "
        "reaches.",
        "",
        "| set | " + " | ".join(h for _, h in SAMPLE_COLUMNS) + " |",
        "|---|" + "---|" * len(SAMPLE_COLUMNS),
    ]
    lines += [
        "| " + name + " | " + " | ".join(_fmt(s.get(k)) for k, _ in SAMPLE_COLUMNS) + " |" for name, s in sets.items()
    ]
    lines += [
        "",
        "Class accuracy per requested class:",
        "",
        "| set | " + " | ".join(CLASS_NAMES) + " |",
        "|---|" + "---|" * len(CLASS_NAMES),
    ]
    for name, s in sets.items():
        if "per_class_accuracy" in s:
            lines.append(f"| {name} | " + " | ".join(_fmt(s["per_class_accuracy"][c]) for c in CLASS_NAMES) + " |")
    for name, s in sets.items():
        if "confusion" in s:
            path = out_dir / f"confusion-{name}.png"
            confusion_png(s["confusion"], path, f"{name}: class fidelity")
            written[f"confusion-{name}"] = path
            lines += ["", f"![{name} confusion]({path.name})"]
    agreement = sets["dmgr"].get("screen_agreement")
    if agreement:
        lines += ["", f"The judge and the run's screen classifier read the same label (six classes + clean) on "
                  f"{agreement['agreement']:.3f} of {agreement['windows']} windows; class accuracy read by the judge "
                  f"{agreement['judge_class_accuracy']:.3f}, by the screen {agreement['screen_class_accuracy']:.3f}."]
    written["markdown"].write_text("\n".join(lines) + "\n")
    return written


def _pm(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def bar_chart(results: dict, metric: str, path: Path, width: int = 360) -> None:
    """One horizontal bar per source: the mean over seeds, with a line for +- one std."""
    names = list(results)
    left, row = 230, 22
    image = Image.new("RGB", (left + width + 70, 30 + row * len(names)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), f"{metric} (mean ± std over seeds)", fill=(0, 0, 0))
    for i, name in enumerate(names):
        stats = results[name][metric]
        y = 26 + i * row
        draw.text((4, y + 4), name, fill=(0, 0, 0))
        mean, std = max(stats["mean"], 0.0), stats["std"]
        draw.rectangle(
            [left, y + 2, left + int(width * min(mean, 1.0)), y + row - 4],
            fill=(33, 145, 140) if name.startswith("dmgr") else (150, 150, 150),
        )
        lo, hi = left + int(width * max(mean - std, 0)), left + int(width * min(mean + std, 1))
        draw.line([lo, y + row // 2 - 1, hi, y + row // 2 - 1], fill=(0, 0, 0), width=2)
        draw.text((left + width + 6, y + 4), f"{stats['mean']:.3f}", fill=(0, 0, 0))
    image.save(path)


def _square(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image and (H, W) mask padded at the bottom and right to a square (image white, mask off)."""
    height, width = mask.shape
    side = max(height, width)
    pad = ((0, side - height), (0, side - width))
    return np.pad(image, (*pad, (0, 0)), constant_values=255), np.pad(mask, pad)


def examples_png(sources: dict[str, Boards], path: Path, per_source: int = 6, scale: int = 2) -> None:
    """One row per source: its first training pairs, each mask outlined in red (frames that are not square
    letterboxed in white, aspect ratio kept)."""
    size = max(next(iter(sources.values())).images.shape[-2:]) * scale
    left = 230
    image = Image.new("RGB", (left + per_source * (size + 4), len(sources) * (size + 4)), "white")
    draw = ImageDraw.Draw(image)
    for r, (name, boards) in enumerate(sources.items()):
        draw.text((4, r * (size + 4) + size // 2 - 6), name, fill=(0, 0, 0))
        count = min(per_source, len(boards))
        pictures = to_uint8(boards.images[:count])
        for c in range(count):
            picture, mask = _square(pictures[c], boards.masks[c, 0].numpy())
            tile = Image.fromarray(outlined_tile(picture, size, mask))
            image.paste(tile, (left + c * (size + 4), r * (size + 4)))
    image.save(path)


def _winner_lines(results: dict, metric: str, label: str) -> list[str]:
    winners = results.get("mask_winners") or {}
    if not winners:
        return []
    lines = ["", f"Mask methods (same images, different masks; best mean {label}):", ""]
    for run, w in winners.items():
        scores = ", ".join(f"{m} {v:.3f}" for m, v in w[metric].items())
        lines.append(f"- {run}: **{w['best']}** ({scores})")
    return lines


def _pictures(
    out_dir: Path,
    results: dict,
    metrics: tuple[str, ...],
    prefix: str,
    sources: dict[str, Boards] | None,
    written: dict[str, Path],
) -> list[str]:
    """The bar charts of `metrics` and the training pairs' picture: files written, markdown lines returned."""
    lines = []
    for metric in metrics:
        path = out_dir / f"{prefix}-{metric}.png"
        bar_chart(results["sources"], metric, path)
        written[metric] = path
        lines += ["", f"![{metric}]({path.name})"]
    if sources:
        path = out_dir / "training-pairs.png"
        examples_png(sources, path)
        written["examples"] = path
        lines += ["", "Training pairs (mask outlined in red):", "", f"![training pairs]({path.name})"]
    return lines


def _per_class_table(by_source: dict, key: str) -> list[str]:
    lines = ["| source | " + " | ".join(CLASS_NAMES) + " |", "|---|" + "---|" * len(CLASS_NAMES)]
    for name, r in by_source.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[key][c]["mean"]) for c in CLASS_NAMES) + " |")
    return lines


def _test_set(results: dict) -> str:
    test, panel = results["test"], results["settings"].get("panel")
    text = f"{test['defective']} held-out real defective boards and {test['clean']} clean ones"
    if panel:
        size = results["settings"]["image_size"]
        text += f", each in a {panel[0]}x{panel[1]} panel of {size} px boards (the training frames' size and scale)"
    return text


def _start_report(out_dir: Path, stem: str, results: dict, command: str) -> dict[str, Path]:
    """OUT/STEM.json written (the command and the results); returns the report's paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    written["json"].write_text(json.dumps({"command": command, **results}, indent=1))
    return written


def write_class_report(
    out_dir: Path, results: dict, command: str, sources: dict[str, Boards] | None = None
) -> dict[str, Path]:
    """The classes task's report: downstream-classes.{json,md} and its charts, beside the binary report."""
    written = _start_report(out_dir, "downstream-classes", results, command)
    by_source, s = results["sources"], results["settings"]
    lines = [
        "# Class-aware downstream benchmark",
        "",
        f"`{command}`",
        "",
        f"The same 7-class U-Net (background + {len(CLASS_NAMES)} defect classes, width {s['segment']['width']}) "
        f"trained {s['segment']['steps']} steps at batch {s['segment']['batch_size']} on the pairs of each source, "
        f"each mask pixel labelled with its sample's class; tested on {_test_set(results)}. "
        "Pixel AP per class: one-vs-rest on the softmax probability of that class over every test pixel; "
        "IoU per class: of the argmax map, pixel counts pooled over the test set. "
        "mAP and mean IoU average the defect classes (background apart). "
        f"Mean ± std over seeds {list(s['seeds'])}.",
        "",
        "| source | pairs | mAP | mean IoU | background IoU |",
        "|---|---|---|---|---|",
    ]
    for name, r in by_source.items():
        lines.append(f"| {name} | {r['pairs']} | {_pm(r['map'])} | {_pm(r['mean_iou'])} | {_pm(r['background_iou'])} |")
    lines += ["", "Pixel AP per defect class:", "", *_per_class_table(by_source, "ap")]
    lines += ["", "IoU per defect class (argmax):", "", *_per_class_table(by_source, "iou")]
    lines += _winner_lines(results, "map", "mAP")
    lines += _pictures(out_dir, results, ("map", "mean_iou"), "downstream-classes", sources, written)
    written["markdown"].write_text("\n".join(lines) + "\n")
    return written


def write_downstream_report(
    out_dir: Path, results: dict, command: str, sources: dict[str, Boards] | None = None
) -> dict[str, Path]:
    written = _start_report(out_dir, "downstream", results, command)
    by_source = results["sources"]
    s = results["settings"]
    lines = [
        "# Downstream benchmark",
        "",
        f"`{command}`",
        "",
        f"The same U-Net (width {s['segment']['width']}) trained {s['segment']['steps']} steps at batch "
        f"{s['segment']['batch_size']} on the pairs of each source; tested on {_test_set(results)}. "
        f"Mean ± std over seeds {list(s['seeds'])}.",
        "",
        "| source | pairs | pixel AUROC | pixel AP | image AUROC | mean IoU |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in by_source.items():
        lines.append(
            f"| {name} | {r['pairs']} | {_pm(r['pixel_auroc'])} | {_pm(r['pixel_ap'])} | "
            f"{_pm(r['image_auroc'])} | {_pm(r['mean_iou'])} |"
        )
    lines += [
        "",
        "IoU per defect class (threshold " + str(s["segment"]["threshold"]) + "):",
        "",
        "| source | " + " | ".join(CLASS_NAMES) + " |",
        "|---|" + "---|" * len(CLASS_NAMES),
    ]
    for name, r in by_source.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['iou'][c]['mean']:.3f}" for c in CLASS_NAMES) + " |")
    lines += _winner_lines(results, "pixel_ap", "pixel AP")
    lines += _pictures(out_dir, results, ("pixel_ap", "image_auroc", "pixel_auroc"), "downstream", sources, written)
    written["markdown"].write_text("\n".join(lines) + "\n")
    return written
