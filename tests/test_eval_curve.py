"""The few-defect curve (`python -m dmgr.eval curve`) end to end on a tiny budget, N = 2 defects per class: every
part that learns (the local model, the screen's classifier, cut-paste, real-N) reads only those 12 defects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synth_support import ROOT

from dmgr.data.defects import CLASS_NAMES
from dmgr.eval import fewshot, real, sources
from dmgr.eval.detector import DetectorSettings, train_and_score
from dmgr.eval.fewshot import CurveSettings, family, sources_for, user_defects
from dmgr.eval.real import USER
from dmgr.eval.shards import read_run, sample_metas
from dmgr.export.common import is_flagged
from dmgr.schema import build

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

N = 2
MODEL = "demo_local_mask-2-from-2"  # the local model's folder: its architecture, steps and pretraining steps
SYNTH = ["schedule=fast", "schedule.respacing=10", "schedule.T_s=6", "schedule.T_e=3", "screen.classifier_steps=3",
         "screen.max_attempts=1", "samples_per_shard=2"]


@pytest.fixture(scope="module")
def curve(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curve")
    command = [sys.executable, "-m", "dmgr.eval", "curve", "--quiet", "--per-class", str(N), "--pairs", "2,4",
               "--include-flagged", "--no-balance",
               "--local-steps", "2", "--pretrain-steps", "2", "--seeds", "0", "--jobs", "1", "--segment-steps", "3",
               "--test-defective", "12",
               "--test-clean", "6", "--judge-steps", "3", "--judge-boards", "2", "--cache", str(out / "judge-cache"),
               "--out", str(out),
               *(f"--synth-arg={a}" for a in [*SYNTH, f"screen.cache_dir={out / 'screen-cache'}"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DMGR_NO_PROGRESS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_curve_writes_every_row_its_table_and_its_picture(curve):
    results = json.loads((curve / "curve.json").read_text())
    expected = {f"real-{N}", *(f"{source}x{m}" for m in (2, 4)
                               for source in (f"cut-paste-{N}", f"dmgr-{N}", f"real-{N}+dmgr-{N}"))}
    for task, metric in (("binary", "pixel_ap"), ("classes", "map")):
        rows = results["tasks"][task][str(N)]
        assert set(rows) == expected
        assert rows[f"real-{N}"]["pairs"] == 6 * N and rows[f"real-{N}+dmgr-{N}x4"]["pairs"] == 6 * N + 4
        assert all(0 <= row[metric]["mean"] <= 1 for row in rows.values())
    table = (curve / "curve.md").read_text()
    assert f"| {N} | dmgr-{N}x4 | 4 |" in table and f"| {N} | dmgr-{N}x2 | 2 |" in table
    assert (curve / "curve.png").stat().st_size > 0
    # each N's local model checked for copies of its training defects (dmgr.eval models), in the json and table
    checked = results["models"][str(N)]
    assert checked["verdict"].startswith("memorisation: ") and set(checked["classes"]) == set(CLASS_NAMES)
    assert all(c["samples"] == 16 and 0 <= c["copies"] <= 16 for c in checked["classes"].values())
    assert (curve / f"N{N}" / MODEL / "local" / "models-check" / "models.json").is_file()
    assert f"| {N} | " in table.split("## The local models")[1]


def test_the_independent_judge_reads_each_dmgr_rows_samples(curve):
    """curve.json's `samples`: per DMGR row, the judge's reading of exactly the samples that row trains on,
    as `dmgr.eval.samples.class_reading` gives it for the judge cached under --cache; in the table too."""
    from dataclasses import replace

    from dmgr.eval.classifier import ClassifierSettings, load_or_train
    from dmgr.eval.samples import class_reading
    from dmgr.sampler import crop_windows

    results = json.loads((curve / "curve.json").read_text())["samples"][str(N)]
    assert set(results) == {f"dmgr-{N}x2", f"dmgr-{N}x4"}
    judges = list((curve / "judge-cache").glob("judge-*.safetensors"))
    assert len(judges) == 1
    judge, record = load_or_train(replace(ClassifierSettings(), steps=3, per_class=2), curve / "judge-cache", False)
    assert judges[0].name == f"judge-{ClassifierSettings(**record['settings']).key()}.safetensors"
    runs = fewshot.synth_runs(curve / f"N{N}" / MODEL)
    for m in (2, 4):
        synth = [read_run(r) for r in runs]
        windows = torch.cat([crop_windows(s.images, s.windows, s.window_size) for s in synth])[:m]
        expected = class_reading(judge, windows, torch.cat([s.classes for s in synth])[:m])
        assert results[f"dmgr-{N}x{m}"] == expected and expected["samples"] == m
        assert 0 <= expected["class_accuracy"] <= 1 and 0 <= expected["read_as_clean"] <= 1
    assert f"| {N} | dmgr-{N}x4 | 4 | {results[f'dmgr-{N}x4']['class_accuracy']:.3f} |" in (
        curve / "curve.md").read_text().split("read by the independent judge")[1]


def test_with_include_flagged_a_larger_m_adds_a_run_and_reads_both(curve):
    """The tiny models' samples all fail the screen, so the run counts flagged ones (`--include-flagged`; the
    default, accepted samples only, is tests/test_eval_curve_pairs.py): --pairs 2,4 makes seeds 0-1 and 2-3 (a
    larger M never redoes a run) and DMGR x4 is both; the curve records what the screen accepted."""
    runs = fewshot.synth_runs(curve / f"N{N}" / MODEL)
    assert [r.name for r in runs] == ["synth-0-1", "synth-2-3"]
    per_run = [read_run(r) for r in runs]
    assert [s.seeds for s in per_run] == [[0, 1], [2, 3]]
    both = fewshot.read_pairs(runs, 4, include_flagged=True, balance=False)
    assert torch.equal(both.images, torch.cat([s.images for s in per_run]))
    assert torch.equal(fewshot.read_pairs(runs, 2, include_flagged=True, balance=False).images, per_run[0].images)
    with pytest.raises(ValueError, match="holds 4 synthesised samples, the curve needs 5"):
        fewshot.read_pairs(runs, 5, include_flagged=True, balance=False)
    accepted = sum(not is_flagged(meta) for r in runs for meta in sample_metas(r))
    record = json.loads((curve / "curve.json").read_text())["synthesis"][str(N)]
    assert record == {"model": f"N{N}/{MODEL}", "seeds": 4, "written": 4, "accepted": accepted}


def test_a_top_up_run_draws_only_the_classes_it_weights(curve, tmp_path):
    """The balanced curve's further runs (`fewshot.top_up`) pass their class weights to `dmgr.synth` (the fast
    pairs tests stand in for it): a run weighted to two classes writes only those, and records the choice."""
    synth_args = (*SYNTH, f"screen.cache_dir={curve / 'screen-cache'}")
    settings = build(CurveSettings, dict(per_class=(N,), synth_args=synth_args))
    backgrounds = next(curve.glob("backgrounds-*")) / "backgrounds.jsonl"
    run = fewshot.synthesise(tmp_path / "synth-10-13", (10, 14), [0, 0, 0.5, 0, 0.5, 0],
                             local=curve / f"N{N}" / MODEL / "local" / "ema.safetensors", data=curve / f"N{N}" / "data",
                             backgrounds=backgrounds, settings=settings)
    metas = sample_metas(run)
    assert [m["seed"] for m in metas] == [10, 11, 12, 13] and {m["class_id"] for m in metas} <= {2, 4}
    config = json.loads((run / "manifest.json").read_text())["config"]["dataset"]
    assert config["class_choice"] == "weighted" and config["class_weights"] == [0, 0, 0.5, 0, 0.5, 0]


def test_every_learning_part_reads_only_the_users_n_defects(curve, monkeypatch):
    users = {(d.board_seed, d.class_id, d.defect_seed) for d in user_defects(N)}
    assert len(users) == 6 * N and {c for _, c, _ in users} == set(range(len(CLASS_NAMES)))
    data = curve / f"N{N}" / "data"
    # the local model's and the screen's data root holds exactly the users' defects, nothing else
    labels = json.loads((data / "local" / "labels.json").read_text())["items"]
    assert {(i["board_seed"], i["class_id"], i["defect_seed"]) for i in labels} == users
    files = {p.relative_to(data / "local").as_posix() for p in (data / "local").rglob("*.png")}
    assert files == {i["file"] for i in labels} | {i["mask"] for i in labels}
    # the local model trained on that root, starting from the pretrained model, which read only defect-free boards;
    # the synthesis used that model and screened with that root
    assert json.loads((curve / f"N{N}" / MODEL / "local" / "train.json").read_text())["data_root"] == str(data)
    pretrained = curve / "pretrain-demo_local_mask-2"
    record = json.loads((pretrained / "train.json").read_text())
    assert record["local_data"] == "clean" and Path(record["data_root"]).name.startswith("backgrounds-")
    assert json.loads((curve / f"N{N}" / MODEL / "local" / "curve-done.json").read_text())["pretrained"] == str(
        pretrained / "ema.safetensors")
    config = json.loads((curve / f"N{N}" / MODEL / "synth-0-1" / "manifest.json").read_text())["config"]
    assert config["model"]["local"]["checkpoint"] == str((curve / f"N{N}" / MODEL / "local" / "ema.safetensors")
                                                         .resolve())
    assert config["screen"]["data_root"] == str(data.resolve())
    records = [json.loads(p.read_text()) for p in (curve / "screen-cache").glob("*.json")]
    assert records and all(r["data_root"] == str(data.resolve()) for r in records)
    # cut-paste and real-N draw only those defects (their backgrounds are defect-free boards)
    drawn = []
    original = sources.add_defect

    def recording(board, class_id, defect_seed):
        drawn.append((board.seed, class_id, defect_seed))
        return original(board, class_id, defect_seed)

    monkeypatch.setattr(sources, "add_defect", recording)
    monkeypatch.setattr(real, "add_defect", recording)
    settings = build(CurveSettings, dict(per_class=(N,), pairs=(2, 4), include_flagged=True, balance=False))
    rows = sources_for(N, fewshot.synth_runs(curve / f"N{N}" / MODEL), settings)
    assert drawn and set(drawn) == users
    assert all(USER <= seed < USER + 6 * N for seed, _, _ in drawn)
    assert {family(name)[0] for name in rows} == set(fewshot.FAMILIES)


def test_a_yolo_judge_trains_on_real_n_and_on_real_n_plus_dmgr_exports(curve):
    """`python -m dmgr.eval yolo` (Ultralytics in .venv-detect: `make detect-env`) on the curve's N = 2 run, one
    epoch: real-N trains on the export's 12 real boards only, real-N + DMGR-N on those and the first 2 samples (all
    flagged by the screen at this budget: `--include-flagged`, as the curve's), both validated on the held-out real
    boards exported the same way."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dmgr.eval", "yolo", "--quiet", "--curve", str(curve), "--per-class",
                           str(N), "--pairs", "2", "--include-flagged", "--no-balance", "--local-steps", "2",
                           "--pretrain-steps", "2", "--epochs", "1",
                           "--test-defective", "12"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((curve / "yolo" / "yolo.json").read_text())["per_class"][str(N)]
    assert rows[f"real-{N}"]["train_images"] == 6 * N
    assert rows[f"real-{N}+dmgr-{N}x2"]["train_images"] == 6 * N + 2
    assert all(0 <= row[k]["mean"] <= 1 for row in rows.values() for k in ("mask_map50", "mask_map50_95"))
    listing = (curve / "yolo" / f"N{N}" / MODEL / f"real-{N}.train.txt").read_text().split()
    assert len(listing) == 6 * N and all(Path(p).name.startswith("real-") for p in listing)
    mixed = (curve / "yolo" / f"N{N}" / MODEL / f"real-{N}+dmgr-{N}x2.train.txt").read_text().split()
    assert sorted(int(Path(p).stem) for p in mixed if not Path(p).name.startswith("real-")) == [0, 1]
    val = (curve / "yolo" / f"N{N}" / MODEL / f"real-{N}.yaml").read_text().split("val: ")[1].split()[0]
    assert len(list(Path(val).glob("*.png"))) == 12


def test_yolo_scores_are_reused_only_for_the_same_epochs_batch_and_images(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "python"  # stands in for the detector environment's interpreter: counts its trainings
    fake.write_text(f'#!/bin/sh\necho run >> "{calls}"\necho \'{{"mask_map50": 0.5}}\'\n')
    fake.chmod(0o755)
    data = tmp_path / "real-2.yaml"
    data.with_suffix(".train.txt").write_text("/a.png\n/b.png\n")
    data.write_text("train: x\nval: y\n")
    out = tmp_path / "real-2-0"

    def trainings(settings: DetectorSettings) -> int:
        assert train_and_score(data, out, settings, 0, fake) == {"mask_map50": 0.5}
        return len(calls.read_text().split())

    assert trainings(DetectorSettings(epochs=30)) == 1
    assert trainings(DetectorSettings(epochs=30)) == 1  # cached
    assert trainings(DetectorSettings(epochs=300)) == 2
    assert trainings(DetectorSettings(epochs=300, batch=16)) == 3
    data.with_suffix(".train.txt").write_text("/a.png\n/b.png\n/c.png\n")
    assert trainings(DetectorSettings(epochs=300, batch=16)) == 4
    assert trainings(DetectorSettings(epochs=300, batch=16)) == 4
