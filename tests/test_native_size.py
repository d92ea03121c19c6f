"""Real backgrounds at their own size (dataset.source=images): the whole frame comes back, defects are made
in context crops (dataset.scale), windows and ROIs live in image pixels."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synth_support import TINY, raw_members, read_samples, run_synth
from test_synth_config import spec_of

from dmgr.schema import ConfigError
from dmgr.synth.backgrounds import scan_backgrounds
from dmgr.synth.engine import load_engine, make_attempts, make_settings, mask_to_image, to_image, to_model
from dmgr.synth.plan import Defect, SamplePlan, context_origin, plan_sample

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

# A 32 px global model (16 px windows): a context crop covers 32 / scale image pixels.
SMALL = ["model.global.config.image_size=32", "dataset.image_size=32", "dataset.margin=0"]
FAST = ["schedule=fast", "schedule.respacing=10", "schedule.T_s=6", "schedule.T_e=3", "schedule.time_travel=false",
        "schedule.iterations=1", "progress=false"]
# (name, width, height, mode): RGB and grey, square, wide and tall, one smaller than a 64 px crop
INPUTS = [("wide.png", 50, 37, "RGB"), ("square.png", 64, 64, "L"), ("tall.png", 97, 130, "RGB"),
          ("tallgrey.png", 33, 45, "L")]


def write_inputs(folder: Path, inputs=INPUTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, w, h, mode in inputs:
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("native") / "in")


def source_pixels(path: Path) -> np.ndarray:
    """The file's decoded pixels, (H, W, 3): a grey file's one channel repeated (what the sampler sees)."""
    with Image.open(path) as img:
        array = np.asarray(img)
    return np.repeat(array[..., None], 3, 2) if array.ndim == 2 else array


def images_spec(folder: Path, *more: str):
    return spec_of(["dataset.source=images", f"dataset.images={folder}", *SMALL, *FAST, *more])


@lru_cache(maxsize=4)
def _engine(key: str):
    return load_engine(_SPECS[key], torch.device("cpu"))


_SPECS: dict = {}


def make(spec, plans: list[SamplePlan]) -> list[dict]:
    """The job's own sampling of a batch of plans, in this process: each attempt as a shard holds it, and the
    decoded input the screen compares with as "given"."""
    from dmgr.synth.record import attempt_sample

    key = spec.model.name + str(spec.dataset.image_size)
    _SPECS.setdefault(key, spec)
    engine = _engine(key)
    return [{**attempt_sample(spec, engine.digests, a), "given": a.given, "attempt": a}
            for a in make_attempts(engine, make_settings(spec), plans)]


def mask_of(sample: dict) -> np.ndarray:
    return np.asarray(sample["mask.png"].convert("L")) > 127


def check_sample(spec, sample: dict) -> None:
    """The whole frame at its own size; outside the mask the source file, byte for byte; each defect's mask
    inside its window and context crop; the json's boxes in image pixels."""
    meta = sample["json"]
    item = spec.backgrounds.items[meta["background"]["index"]]
    with Image.open(item.path) as img:
        raw = np.asarray(img)  # (H, W) for a grey file, (H, W, 3) for RGB
    source = source_pixels(item.path)
    image, mask = np.asarray(sample["png"]), mask_of(sample)
    assert sample["png"].mode == ("L" if raw.ndim == 2 else "RGB") and image.shape == raw.shape  # the input's mode
    assert mask.shape == source.shape[:2] == (meta["height"], meta["width"])
    assert (image[~mask] == raw[~mask]).all()
    given = np.asarray(sample["given"])
    assert (given == (raw if given.ndim == 2 else source)).all()  # the decoded input the screen compares with
    assert meta["scale"] == spec.dataset.scale
    assert meta["mask_area"] == int(mask.sum()) == sum(d["mask_area"] for d in meta["defects"])
    inside = np.zeros_like(mask)
    for d in meta["defects"]:
        x0, y0, x1, y1 = d["window_box"]
        c0, d0, c1, d1 = d["context_box"]
        assert 0 <= c0 <= x0 < x1 <= c1 <= source.shape[1] and 0 <= d0 <= y0 < y1 <= d1 <= source.shape[0]
        assert c1 - c0 == d1 - d0 == spec.backgrounds.geometry.crop
        if d["mask_area"]:
            m0, n0, m1, n1 = d["mask_box"]
            assert x0 <= m0 < m1 <= x1 and y0 <= n0 < n1 <= y1
        inside[y0:y1, x0:x1] = True
    assert not (mask & ~inside).any()
    assert mask.any() and (image[mask] != raw[mask]).any(), "the defect pixels come from the sampler"


