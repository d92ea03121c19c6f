"""Gather a T_s x T_e sweep into a table (CSV, markdown) and one heatmap PNG per metric.

    python -m dmgr.sweep outputs/sweeps/<name>        (make sweep runs it at the end)

Each sweep point's Hydra job directory holds a `result.json` (written by the synthesis job) naming
its run directory; the run's `manifest.json` holds its throughput and metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from PIL import Image, ImageDraw
from pydantic import Field

from dmgr.cli import add_settings, program, settings_from, stop_on_interrupt
from dmgr.images import viridis
from dmgr.schema import STRICT_SECTION

# (column name, its path in the manifest)
METRICS = [
    ("images_per_second", ("throughput", "images_per_second")),
    ("final_loss", ("metrics", "final_loss")),
    ("mask_area", ("metrics", "mask_area")),
    ("mask_window_fraction", ("metrics", "mask_window_fraction")),
]


def _dig(data: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def collect(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """(rows of finished points, skipped points)."""
    rows, skipped = [], []
    for result_path in sorted(
        sweep_dir.glob("*/result.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    ):
        result = json.loads(result_path.read_text())
        point = {"job": result_path.parent.name, "overrides": " ".join(result.get("overrides", []))}
        if result.get("status") != "done":
            skipped.append({**point, "reason": result.get("reason", "")})
            continue
        manifest_path = Path(result["out_dir"]) / "manifest.json"
        if not manifest_path.exists():
            skipped.append({**point, "reason": f"no manifest in {result['out_dir']} (run incomplete)"})
            continue
        manifest = json.loads(manifest_path.read_text())
        schedule = manifest["config"]["schedule"]
        row = {**point, "T_s": schedule["T_s"], "T_e": schedule["T_e"], "out_dir": result["out_dir"]}
        for name, path in METRICS:
            row[name] = _dig(manifest, path)
        for name, value in (manifest.get("quality") or {}).items():  # sample metrics, when the run computed them
            if isinstance(value, (int, float)):
                row[name] = value
        rows.append(row)
    return rows, skipped


def metric_names(rows: list[dict]) -> list[str]:
    fixed = {"job", "overrides", "T_s", "T_e", "out_dir"}
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in fixed and k not in names and isinstance(row[k], (int, float))]
    return names


def heatmap(rows: list[dict], metric: str, path: Path, cell: int = 72) -> None:
    t_s = sorted({r["T_s"] for r in rows})
    t_e = sorted({r["T_e"] for r in rows})
    values = {(r["T_s"], r["T_e"]): r.get(metric) for r in rows}
    finite = [v for v in values.values() if isinstance(v, (int, float)) and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    left, top = 70, 40
    image = Image.new("RGB", (left + cell * len(t_e) + 10, top + cell * len(t_s) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), f"{metric} (rows T_s, columns T_e)", fill=(0, 0, 0))
    for j, e in enumerate(t_e):
        draw.text((left + j * cell + cell // 2 - 10, top - 14), f"T_e={e}", fill=(0, 0, 0))
    for i, s in enumerate(t_s):
        draw.text((4, top + i * cell + cell // 2 - 5), f"T_s={s}", fill=(0, 0, 0))
        for j, e in enumerate(t_e):
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2]
            value = values.get((s, e))
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                draw.rectangle(box, fill=(220, 220, 220))
                draw.text((box[0] + 6, box[1] + cell // 2 - 6), "skipped", fill=(90, 90, 90))
                continue
            fill = viridis((value - lo) / (hi - lo) if hi > lo else 0.5)
            draw.rectangle(box, fill=fill)
            ink = (0, 0, 0) if sum(fill) > 380 else (255, 255, 255)
            draw.text((box[0] + 6, box[1] + cell // 2 - 6), f"{value:.4g}", fill=ink)
    image.save(path)


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    out_dir = out_dir or sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"no finished sweep points under {sweep_dir} ({len(skipped)} skipped)")
    metrics = metric_names(rows)
    columns = ["T_s", "T_e", *metrics, "out_dir"]
    rows.sort(key=lambda r: (r["T_s"], r["T_e"]))
    written = {"csv": out_dir / "report.csv", "markdown": out_dir / "report.md"}
    with open(written["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def fmt(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        "| " + " | ".join(columns[:-1]) + " |",
        "|" + "---|" * (len(columns) - 1),
    ]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns[:-1]) + " |" for r in rows]
    if skipped:
        lines += ["", "Skipped points:", ""] + [f"- `{s['overrides']}`: {s['reason']}" for s in skipped]
    for metric in metrics:
        path = out_dir / f"heatmap-{metric}.png"
        heatmap(rows, metric, path)
        written[f"heatmap-{metric}"] = path
        lines += ["", f"![{metric}]({path.name})"]
    written["markdown"].write_text("\n".join(lines) + "\n")
    return written


@dataclass(frozen=True)
class SweepReportSettings:
    """The options of `python -m dmgr.sweep`."""

    __pydantic_config__ = STRICT_SECTION
    out: Annotated[Path | None, Field(description="where to write the report (default: SWEEP_DIR)")] = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.sweep"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path, help="the Hydra sweep directory (hydra.sweep.dir)")
    add_settings(p, SweepReportSettings)
    return p


@stop_on_interrupt(program("dmgr.sweep"))
def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    settings = settings_from(cli, args, SweepReportSettings)
    for name, path in write_report(args.sweep_dir, settings.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
