"""End to end: a tiny synthesis run with the evaluation extras and quality metrics, read back through
webdataset by `python -m dmgr.eval samples` and `python -m dmgr.eval downstream` on a tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from synth_support import ROOT, TINY, manifest, read_samples, run_synth

from dmgr.data.board import make_board
from dmgr.data.export import make_panel
from dmgr.eval.metrics import seam_ratio
from dmgr.eval.samples import QUALITY_KEYS
from dmgr.eval.shards import read_run
from dmgr.sampler.masks import MASK_METHODS

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

TINY_CLASSIFIER = ["quality.classifier_steps=20", "quality.classifier_boards=3"]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-run")
    cache = tmp_path_factory.mktemp("eval-cache")
    run_synth(
        [
            *TINY,
            "seeds=0-7",
            "samples_per_shard=4",
            "batch_size=4",
            f"out_dir={out}",
            "extras.masks=true",
            "extras.paste=true",
            "extras.twin=true",
            "quality.enabled=true",
            f"quality.cache_dir={cache}",
            *TINY_CLASSIFIER,
        ]
    )
    return out


@pytest.fixture(scope="module")
def real_image_run(tmp_path_factory):
    """DMGR into real defect-free boards (dataset.source=images), the product's main path."""
    boards = tmp_path_factory.mktemp("boards")
    for i in range(4):
        Image.fromarray(make_board(i, 64).image).save(boards / f"{i}.png")
    out = tmp_path_factory.mktemp("real-run")
    images = [t for t in TINY if t != "dataset.source=generate"]
    run_synth([*images, f"dataset.images={boards}", "seeds=0-7", "samples_per_shard=4", "batch_size=4",
               f"out_dir={out}"])
    return out


@pytest.fixture(scope="module")
def panel_run(tmp_path_factory):
    """A native-size run: defects into 96x72 panels of 64 px boards (the demo backgrounds' layout)."""
    panels = tmp_path_factory.mktemp("panels")
    for i in range(3):
        Image.fromarray(make_panel([4 * i + j for j in range(4)], 64, (96, 72))).save(panels / f"{i}.png")
    out = tmp_path_factory.mktemp("panel-run")
    images = [t for t in TINY if t != "dataset.source=generate"]
    run_synth([*images, f"dataset.images={panels}", "seeds=0-5", "samples_per_shard=3", "batch_size=3",
               f"out_dir={out}"])
    return out