def covering_plans(spec, n: int = 8) -> list[SamplePlan]:
    """At least n plans from the first seeds, among them the first seed drawn on each background (every input's size
    and mode in one batch)."""
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(64)]
    firsts = [next(p for p in plans if p.background == b) for b in range(len(spec.backgrounds))]
    return firsts + [p for p in plans if p not in firsts][: max(0, n - len(firsts))]


def test_outside_the_masks_every_pixel_is_the_source_file(inputs):
    spec = images_spec(inputs, "dataset.defects_per_image=2")
    samples = make(spec, covering_plans(spec))
    assert {s["json"]["background"]["image"] for s in samples} == {name for name, *_ in INPUTS}
    for sample in samples:
        check_sample(spec, sample)


def test_grey_inputs_come_back_grey_with_their_grey_levels(inputs):
    spec = images_spec(inputs)
    grey = [i for i, item in enumerate(spec.backgrounds.items) if item.name == "tallgrey.png"][0]
    sample = make(spec, [SamplePlan(0, (_defect(spec, grey, (2, 3)),), grey)])[0]
    image, mask = np.asarray(sample["png"]), mask_of(sample)
    levels = np.asarray(Image.open(inputs / "tallgrey.png"))
    assert sample["png"].mode == "L" and image.shape == levels.shape
    assert (image[~mask] == levels[~mask]).all()


def _defect(spec, background: int, window: tuple[int, int], class_id: int = 0) -> Defect:
    size = spec.backgrounds.items[background].size
    return Defect(class_id, spec.dataset.classes[class_id], window,
                  context_origin(window, size, spec.backgrounds.geometry))


def test_defects_at_every_border(inputs):
    spec = images_spec(inputs)
    tall = [i for i, item in enumerate(spec.backgrounds.items) if item.name == "tall.png"][0]
    w, h = spec.backgrounds.items[tall].size
    corners = [(0, 0), (w - 16, 0), (0, h - 16), (w - 16, h - 16), (40, 0), (0, 60), (w - 16, 60), (40, h - 16)]
    plans = [SamplePlan(seed, (_defect(spec, tall, corner, seed % 6),), tall) for seed, corner in enumerate(corners)]
    for plan, sample in zip(plans, make(spec, plans)):
        check_sample(spec, sample)
        x, y = plan.window
        assert sample["json"]["window_box"] == [x, y, x + 16, y + 16]
        c0, d0, c1, d1 = sample["json"]["defects"][0]["context_box"]
        assert (c0 == 0) == (x < 8) and (d0 == 0) == (y < 8)  # shifted inside at the near edges
        assert (c1 == w) == (x + 24 > w) and (d1 == h) == (y + 24 > h)  # and at the far ones


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_scale_other_than_one_round_trips_through_the_model_size(inputs, scale):
    spec = images_spec(inputs, f"dataset.scale={scale}", "dataset.defects_per_image=2")
    g = spec.backgrounds.geometry
    assert (g.crop, g.window) == (round(32 / scale), round(16 / scale))
    skipped = dict(spec.backgrounds.skipped)
    if scale == 0.5:  # 64 px crops: the 50x37 and 33x45 inputs are too small, counted
        assert set(skipped) == {"wide.png", "tallgrey.png"} and "smaller than one context crop" in skipped["wide.png"]
    samples = make(spec, [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(4)])
    for sample in samples:
        check_sample(spec, sample)
        for d in sample["json"]["defects"]:
            x0, y0, x1, y1 = d["window_box"]
            assert abs((x1 - x0) - 16 / scale) <= 1 and abs((y1 - y0) - 16 / scale) <= 1


def test_the_resize_filters_round_trip_a_smooth_crop():
    ramp = torch.linspace(-1, 1, 64)
    crop = (ramp[None, :] * ramp[:, None]).expand(1, 3, 64, 64).contiguous()
    for side in (16, 64, 128):
        back = to_image(to_model(crop, 32), side)
        assert back.shape[-1] == side
    assert (to_image(to_model(crop, 32), 64) - crop).abs().max() < 0.1
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 8:24, 4:12] = True
    grown = mask_to_image(mask, 64)
    assert grown.sum() == 4 * mask.sum() and grown[0, 16:48, 8:24].all()


