"""DMGR into real defect-free images (dataset.source=images): inputs, placement, the data contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from synth_support import TINY, assert_same_sample, manifest, raw_members, read_samples, run_synth
from test_synth_config import spec_of

from dmgr.data.board import make_board
from dmgr.synth.backgrounds import BackgroundError, scan_backgrounds
from dmgr.synth.plan import plan_sample

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

# The tiny models on real boards; time travel with known backgrounds is covered by the sampler tests.
IMAGES = [*(t for t in TINY if not t.startswith("dataset.source")), "dataset.source=images",
          "schedule.time_travel=false"]


def write_boards(folder, n: int, size: int = 64, first: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        Image.fromarray(make_board(i, size).image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def boards(tmp_path_factory):
    return write_boards(tmp_path_factory.mktemp("boards"), 5)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, boards):
    out = tmp_path_factory.mktemp("real")
    run_synth([*IMAGES, f"dataset.images={boards}", "seeds=0-5", "samples_per_shard=3", "batch_size=2",
               "extras.input=true", "extras.masks=true", f"out_dir={out}"])
    return out


def test_outside_the_mask_the_image_is_the_input_byte_for_byte(real_run, boards):
    samples = read_samples(real_run)
    assert sorted(samples) == [f"{s:08d}" for s in range(6)]
    masks = []
    for key, sample in samples.items():
        image = np.asarray(sample["png"])
        given = np.asarray(sample["input.png"])
        mask = np.asarray(sample["mask.png"].convert("L")) > 127
        meta = sample["json"]
        assert (image[~mask] == given[~mask]).all(), key
        # the input is the background file as the model saw it (64 px files need no fitting)
        source = np.asarray(Image.open(boards / meta["background"]["image"]).convert("RGB"))
        assert (given == source).all()
        assert meta["source"] == "images" and meta["mask_method"] == "local"
        assert meta["mask_area"] == int(mask.sum()) > 0
        x0, y0, x1, y1 = meta["window_box"]
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert (image[mask] != given[mask]).any(), "the defect pixels come from the sampler"
        assert len(meta["defects"]) == 1 and meta["defects"][0]["mask_area"] == meta["mask_area"]
        assert len(meta["background"]["sha256"]) == 64
        masks.append(mask)
    assert len({m.tobytes() for m in masks}) == len(masks), "masks differ from sample to sample"


def test_manifest_records_the_input_list(real_run, boards):
    m = manifest(real_run)
    assert m["backgrounds"]["usable"] == 5 and m["backgrounds"]["skipped"] == 0
    assert m["config"]["dataset"]["images_digest"] == m["backgrounds"]["digest"]
    assert m["metrics"]["empty_masks"] == 0


def test_two_torchrun_workers_give_identical_samples(real_run, boards, tmp_path):
    run_synth([*IMAGES, f"dataset.images={boards}", "seeds=0-5", "samples_per_shard=3", "batch_size=2",
               "extras.input=true", "extras.masks=true", f"out_dir={tmp_path}"], nproc=2)
    assert raw_members(tmp_path) == raw_members(real_run)


def test_batch_size_keeps_background_plan_and_pixels_outside_the_windows(real_run, boards, tmp_path):
    run_synth([*IMAGES, f"dataset.images={boards}", "seeds=0-5", "samples_per_shard=3", "batch_size=3",
               "extras.input=true", "extras.masks=true", f"out_dir={tmp_path}"])
    a, b = read_samples(real_run), read_samples(tmp_path)
    for key in a:
        for field in ("background", "window_box", "class_name"):
            assert a[key]["json"][field] == b[key]["json"][field]
        box = a[key]["json"]["window_box"]
        outside = np.ones((64, 64), dtype=bool)
        outside[box[1] : box[3], box[0] : box[2]] = False
        assert (np.asarray(a[key]["png"])[outside] == np.asarray(b[key]["png"])[outside]).all()


def test_several_defects_per_image_inside_the_roi(tmp_path):
    write_boards(tmp_path / "in", 2)
    roi = np.zeros((64, 64), dtype=np.uint8)
    roi[:, 32:] = 255  # right half only
    Image.fromarray(roi).save(tmp_path / "in" / "right.png")
    lines = [{"image": f"{i:03d}.png", "roi": "right.png"} for i in range(2)]
    (tmp_path / "in" / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "run"
    run_synth([*IMAGES, f"dataset.images={tmp_path / 'in' / 'list.jsonl'}", "dataset.defects_per_image=2",
               "dataset.placement.candidates=1",  # the ROI holds two windows, not two sets of candidates
               "dataset.margin=0", "seeds=0-2", "extras.input=true", f"out_dir={out}"])
    for sample in read_samples(out).values():
        meta = sample["json"]
        image, given = np.asarray(sample["png"]), np.asarray(sample["input.png"])
        mask = np.asarray(sample["mask.png"].convert("L")) > 127
        assert len(meta["defects"]) == 2 and meta["defects_requested"] == 2
        boxes = [d["window_box"] for d in meta["defects"]]
        for x0, _, x1, _ in boxes:
            assert x0 >= 32 and x1 <= 64
        (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes
        assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0, "windows overlap"
        assert meta["mask_area"] == int(mask.sum()) == sum(d["mask_area"] for d in meta["defects"])
        assert not mask[:, :32].any()
        assert (image[~mask] == given[~mask]).all()


def test_plans_pick_backgrounds_and_windows_from_the_seed(boards):
    # one window per defect: three sets of candidate windows would crowd these boards
    spec = spec_of(["dataset.source=images", f"dataset.images={boards}", "dataset.defects_per_image=3",
                    "dataset.placement.candidates=1"])
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(40)]
    assert plans[7] == plan_sample(7, spec.dataset, spec.backgrounds)
    assert {p.background for p in plans} == set(range(5))
    for p in plans:
        windows = [d.window for d in p.defects]
        assert len(windows) == 3
        for i, (x, y) in enumerate(windows):
            assert 5 <= x <= 64 - 16 - 5 and 5 <= y <= 64 - 16 - 5
            for u, v in windows[i + 1 :]:
                assert abs(x - u) >= 16 or abs(y - v) >= 16


def test_an_image_with_room_for_fewer_windows_gets_fewer_defects(tmp_path):
    write_boards(tmp_path / "in", 1)
    roi = np.zeros((64, 64), dtype=np.uint8)
    roi[10:30, 10:30] = 255  # room for one 16 px window, never two
    Image.fromarray(roi).save(tmp_path / "roi.png")
    (tmp_path / "list.jsonl").write_text(json.dumps({"image": "in/000.png", "roi": "roi.png"}))
    spec = spec_of(["dataset.source=images", f"dataset.images={tmp_path / 'list.jsonl'}",
                    "dataset.defects_per_image=2"])
    plan = plan_sample(3, spec.dataset, spec.backgrounds)
    assert len(plan.defects) == 1
    x, y = plan.window
    assert 10 <= x <= 14 and 10 <= y <= 14


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    folder = write_boards(tmp_path / "in", 2)
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    Image.fromarray(make_board(9, 64).image).save(folder / "grey.png")
    Image.open(folder / "grey.png").convert("L").save(folder / "grey.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small_roi.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "empty_roi.png")
    lines = [{"image": "in/000.png", "roi": "small_roi.png"}, {"image": "in/001.png", "roi": "empty_roi.png"},
             {"image": "in/broken.png"}, {"image": "in/tiny.png"}, {"image": "in/grey.png"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    found = scan_backgrounds(tmp_path / "list.jsonl", 64, 16, 5)
    assert [b.name for b in found.items] == ["in/grey.png"]  # grey-level images are converted to RGB
    reasons = dict(found.skipped)
    assert "ROI is 32x32" in reasons["in/000.png"]
    assert "no room" in reasons["in/001.png"]
    assert "unreadable" in reasons["in/broken.png"]
    assert "smaller than one context crop (64 px" in reasons["in/tiny.png"]
    assert found.image(0).shape == (64, 64, 3)


def test_larger_images_come_back_whole_at_their_own_size(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 128, 0).repeat(3, 2)
    Image.fromarray(ramp).save(folder / "wide.png")
    found = scan_backgrounds(folder, 64, 16, 5)
    assert found.items[0].size == (256, 128)
    assert (found.image(0) == ramp).all()
    corners = found.allowed_corners(0)  # top-left corners in image pixels, margin 5 from every edge
    ys, xs = np.nonzero(corners)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 256 - 16 - 5, 5, 128 - 16 - 5)


def test_no_usable_image_is_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    with pytest.raises(BackgroundError):
        scan_backgrounds(empty, 64, 16, 5)
    for source, words in ((tmp_path / "missing", "no such folder"), (empty, "holds no images"),
                          (tmp_path / "junk", "none of its 1 images is usable")):
        out = tmp_path / f"run-{source.name}"
        result = run_synth([*IMAGES, f"dataset.images={source}", f"out_dir={out}"], check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("dmgr-synth: error: dataset.images=") and words in lines[0]
        assert not out.exists()


def test_a_bad_manifest_line_is_named(tmp_path):
    (tmp_path / "list.jsonl").write_text('{"image": "a.png"}\n{"roi": "b.png"}\n')
    with pytest.raises(BackgroundError, match="list.jsonl:2"):
        scan_backgrounds(tmp_path / "list.jsonl", 64, 16, 5)


def test_batch_size_does_not_change_the_samples_of_trained_models(boards, tmp_path):
    """With the trained demo models the batched kernels' rounding stays at rounding level (random tiny
    networks amplify it, hence the plan-level check above)."""
    demo = ["dataset.source=images", "screen.enabled=false", f"dataset.images={boards}", "schedule.respacing=10",
            "schedule.T_s=6", "schedule.T_e=3", "seeds=0-1", "progress=false"]
    for batch in (1, 2):
        run_synth([*demo, f"batch_size={batch}", f"out_dir={tmp_path / str(batch)}"])
    one, two = read_samples(tmp_path / "1"), read_samples(tmp_path / "2")
    assert sorted(one) == sorted(two)
    for key in one:
        assert (np.asarray(one[key]["mask.png"].convert("L")) > 127).any(), key
        assert_same_sample(one[key], two[key])  # within rounding: bit-identity needs equal batch compositions