def run_eval(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dmgr.eval", args[0], "--quiet", *args[1:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"dmgr.eval {args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_evaluation_extras_are_in_the_shards(eval_run):
    samples = read_samples(eval_run)
    assert len(samples) == 8
    for sample in samples.values():
        for method in MASK_METHODS:  # the tiny local model has a mask channel: every method
            assert sample[f"mask_{method}.png"].size == (64, 64)
        method = sample["json"]["mask_method"]
        assert sample[f"mask_{method}.png"].tobytes() == sample["mask.png"].tobytes()
        x0, y0, x1, y1 = sample["json"]["window_box"]
        paste, twin = sample["paste.png"], sample["twin.png"]
        outside = [(x, y) for x in range(64) for y in range(64) if not (x0 <= x < x1 and y0 <= y < y1)]
        assert all(paste.getpixel(p) == twin.getpixel(p) for p in outside[::7]), "paste changes only the window"
        assert any(paste.getpixel((x, y)) != twin.getpixel((x, y)) for x in range(x0, x1) for y in range(y0, y1))
        paste_mask = sample["paste_mask.png"].convert("L")
        assert all(paste_mask.getpixel(p) == 0 for p in outside[::7])
        assert max(paste_mask.getpixel((x, y)) for x in range(x0, x1) for y in range(y0, y1)) == 255


def test_run_ends_with_quality_in_manifest_and_report(eval_run):
    quality = manifest(eval_run)["quality"]
    report = json.loads((eval_run / "eval" / "samples.json").read_text())
    assert set(report["sets"]) == {"dmgr", "paste", "real"}
    assert quality == {key: report["sets"]["dmgr"][key] for key in QUALITY_KEYS}  # the manifest holds the report's
    confusion = report["sets"]["dmgr"]["confusion"]  # the accuracy is the confusion matrix's diagonal share
    assert sum(map(sum, confusion)) == 8 and report["sets"]["dmgr"]["count"] == 8
    assert quality["class_accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(6)) / 8)
    # the seam ratio, recomputed from the shards as written: border energy over nearby energy, pooled
    run = read_run(eval_run)
    assert quality["seam_ratio"] == pytest.approx(seam_ratio(run.images, run.windows, run.window_size), rel=1e-6)
    assert "background_change_vs_twin" in report["sets"]["dmgr"]
    assert "| dmgr |" in (eval_run / "eval" / "samples.md").read_text()
    # 6 requested classes x 7 read (6 + clean) cells of 44 px beside a 110 px label column, under a 96 px header
    assert Image.open(eval_run / "eval" / "confusion-dmgr.png").size == (110 + 7 * 44 + 10, 96 + 6 * 44 + 10)


def test_rerun_without_quality_keeps_the_recorded_metrics(eval_run):
    before = manifest(eval_run)
    run_synth(
        [
            *TINY,
            "seeds=0-7",
            "samples_per_shard=4",
            "batch_size=4",
            f"out_dir={eval_run}",
            "extras.masks=true",
            "extras.paste=true",
            "extras.twin=true",
        ]
    )  # complete: nothing to redo
    after = manifest(eval_run)
    assert after["quality"] == before["quality"]
    assert after["throughput"] == before["throughput"]


def test_samples_command_rewrites_the_report(eval_run, tmp_path):
    out = tmp_path / "report"
    cache = tmp_path / "cache"
    result = run_eval(
        ["samples", "--cache", str(cache), str(eval_run), "--out", str(out)]
        + ["--classifier-steps", "20", "--classifier-boards", "3"]
    )
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(printed) == set(QUALITY_KEYS)
    assert (out / "samples.md").exists() and list(cache.glob("judge-*.safetensors"))
    # the same classifier settings and data give the same numbers as the run's own measurement
    assert printed == pytest.approx(manifest(eval_run)["quality"])


def test_read_run_names_the_missing_extra(tmp_path):
    out = tmp_path / "plain"
    run_synth([*TINY, "seeds=0-1", "samples_per_shard=2", f"out_dir={out}"])
    with pytest.raises(KeyError, match="extras.paste=true"):
        read_run(out, images=("paste.png",))
    with pytest.raises(KeyError, match="extras.masks=true"):
        read_run(out, masks=("mask_gate.png",))


def test_downstream_benchmark_end_to_end(eval_run, real_image_run, tmp_path):
    out = tmp_path / "downstream"
    args = "--n 8 --real-small 2 --seeds 0,1 --steps 4 --batch-size 4 --width 4 --test-defective 6 --test-clean 2"
    command = ["downstream", "--run", f"real={real_image_run}", "--run", f"tiny={eval_run}", *args.split()]
    first = run_eval([*command, "--jobs", "2", "--out", str(out)])
    report = json.loads((out / "downstream.json").read_text())
    sources = report["sources"]
    expected = {
        "dmgr-real/local",
        "dmgr-tiny/local",
        "dmgr-tiny/diff",
        "dmgr-tiny/gate",
        "paste",
        "cut-paste",
        "perlin",
        "real-small",
        "real-small+dmgr-real/local",
        "real-8",
    }
    assert set(sources) == expected
    assert sources["real-small"]["pairs"] == 2 and sources["real-small+dmgr-real/local"]["pairs"] == 10
    assert "reusing" not in first.stdout
    for name, result in sources.items():
        assert [r["seed"] for r in result["runs"]] == [0, 1], name
        for metric in ("pixel_auroc", "pixel_ap", "image_auroc", "mean_iou"):
            values = [r[metric] for r in result["runs"]]
            assert all(0.0 <= v <= 1.0 for v in values), (name, metric, values)
            assert result[metric]["mean"] == pytest.approx(sum(values) / 2)
    assert report["mask_winners"]["dmgr-tiny"]["best"] in MASK_METHODS
    text = (out / "downstream.md").read_text()
    assert "| perlin | 8 |" in text and "Mask methods" in text
    for png in ("downstream-pixel_ap.png", "downstream-image_auroc.png", "training-pairs.png"):
        assert Image.open(out / png).height > 100
    # a rerun reuses the cached models and reports the same numbers; --mix picks the mixed run
    only = "dmgr-real/local,real-small+dmgr-tiny/local"
    again = run_eval([*command, "--mix", "tiny", "--only", only, "--out", str(out)])
    assert "reusing 2 of 4 models" in again.stdout
    rerun = json.loads((out / "downstream.json").read_text())["sources"]
    assert set(rerun) == set(only.split(","))
    assert rerun["dmgr-real/local"]["runs"] == sources["dmgr-real/local"]["runs"]


def test_downstream_rejects_bad_arguments(eval_run, tmp_path, capsys):
    from dmgr.eval.app import main

    for args, message in [
        (["--run", "nothing"], "--run wants NAME=RUN_DIR"),
        (["--run", f"x={tmp_path}"], "does not exist; synthesise it first"),
        (["--run", f"x={eval_run}", "--seeds", "1,1"], "--seeds wants distinct integers"),
        (["--run", f"x={eval_run}", "--n", "0"], "must be >= 1"),
        (["--run", f"x={eval_run}", "--n", "9"], "holds 8 samples, the benchmark needs n=9"),
        (["--run", f"x={eval_run}", "--n", "8", "--only", "perlin,nothing"], "--only nothing: no such source"),
        (["--run", f"x={eval_run}", "--n", "8", "--mix", "y"], "--mix y: no run of that name"),
        *([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: use cpu, or cuda where")]),
        (["--device", "tpu"], "--device tpu: use cpu"),
    ]:
        base = ["downstream", "--quiet", "--steps", "1", "--seeds", "0", "--out", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as exit_:  # in this process: each case fails before any work
            main([*base, *args])  # a repeated option: the later one wins
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and message in stderr, (args, stderr[-500:])
    assert not (tmp_path / "o").exists()


def test_mask_areas_per_class_against_real_defects(real_image_run, tmp_path):
    result = run_eval(["masks", str(real_image_run), "--out", str(tmp_path), "--real-per-class", "12"])
    table = json.loads((tmp_path / "mask-areas.json").read_text())
    by_class: dict[str, list[int]] = {}
    contrast: dict[str, list[float]] = {}
    for sample in read_samples(real_image_run).values():
        mask = np.asarray(sample["mask.png"].convert("L")) > 127
        name = sample["json"]["class_name"]
        by_class.setdefault(name, []).append(int(mask.sum()))
        # the frame it went into: board i, saved by the fixture as i.png
        frame = make_board(int(sample["json"]["background"]["image"].removesuffix(".png")), 64).image
        change = np.abs(np.asarray(sample["png"].convert("RGB"), dtype=np.float64) - frame).mean(-1)
        contrast.setdefault(name, []).append(float(change[mask].mean()))
    assert set(table) == set(by_class)
    for name, areas in by_class.items():
        assert table[name]["run"]["n"] == len(areas)
        assert table[name]["run"]["mean"] == pytest.approx(sum(areas) / len(areas))
        assert table[name]["real"]["n"] == 12 and 3 < table[name]["real"]["mean"] < 40  # defects of a 64 px board
        assert table[name]["run_contrast"]["mean"] == pytest.approx(np.mean(contrast[name]))
        assert table[name]["real_contrast"]["n"] == 12 and 10 < table[name]["real_contrast"]["mean"] < 150
    assert "| class | run n |" in result.stdout and "Contrast: the mean change under the mask" in result.stdout


def test_contrast_needs_real_frames(eval_run):
    from dmgr.eval.mask_areas import compare_areas, run_contrast

    assert run_contrast(eval_run) == {}  # generated boards: no frame to compare with
    assert all("run_contrast" not in row for row in compare_areas(eval_run, 64, 2).values())


def test_contrast_of_real_defects_is_their_change_from_the_clean_board():
    from dmgr.data.defects import CLASS_NAMES, add_defect
    from dmgr.eval.mask_areas import real_measures
    from dmgr.eval.real import VALIDATION

    contrast = real_measures(2, 64)[1]
    assert {name: len(v) for name, v in contrast.items()} == {name: 2 for name in CLASS_NAMES}
    board = make_board(VALIDATION + 7, 64)
    image, mask, _ = add_defect(board, 7 % 6, 7)
    expected = np.abs(image.astype(float) - board.image).mean(-1)[mask].mean()
    assert contrast[CLASS_NAMES[1]][1] == pytest.approx(expected) and expected > 0


def test_downstream_benchmark_on_a_native_size_run_trains_and_tests_on_its_panels(panel_run, tmp_path):
    out = tmp_path / "panels"
    args = "--n 6 --real-small 2 --seeds 0 --steps 2 --batch-size 2 --width 4 --test-defective 6 --test-clean 2"
    only = "dmgr-real/local,cut-paste,real-small,real-small+dmgr-real/local,real-6"
    command = ["downstream", "--run", f"real={panel_run}", *args.split(), "--only", only, "--out", str(out)]
    for task, report, metric in (("binary", "downstream", "pixel_ap"), ("classes", "downstream-classes", "map")):
        run_eval([*command, "--task", task])
        result = json.loads((out / f"{report}.json").read_text())
        assert result["settings"]["panel"] == [96, 72] and result["settings"]["image_size"] == 64
        assert result["test"]["frame"] == [96, 72]
        assert set(result["sources"]) == set(only.split(","))
        assert result["sources"]["real-small+dmgr-real/local"]["pairs"] == 8
        for name, scores in result["sources"].items():
            assert 0.0 <= scores[metric]["mean"] <= 1.0, (task, name)
        text = (out / f"{report}.md").read_text()
        assert "6 held-out real defective boards and 2 clean ones, each in a 96x72 panel of 64 px boards" in text
        assert Image.open(out / "training-pairs.png").height > 100
    # a frame size other than the run's: one line naming both
    wrong = run_eval([*command, "--panel", "160x112"], check=False)
    assert wrong.returncode == 2 and "holds 96x72 frames" in wrong.stderr.strip().splitlines()[-1]


def test_metrics_of_a_panel_run_read_real_defects_at_the_runs_pixel_scale(panel_run, tmp_path):
    """The classifier and the real mask areas use boards of the model's size, not of the panel's width: the
    demo's layout and defects scale with the board, so 96 px boards would hold larger defects than the run's."""
    from dmgr.eval.mask_areas import real_measures
    from dmgr.eval.shards import first_sample, geometry

    sample = first_sample(panel_run)
    assert sample["png"].size == (96, 72)
    assert geometry(sample) == (64, sample["json"]["window_box"][2] - sample["json"]["window_box"][0])
    run_eval(["masks", str(panel_run), "--out", str(tmp_path), "--real-per-class", "6"])
    table = json.loads((tmp_path / "mask-areas.json").read_text())
    at_scale = real_measures(6, 64)[0]
    for name, row in table.items():
        assert row["real"]["mean"] == pytest.approx(sum(at_scale[name]) / 6)
    cache = tmp_path / "cache"
    result = run_eval(["samples", "--cache", str(cache), str(panel_run), "--out", str(tmp_path / "samples"),
                       "--classifier-steps", "5", "--classifier-boards", "2"])
    report = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert report["sets"]["dmgr"]["count"] == 6 and json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classifier"]["settings"]["image_size"] == 64, report["classifier"]