def test_roi_at_native_size_and_another_size_is_counted(tmp_path):
    folder = write_inputs(tmp_path / "in", [("tall.png", 97, 130, "RGB"), ("other.png", 97, 130, "RGB")])
    roi = np.zeros((130, 97), dtype=np.uint8)
    roi[70:, 50:] = 255  # the lower right only
    Image.fromarray(roi).save(folder / "roi.png")
    Image.fromarray(roi[:64, :64]).save(folder / "small_roi.png")
    lines = [{"image": "tall.png", "roi": "roi.png"}, {"image": "other.png", "roi": "small_roi.png"}]
    (folder / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    # one window per defect: three defects' candidate windows would not all fit in the 47x60 ROI
    spec = images_spec(folder / "list.jsonl", "dataset.defects_per_image=3", "dataset.placement.candidates=1")
    assert [b.name for b in spec.backgrounds.items] == ["tall.png"]
    assert dict(spec.backgrounds.skipped)["other.png"] == "ROI is 64x64, the image 97x130 (both upright)"
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(3)]
    for plan, sample in zip(plans, make(spec, plans)):
        assert len(plan.defects) == 3
        for x, y in (d.window for d in plan.defects):
            assert x >= 50 and y >= 70 and x + 16 <= 97 and y + 16 <= 130
        check_sample(spec, sample)
        assert not mask_of(sample)[:70].any() and not mask_of(sample)[:, :50].any()


def test_several_defects_with_overlapping_context_crops(tmp_path):
    folder = write_inputs(tmp_path / "in", [("square.png", 40, 40, "RGB")])
    # one window per defect: three defects' candidate windows would not all fit in a 40x40 image
    spec = images_spec(folder, "dataset.defects_per_image=3", "dataset.placement.candidates=1")
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(3)]
    for plan, sample in zip(plans, make(spec, plans)):
        check_sample(spec, sample)
        boxes = [d["context_box"] for d in sample["json"]["defects"]]
        assert len(boxes) >= 2
        a, b = boxes[0], boxes[1]
        assert max(a[0], b[0]) < min(a[2], b[2]) and max(a[1], b[1]) < min(a[3], b[3]), "the crops overlap"
        windows = [d.window for d in plan.defects]
        for i, (x, y) in enumerate(windows):
            for u, v in windows[i + 1 :]:
                assert abs(x - u) >= 16 or abs(y - v) >= 16


def test_batch_size_keeps_plans_and_changes_pixels_at_rounding_level(inputs):
    """Equal batch composition gives identical bytes; other batch sizes the same plan, the same pixels
    outside the windows, and (tame denoisers) pixels within a couple of grey levels."""
    spec = images_spec(inputs, "dataset.defects_per_image=2", "mask.method=gate")
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(4)]
    together = make(spec, plans)
    again = make(spec, plans)
    alone = [make(spec, [p])[0] for p in plans]
    for a, b, c in zip(together, again, alone):
        assert np.asarray(a["png"]).tobytes() == np.asarray(b["png"]).tobytes()
        assert a["json"]["defects"] == b["json"]["defects"]
        ja, jc = a["json"]["defects"], c["json"]["defects"]
        assert [(d["window_box"], d["context_box"], d["class_name"]) for d in ja] == \
               [(d["window_box"], d["context_box"], d["class_name"]) for d in jc]
        outside = np.ones(np.asarray(a["png"]).shape[:2], dtype=bool)
        for x0, y0, x1, y1 in (d["window_box"] for d in ja):
            outside[y0:y1, x0:x1] = False
        assert (np.asarray(a["png"])[outside] == np.asarray(c["png"])[outside]).all()
        # the gate mask does not depend on the pixels: same masks whatever the batch
        assert (mask_of(a) == mask_of(c)).all()


def test_batch_size_changes_demo_model_pixels_by_a_couple_of_levels(tmp_path):
    """The trained demo models (64 px) on 80x70 and 64x96 frames: one batch of 3 against one by one."""
    folder = write_inputs(tmp_path / "in", [("a.png", 80, 70, "RGB"), ("b.png", 64, 96, "L")])
    # the plans' own windows (the candidates' choice has its batch test in test_placement.py): there the demo
    # model grows a defect in each of the three samples, which check_sample asks for
    spec = spec_of(["model=demo", "dataset.source=images", f"dataset.images={folder}", *FAST,
                    "dataset.placement.candidates=1"])
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(3)]
    together, alone = make(spec, plans), [make(spec, [p])[0] for p in plans]
    for a, c in zip(together, alone):
        check_sample(spec, a)
        x, y = np.asarray(a["png"]).astype(int), np.asarray(c["png"]).astype(int)
        assert x.shape == y.shape and np.abs(x - y).max() <= 2
        assert (mask_of(a) == mask_of(c)).mean() > 0.99


