"""`make bench` runs: the table of seconds and network passes for a preset, with random or given weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from synth_support import ROOT

from dmgr.bench import GLOBAL_CONFIG, LOCAL_CONFIG, load_models
from dmgr.models import build_unet

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out


def test_weights_from_a_reference_format_file(tmp_path):
    path = tmp_path / "weights.pt"
    state = {}
    for which, config in (("global", GLOBAL_CONFIG), ("local", LOCAL_CONFIG)):
        model = build_unet(config)
        with torch.no_grad():
            next(model.parameters()).fill_(0.25)
        state |= {f"{which}_config": config, f"{which}_state_dict": model.state_dict()}
    torch.save(state, path)
    global_model, local_model, source = load_models(str(path))
    assert source == "trained weights of weights.pt"
    assert torch.all(next(global_model.parameters()) == 0.25) and torch.all(next(local_model.parameters()) == 0.25)


def test_bench_prints_seconds_and_passes_per_phase(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dmgr.bench", "--presets", "fast", "--images", "1", "--batch", "1", "--threads", "1",
         "--json", str(tmp_path / "bench.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )
    lines = result.stdout.splitlines()
    assert any(line.startswith("fast ") and " 50 " in line for line in lines), result.stdout  # respacing 50
    phases = {line.split()[1] for line in lines if line.startswith("fast ") and len(line.split()) == 8}
    assert phases == {"anchoring", "free", "resonance"}, result.stdout
    flop_rows = [line.split() for line in lines if line.startswith("fast ") and len(line.split()) == 6]
    assert len(flop_rows) == 1 and float(flop_rows[0][1]) > 0.1, result.stdout  # TFLOP per image, tiny models
    assert "GFLOP per sample: global forward" in result.stdout
    ratio = [line.split() for line in lines if line.startswith("fast ") and line.endswith("x")]
    assert len(ratio) == 1 and 1.2 < float(ratio[0][-1][:-1]) < 2, result.stdout  # fewer passes than the reference

    saved = json.loads((tmp_path / "bench.json").read_text())  # the same numbers as the tables, unrounded
    fast = saved["presets"]["fast"]
    assert saved["setting"]["precision"] == "fp32" and saved["setting"]["cudnn_benchmark"] is False
    assert f"{fast['tflop_per_image']:.2f}" == flop_rows[0][1] and f"{fast['seconds_per_image']:.2f}" == flop_rows[0][2]
    assert f"{fast['reference_tflop_per_image'] / fast['tflop_per_image']:.2f}x" == ratio[0][-1]
    assert fast["steps"] == {"anchoring": 19, "free": 22, "resonance": 8} and fast["images"] == 1
    assert f"fast: {fast['seconds']:.2f} s, {fast['seconds_per_image']:.2f} s/image" in lines


def test_bench_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        return  # this machine has one: the refusal cannot happen here
    result = subprocess.run(
        [sys.executable, "-m", "dmgr.bench", "--device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "--device cuda: no CUDA device is visible here" in result.stderr


def test_job_bench_null_writer_makes_the_samples_and_writes_no_shard(tmp_path):
    from synth_support import TINY

    from dmgr.bench_job import RESULT

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dmgr.bench_job", "--child", "--null-writer", *TINY, "seeds=0-2",
         "samples_per_shard=2", f"out_dir={out}"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith(RESULT))[len(RESULT):])
    assert summary["images_this_run"] == 3 and summary["images_per_second"] > 0
    assert summary["writer_wait_share"] == summary["writer_cpu_share"] == 0  # no manifest, no writer
    assert not list((out / "shards").glob("*.tar")) and not (out / "manifest.json").exists()


def test_reference_structure_flops_known_answer():
    from dmgr.bench import reference_structure_flops

    # 3 rectifications (2 anchoring, 1 resonance) with one backtracking retry, 1 free step, one run
    counts = {"anchoring": {"forward_grad_global": 4, "forward_global": 3, "forward_local": 2, "backward": 4},
              "resonance": {"forward_grad_global": 2, "forward_global": 1, "forward_grad_local": 2, "backward": 2},
              "free": {"forward_global": 1, "forward_local": 1}}
    result = {"counts": counts, "steps": {"anchoring": 2, "free": 1, "resonance": 1}, "pre_undo": 0, "runs": 1}
    flops = {"global": (10.0, 20.0), "local": (1.0, 2.0)}
    # (5 x 3 + 1 retry) forwards of both (11) + 2 x 3 backwards of both (22) + 1 free forward of both
    assert reference_structure_flops(result, flops) == 16 * 11 + 6 * 22 + 11


def test_profile_names_the_operators_of_one_rectified_steps_passes():
    from dmgr.bench import profile_passes

    global_model, local_model, _ = load_models("random")
    report = profile_passes(global_model.requires_grad_(False), local_model.requires_grad_(False), 1, "cpu", "fp32")
    assert report.startswith("where one rectified step's passes spend their time (batch 1, both networks):")
    lines = report.splitlines()
    convolution = next(line for line in lines if line.split() and line.split()[0] == "aten::convolution_backward")
    assert int(convolution.split()[-1]) > 0  # calls: the input-gradient backward was profiled, not only forwards
    assert "Self CPU time total" in report
