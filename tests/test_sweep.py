"""Hydra multirun sweeps over T_s/T_e with the basic launcher, and the sweep report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from synth_support import TINY, manifest, run_synth

from dmgr.images import viridis
from dmgr.sweep import write_report

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out


def test_local_sweep_skips_invalid_points_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_synth(
        ["-m", f"hydra.sweep.dir={sweep}", *TINY, "seeds=0-1", "samples_per_shard=2",
         "schedule.T_s=6,3", "schedule.T_e=3,1", "out_dir=${hydra:runtime.output_dir}/run"]
    )
    skipped = "skipping this sweep point: schedule.T_e=3: must be smaller than schedule.T_s=3"
    assert skipped in result.stderr + result.stdout
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/result.json")}
    assert sorted(r["status"] for r in results.values()) == ["done", "done", "done", "skipped"]
    out_dirs = {r["out_dir"] for r in results.values() if r["status"] == "done"}
    assert len(out_dirs) == 3, "each point has its own output directory"
    for out in out_dirs:
        assert manifest(Path(out))["num_samples"] == 2

    written = write_report(sweep)
    rows = list(csv.DictReader(open(written["csv"])))
    assert sorted((int(r["T_s"]), int(r["T_e"])) for r in rows) == [(3, 1), (6, 1), (6, 3)]
    for metric in ("images_per_second", "final_loss", "mask_area"):
        assert all(float(r[metric]) >= 0 for r in rows)
        heatmap = Image.open(written[f"heatmap-{metric}"]).convert("RGB")
        assert heatmap.size == (70 + 2 * 72 + 10, 40 + 2 * 72 + 30)  # 2 T_e columns, 2 T_s rows of 72 px
        values = {(int(r["T_s"]), int(r["T_e"])): float(r[metric]) for r in rows}
        lo, hi = min(values.values()), max(values.values())
        for i, t_s in enumerate((3, 6)):
            for j, t_e in enumerate((1, 3)):
                corner = heatmap.getpixel((70 + j * 72 + 2, 40 + i * 72 + 2))
                if (t_s, t_e) not in values:  # the skipped point is grey
                    assert corner == (220, 220, 220)
                else:
                    share = (values[t_s, t_e] - lo) / (hi - lo) if hi > lo else 0.5
                    assert corner == viridis(share), (metric, t_s, t_e)
    text = written["markdown"].read_text()
    assert "Skipped points" in text and "T_e=3: must be smaller" in text


def test_report_heatmap_marks_missing_points(tmp_path):
    sweep = tmp_path / "sweep"
    for job, (t_s, t_e, speed) in enumerate([(100, 20, 1.0), (100, 40, 2.0), (150, 20, 3.0)]):
        run = tmp_path / f"run{job}"
        run.mkdir()
        (run / "manifest.json").write_text(json.dumps({
            "config": {"schedule": {"T_s": t_s, "T_e": t_e}},
            "throughput": {"images_per_second": speed},
            "metrics": {"final_loss": 10.0 * job, "mask_area": 5, "mask_window_fraction": 0.1},
            "quality": {"class_accuracy": 0.25 * job, "kid_defect": 0.1},  # from quality.enabled=true runs
        }))
        (sweep / str(job)).mkdir(parents=True)
        (sweep / str(job) / "result.json").write_text(json.dumps({"status": "done", "out_dir": str(run)}))
    written = write_report(sweep)
    rows = list(csv.DictReader(open(written["csv"])))
    assert [(r["T_s"], r["T_e"], r["images_per_second"]) for r in rows] == [
        ("100", "20", "1.0"), ("100", "40", "2.0"), ("150", "20", "3.0")]
    assert [float(r["class_accuracy"]) for r in rows] == [0.0, 0.25, 0.5]
    assert "class_accuracy" in written["markdown"].read_text() and "heatmap-kid_defect" in written
    image = Image.open(written["heatmap-images_per_second"]).convert("RGB")
    colours = {image.getpixel((70 + 10 + 72 * j, 40 + 10 + 72 * i)) for i in range(2) for j in range(2)}
    assert (220, 220, 220) in colours, "the missing (150, 40) point is drawn grey"
    assert len(colours) == 4