def test_two_workers_write_the_same_native_size_shards(inputs, tmp_path):
    images = [*(t for t in TINY if not t.startswith("dataset.source")), "dataset.source=images",
              "schedule.time_travel=false", f"dataset.images={inputs}", *SMALL, "seeds=0-3", "samples_per_shard=2",
              "batch_size=2", "dataset.defects_per_image=2"]
    run_synth([*images, f"out_dir={tmp_path / 'one'}"])
    run_synth([*images, f"out_dir={tmp_path / 'two'}"], nproc=2)
    assert raw_members(tmp_path / "one") == raw_members(tmp_path / "two")
    samples = read_samples(tmp_path / "one")
    sizes = {s["json"]["background"]["image"]: s["png"].size for s in samples.values()}
    assert all(sizes[name] == (w, h) for name, w, h, _ in INPUTS if name in sizes)
    from dmgr.export.__main__ import main as export

    export(["coco", str(tmp_path / "one"), str(tmp_path / "coco"), "--val", "0"])
    coco = json.loads((tmp_path / "coco" / "instances_train.json").read_text())
    for image in coco["images"]:
        key = Path(image["file_name"]).stem
        assert (image["width"], image["height"]) == samples[key]["png"].size
        assert Image.open(tmp_path / "coco" / "images" / "train" / image["file_name"]).size == samples[key]["png"].size
    for a in coco["annotations"]:
        image = next(i for i in coco["images"] if i["id"] == a["image_id"])
        assert a["segmentation"]["size"] == [image["height"], image["width"]]
        x, y, w, h = a["bbox"]
        assert x + w <= image["width"] and y + h <= image["height"]
    export(["yolo", str(tmp_path / "one"), str(tmp_path / "yolo")])
    for label in (tmp_path / "yolo" / "labels").glob("*/*.txt"):
        values = [float(v) for line in label.read_text().splitlines() for v in line.split()[1:]]
        assert values and all(0 <= v <= 1 for v in values)


def test_images_smaller_than_a_context_crop_are_skipped_and_counted(inputs):
    found = scan_backgrounds(inputs, 32, 16, 0, scale=0.5)
    assert [b.name for b in found.items] == ["square.png", "tall.png"]
    assert found.summary()["skipped"] == 2
    with pytest.raises(ConfigError) as error:
        images_spec(inputs, "dataset.scale=0.25")
    text = str(error.value)
    assert "\n" not in text and "smaller than one context crop (128 px at dataset.scale=0.25)" in text
    assert "from dataset.scale=0.33 up" in text  # the tall image's 97 px side holds 32 / 0.33 px


@pytest.mark.parametrize("scale", ["0", "-1", "0.0"])
def test_scale_must_be_positive(inputs, scale):
    with pytest.raises(ConfigError, match=r"^dataset.scale=.*a number > 0[^\n]*$"):
        images_spec(inputs, f"dataset.scale={scale}")


