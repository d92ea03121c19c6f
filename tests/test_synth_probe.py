"""What the fault probe of issue 37 found: the screen classifier's cache (its key, damaged entries), adopted
shards keeping the screen's counts, the placement's bound, refusals in one line (a changed setting, a FIFO, a
held worker under torchrun, a pickle), and grey inputs written grey."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synth_support import ROOT, manifest, raw_members, read_samples, run_synth
from test_synth_backgrounds import IMAGES, write_boards
from test_synth_config import spec_of
from test_synth_screen import CLASSES, write_data_root

from dmgr.data.board import make_board
from dmgr.images import decode_rgb
from dmgr.models import CheckpointError
from dmgr.models.checkpoints import read_checkpoint
from dmgr.shards.locks import acquire, release
from dmgr.synth.backgrounds import scan_backgrounds
from dmgr.synth.config import ConfigError
from dmgr.synth.screen_classifier import ScreenClassifierSettings, classifier_key, load_screen_classifier

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("probe")
    return {"boards": write_boards(base / "boards", 5), "data": write_data_root(base / "data"), "base": base}


def screened(setup, out: Path, cache: Path, *more: str) -> list[str]:
    return [*IMAGES, f"dataset.images={setup['boards']}", "seeds=0-3", "samples_per_shard=2", "batch_size=2",
            f"out_dir={out}", "screen.enabled=true", f"screen.data_root={setup['data']}", f"screen.cache_dir={cache}",
            "screen.classifier_steps=3", "screen.area_quantile=0", "screen.min_fidelity=0",
            "screen.min_class_margin=null", *more]


# -- 3.1 the classifier's key covers every input; the run identity holds it ---------------------------------


def test_the_classifier_key_covers_the_margin_its_clean_windows_are_cut_with(setup):
    settings = ScreenClassifierSettings(steps=3, area_quantile=0)
    keys = {classifier_key("data", scan_backgrounds(setup["boards"], 64, 16, margin), CLASSES, settings)
            for margin in (5, 3)}
    assert len(keys) == 2


def test_the_run_identity_holds_the_classifier_key(setup, tmp_path):
    spec = spec_of(screened(setup, tmp_path / "r", tmp_path / "c"))
    other = spec_of(screened(setup, tmp_path / "r", tmp_path / "c", "dataset.margin=3"))
    assert spec.screen.classifier_key != other.screen.classifier_key
    assert spec.identity_inputs["screen"]["classifier_key"] == spec.screen.classifier_key
    from dmgr.synth.engine import load_screen

    assert load_screen(spec).record["key"] == spec.screen.classifier_key


def test_the_classifier_command_takes_the_run_overrides(setup, tmp_path):
    from dmgr.synth.screen_ahead import main

    overrides = screened(setup, tmp_path / "r", tmp_path / "cache", "dataset.margin=3")
    main(overrides)
    spec = spec_of(overrides)
    assert [p.name for p in (tmp_path / "cache").glob("*.safetensors")] == [
        f"screen-classifier-{spec.screen.classifier_key}.safetensors"]


# -- 3.3 a damaged cache entry is set aside and retrained ---------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated-weights", "garbage-record", "missing-record"])
def test_a_damaged_cache_entry_is_set_aside_and_retrained_with_one_warning(damage, setup, tmp_path, caplog):
    backgrounds = scan_backgrounds(setup["boards"], 64, 16, 5)
    settings = ScreenClassifierSettings(steps=3, area_quantile=0)
    first = load_screen_classifier(setup["data"], CLASSES, backgrounds, settings, tmp_path, progress=False)
    weights = tmp_path / f"screen-classifier-{first.record['key']}.safetensors"
    record = weights.with_suffix(".json")
    if damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage-record":
        record.write_text("{not json")
    else:
        record.unlink()
    caplog.clear()
    again = load_screen_classifier(setup["data"], CLASSES, backgrounds, settings, tmp_path, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "set aside" in warnings[0] and "\n" not in warnings[0], warnings
    assert again.record["key"] == first.record["key"] and weights.is_file() and record.is_file()
    assert (tmp_path / f"{weights.name}.damaged").is_file()
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))


# -- 3.2 adopting record-less shards keeps the screen's counts; 3.6 a changed setting is named ---------------


@pytest.fixture(scope="module")
def screened_run(setup):
    out, cache = setup["base"] / "screened", setup["base"] / "cache"
    run_synth(screened(setup, out, cache))
    return out, cache


def test_adopting_shards_without_records_keeps_the_screen_counts(setup, screened_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(screened_run[0], out)
    shutil.rmtree(out / "records")
    before = manifest(screened_run[0])["metrics"]
    result = run_synth(screened(setup, out, screened_run[1]))
    assert "adopted" in result.stdout + result.stderr
    assert manifest(out)["metrics"] == before and before["screen"]["seeds"] == 4


def test_a_changed_setting_is_refused_by_name_before_the_classifier_trains(setup, screened_run, tmp_path):
    out, cache = screened_run
    fresh = tmp_path / "empty-cache"
    result = run_synth(screened(setup, out, fresh, "screen.max_seam=2.5"), check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"dmgr-synth: error: out_dir={out} holds another run (screen.max_seam: 4.0 -> 2.5")
    assert not fresh.exists()  # nothing was trained


# -- 3.4 the placement's candidates are bounded -------------------------------------------------------------


def test_unbounded_candidates_are_refused_at_validation_before_anything_is_written(setup, tmp_path):
    for key, value in (("candidates", 2000), ("noise_levels", 500)):
        with pytest.raises(ConfigError) as err:
            spec_of([*IMAGES, f"dataset.images={setup['boards']}", f"out_dir={tmp_path / 'r'}",
                     f"dataset.placement.{key}={value}"])
        assert str(err.value).startswith(f"dataset.placement.{key}={value}: at most ") and "give" in str(err.value)
    assert not (tmp_path / "r").exists()


def test_placement_scores_in_chunks_equal_one_forward(monkeypatch):
    from dmgr.diffusion import make_diffusion
    from dmgr.models import build_unet
    from dmgr.synth import placement

    torch.manual_seed(0)
    model = build_unet({"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                        "attention_resolutions": "8", "num_heads": 2, "num_head_channels": -1, "learn_sigma": True,
                        "num_classes": 6, "in_channels": 4}).eval()
    diffusion = make_diffusion(1000, "linear", "10")
    windows = torch.rand(5, 3, 16, 16) * 2 - 1
    whole = placement.placement_scores(model, diffusion, windows, 2, 6, [1, 3, 5], torch.Generator().manual_seed(1))
    monkeypatch.setattr(placement, "PLACEMENT_ROWS", 7)
    chunked = placement.placement_scores(model, diffusion, windows, 2, 6, [1, 3, 5], torch.Generator().manual_seed(1))
    assert torch.allclose(whole, chunked, atol=1e-5)


# -- 3.6 one-line refusals ----------------------------------------------------------------------------------


def test_a_fifo_named_in_the_manifest_is_skipped_in_one_line_not_read(setup, tmp_path):
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)
    lines = [{"image": str(setup["boards"] / "000.png")}, {"image": str(fifo)}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = ("import sys; from dmgr.synth.backgrounds import scan_backgrounds; "
            f"b = scan_backgrounds({str(tmp_path / 'list.jsonl')!r}, 64, 16, 5); print(len(b), b.skipped)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 ") and "not a regular file" in result.stdout


def test_a_skip_reason_names_the_file_not_a_buffer(tmp_path, caplog):
    folder = write_boards(tmp_path / "boards", 1)
    (folder / "broken.png").write_bytes(b"not an image at all")
    backgrounds = scan_backgrounds(folder, 64, 16, 5)
    (name, reason), = backgrounds.skipped
    assert name == "broken.png" and "BytesIO" not in reason and "not an image format" in reason
    assert any("broken.png" in r.getMessage() and "BytesIO" not in r.getMessage() for r in caplog.records)


def test_a_pickle_checkpoint_is_refused_as_a_pickle(tmp_path):
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": [0.0, 1.0]}, f)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert "is a plain pickle, refused" in str(err.value) and "damaged" not in str(err.value)


def test_a_refused_job_writes_nothing_into_the_running_jobs_log(setup, tmp_path):
    out = tmp_path / "run"
    lock = acquire(out / "locks" / "worker-0000-of-0001.lock", "the running job")
    try:
        result = run_synth([*IMAGES, f"dataset.images={setup['boards']}", "seeds=0-1", f"out_dir={out}"],
                           check=False)
    finally:
        release(lock)
    assert result.returncode == 2 and "is held by" in result.stderr.strip().splitlines()[-1]
    assert not (out / "logs" / "worker-000.log").exists()


def test_under_torchrun_a_refusal_ends_in_its_own_line_not_a_gloo_traceback(setup, tmp_path):
    """Every rank checks out_dir before the models load, so no rank is left waiting in a collective for a
    peer that stopped (that wait ended in gloo's 'Connection closed by peer' traceback)."""
    base = [*IMAGES, f"dataset.images={setup['boards']}", "seeds=0-1", f"out_dir={tmp_path / 'run'}"]
    run_synth(base)
    result = run_synth([*base, "schedule.T_e=2"], nproc=2, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("dmgr-synth: ")]
    assert errors and all(e.endswith("holds another run (schedule.T_e: 3 -> 2): set these back to resume it, or "
                                     "choose a new out_dir (or leave it unset)") for e in errors), errors
    assert "gloo" not in result.stderr and "Connection closed" not in result.stderr


# -- grey in, grey out --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("grey")
    boards = base / "boards"
    boards.mkdir()
    for i in range(3):
        Image.fromarray(make_board(i, 64).image).convert("L").save(boards / f"{i:03d}.png")
    wide = np.asarray(Image.fromarray(make_board(3, 64).image).convert("L"), dtype=np.uint16) * 256 + 100
    Image.fromarray(wide.astype("<u2")).save(boards / "003.png")  # mode I;16
    out = base / "run"
    run_synth([*IMAGES, f"dataset.images={boards}", "seeds=0-5", "samples_per_shard=3", "batch_size=2",
               "extras.input=true", f"out_dir={out}"])
    return boards, out


def test_a_grey_input_is_written_grey_and_equal_to_the_decoded_input_outside_the_mask(grey_run):
    boards, out = grey_run
    samples = read_samples(out)
    assert len(samples) == 6
    assert all(item.grey for item in scan_backgrounds(boards, 64, 16, 5).items)  # 8- and 16-bit grey
    raw = raw_members(out)
    for key, sample in samples.items():  # webdataset's "pil" decoder hands every image back as RGB
        image, given = (Image.open(io.BytesIO(raw[f"{key}.{m}"])) for m in ("png", "input.png"))
        assert image.mode == given.mode == "L", (key, image.mode)
        decoded, _ = decode_rgb((boards / sample["json"]["background"]["image"]).read_bytes())
        decoded = np.asarray(decoded)[:, :, 0]
        mask = np.asarray(sample["mask.png"].convert("L")) > 127
        assert mask.any() and (np.asarray(image)[~mask] == decoded[~mask]).all(), key
        assert (np.asarray(given) == decoded).all()


def test_readers_take_grey_samples(grey_run):
    from dmgr.eval.shards import read_run
    from dmgr.preview import sample_row
    from dmgr.shards import dataset

    _, out = grey_run
    images = [x for x, _, _ in dataset(out)]
    assert len(images) == 6 and all(x.shape[0] == 3 and torch.equal(x[0], x[1]) for x in images)
    assert read_run(out).images.shape == (6, 3, 64, 64)
    assert sample_row(next(iter(read_samples(out).values())), 32).mode == "RGB"