def test_an_unreadable_large_file_is_counted_and_nothing_wrong_is_written(tmp_path):
    folder = write_inputs(tmp_path / "in", [("ok.png", 40, 40, "RGB")])
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(folder / "big.png")
    data = (folder / "big.png").read_bytes()
    (folder / "big.png").write_bytes(data[: len(data) // 2])  # truncated
    spec = images_spec(folder)
    assert [b.name for b in spec.backgrounds.items] == ["ok.png"]
    assert "unreadable" in dict(spec.backgrounds.skipped)["big.png"]
    for sample in make(spec, [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(2)]):
        check_sample(spec, sample)


def test_the_contact_sheet_shows_whole_frames():
    from dmgr.preview import LABEL_HEIGHT, sample_row

    rng = np.random.default_rng(2)
    board = Image.fromarray(rng.integers(0, 200, (112, 160, 3), dtype=np.uint8))
    mask = np.zeros((112, 160), dtype=np.uint8)
    mask[90:100, 140:150] = 255
    meta = {"seed": 0, "class_name": "spur", "mask_area": 100, "window_box": [136, 88, 152, 104],
            "defects": [{"window_box": [136, 88, 152, 104]}]}
    row = np.asarray(sample_row({"png": board, "mask.png": Image.fromarray(mask), "json": meta}, 128))
    first = row[LABEL_HEIGHT:, :128]
    drawn = ~(first == 255).all(-1)
    assert drawn.any(1).sum() == round(112 * 128 / 160) and drawn.any(0).sum() == 128  # aspect ratio kept
    overlay = row[LABEL_HEIGHT:, 128:256]
    assert (overlay[..., 0] > overlay[..., 1] + 60).any(axis=None)  # the mask in the bottom-right corner shows


def test_demo_backgrounds_are_panels_of_boards_at_the_training_pixel_scale(tmp_path):
    from dmgr.data.board import make_board
    from dmgr.data.export import export_global

    paths = export_global(tmp_path, 64, 2, panel=(160, 112), progress=False)
    first = np.asarray(Image.open(paths[0]))
    assert first.shape == (112, 160, 3)
    assert (first[:64, :64] == make_board(0, 64).image).all()  # board 0 at its 64 px training size
    assert (first[64:112, 64:128] == make_board(4, 64).image[:48]).all()  # 3 boards a row, cut to 112 rows
    assert not (np.asarray(Image.open(paths[1]))[:64, :64] == first[:64, :64]).all()


def test_the_reader_keeps_frames_of_different_sizes_apart():
    from dmgr.shards.dataset import collate

    batch = [(torch.zeros(3, 37, 50), torch.zeros(1, 37, 50), {"seed": 0}),
             (torch.ones(3, 130, 97), torch.ones(1, 130, 97), {"seed": 1})]
    images, masks, metas = collate(batch)
    assert [x.shape[1:] for x in images] == [(37, 50), (130, 97)] and [m.shape[1:] for m in masks] == [(37, 50),
                                                                                                      (130, 97)]
    same = collate([batch[0], batch[0]])
    assert same[0].shape == (2, 3, 37, 50)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_the_gate_scores_native_frames_against_the_decoded_input(inputs, scale):
    from types import SimpleNamespace

    from dmgr.synth.screen import screen_scores

    seen = []

    def classifier(window: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(window.shape[-2:]))
        return torch.zeros(1, 7)

    spec = images_spec(inputs, f"dataset.scale={scale}")
    sample = make(spec, [plan_sample(3, spec.dataset, spec.backgrounds)])[0]
    screen = SimpleNamespace(model=classifier, classes=list(spec.dataset.classes),
                           area_ranges={c: (0, 1e9) for c in spec.dataset.classes}, held_out_fidelity=())
    thresholds = spec.screen.thresholds(screen.held_out_fidelity)
    scores, _ = screen_scores(screen, sample["attempt"], spec.dataset.window_size, thresholds)
    assert scores["changed_outside"] == 0 and scores["mask_outside"] == 0
    assert scores["mask_area"] == [sample["json"]["mask_area"]] and seen == [(16, 16)]


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_shard_found_without_a_record_is_checked_against_each_defects_plan(inputs, scale):
    """Adoption compares every json with what the config and the seed's plan give: the frame's size, the
    scale, and each defect's class, window and context box in image pixels."""
    from dmgr.synth.record import config_problem

    spec = images_spec(inputs, f"dataset.scale={scale}", "dataset.defects_per_image=2")
    plans = covering_plans(spec, 4)
    metas = {s["seed"]: json.loads(json.dumps(s["json"])) for s in make(spec, plans)}
    seed = plans[0].seed
    digests = {k: v for k, v in metas[seed]["checkpoints"].items() if k != "model"}
    assert config_problem(spec, digests, metas) is None

    def shifted(meta: dict) -> None:
        meta["defects"][-1]["context_box"][0] += 1

    for key, change in [("defects", shifted),
                        ("defects", lambda m: m["defects"][0].__setitem__("class_id", 9)),
                        ("defects", lambda m: m["defects"].pop()),
                        ("width", lambda m: m.__setitem__("width", m["width"] + 1)),
                        ("scale", lambda m: m.__setitem__("scale", 3.0))]:
        changed = {s: json.loads(json.dumps(m)) for s, m in metas.items()}
        change(changed[seed])
        problem = config_problem(spec, digests, changed)
        assert problem is not None and problem.startswith(f"seed {seed}: its json's {key} is"), problem
