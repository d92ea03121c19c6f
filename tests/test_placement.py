"""Placement that knows the class (issue 25): per-class ROIs from the manifest, candidate windows chosen by
the local model, and no defect sample written without its defect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_native_size import images_spec, make, write_inputs

from dmgr.schema import ConfigError
from dmgr.synth.plan import plan_sample

CLASSES = ("missinghole", "mousebite", "opencircuit", "short", "spur", "spuriouscopper")
PCB = ("dataset.classes=[missinghole,mousebite,opencircuit,short,spur,spuriouscopper]",)


def _folder(tmp_path: Path) -> Path:
    return write_inputs(tmp_path / "in", [("a.png", 80, 64, "RGB"), ("b.png", 64, 72, "RGB")])


def _roi(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> str:
    roi = np.zeros(size[::-1], dtype=np.uint8)
    x0, y0, x1, y1 = box
    roi[y0:y1, x0:x1] = 255
    Image.fromarray(roi).save(path)
    return path.name


def per_class_manifest(tmp_path: Path, rois: dict) -> Path:
    """a.png: missinghole only in its left strip, short only in its right strip; b.png: as `rois` says."""
    folder = _folder(tmp_path)
    left = _roi(folder / "left.png", (80, 64), (0, 0, 30, 64))
    right = _roi(folder / "right.png", (80, 64), (50, 0, 80, 64))
    _roi(folder / "whole_b.png", (64, 72), (0, 0, 64, 72))
    lines = [{"image": "a.png", "roi": {"missinghole": left, "short": right}}, {"image": "b.png", **rois}]
    manifest = folder / "in.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return manifest


def test_every_planned_window_lies_in_its_class_roi(tmp_path):
    spec = images_spec(per_class_manifest(tmp_path, {}), *PCB, "dataset.defects_per_image=2",
                       "dataset.placement.candidates=3")
    side = spec.backgrounds.geometry.window
    seen = set()
    for seed in range(300):
        for attempt in (0, 1):
            plan = plan_sample(seed, spec.dataset, spec.backgrounds, attempt)
            for d in plan.defects:
                for x, _ in d.candidates or (d.window,):  # the strips span the height
                    if plan.background == 0 and d.class_name == "missinghole":
                        assert x + side <= 30, (seed, x)
                        seen.add("left")
                    if plan.background == 0 and d.class_name == "short":
                        assert x >= 50, (seed, x)
                        seen.add("right")
    assert seen == {"left", "right"}


def test_a_class_that_fits_nowhere_on_an_image_is_never_planned_there(tmp_path):
    folder = _folder(tmp_path)
    tiny = _roi(folder / "tiny.png", (64, 72), (0, 0, 4, 4))  # no 16 px window fits
    manifest = per_class_manifest(tmp_path, {"roi": {"spur": tiny}})
    spec = images_spec(manifest, *PCB)
    assert not spec.backgrounds.has_room(1, "spur")
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(400)]
    assert not [p.seed for p in plans if p.background == 1 and p.class_name == "spur"]
    assert any(p.class_name == "spur" for p in plans) and any(p.background == 1 for p in plans)


def test_a_class_that_fits_on_no_image_is_a_one_line_error(tmp_path):
    folder = _folder(tmp_path)
    tiny = _roi(folder / "tiny.png", (80, 64), (0, 0, 4, 4))
    manifest = folder / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": name, "roi": {"spur": tiny}}) for name in ("a.png",)))
    with pytest.raises(ConfigError) as err:
        images_spec(manifest, *PCB)
    assert "'spur' fits on no image" in str(err.value) and "m.jsonl" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("roi, words", [({"roi": {"nosuchclass": "whole_b.png"}}, "nosuchclass"),
                                        ({"roi": ["left.png"]}, '"roi" is')])
def test_bad_per_class_rois_are_one_line_errors(tmp_path, roi, words):
    manifest = per_class_manifest(tmp_path, roi)
    with pytest.raises(ConfigError) as err:
        images_spec(manifest, *PCB)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_one_candidate_is_the_plan_without_candidates(tmp_path):
    """candidates=1 draws exactly what the plain plan draws; with more, the first candidate is that window."""
    folder = _folder(tmp_path)
    one = images_spec(folder, *PCB, "dataset.placement.candidates=1")
    four = images_spec(folder, *PCB, "dataset.placement.candidates=4")
    for seed in range(50):
        a, b = plan_sample(seed, one.dataset, one.backgrounds), plan_sample(seed, four.dataset, four.backgrounds)
        assert a.defects[0].candidates == () and len(b.defects[0].candidates) == 4
        assert (a.background, a.window, a.class_id) == (b.background, b.defects[0].candidates[0], b.class_id)


def test_the_chosen_candidate_does_not_depend_on_batch_mates(tmp_path):
    spec = images_spec(_folder(tmp_path), *PCB, "dataset.placement.candidates=4")
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(3)]
    alone = [make(spec, [p])[0]["json"]["defects"][0]["placement"] for p in plans]
    batch = make(spec, plans)
    together = [s["json"]["defects"][0]["placement"] for s in batch]
    assert [p["chosen"] for p in alone] == [p["chosen"] for p in together]
    assert all(p["candidates"] == 4 for p in alone)
    for sample in batch:
        d = sample["json"]["defects"][0]
        assert d["window_box"] == d["candidate_boxes"][d["placement"]["chosen"]]


def _job(tmp_path: Path, name: str, *more: str) -> Path:
    from synth_support import TINY, run_synth
    from test_native_size import SMALL

    images = [*(t for t in TINY if not t.startswith("dataset.source")), "dataset.source=images",
              "schedule.time_travel=false", f"dataset.images={_folder(tmp_path)}", *SMALL, "seeds=0-3",
              "samples_per_shard=2", "batch_size=2", *more]
    run_synth([*images, f"out_dir={tmp_path / name}"])
    return tmp_path / name


@pytest.mark.parametrize("on_exhausted", ["flag", "skip"])
def test_a_mask_below_the_minimum_is_replaced_then_flagged_or_skipped_never_written_silently(tmp_path,
                                                                                             on_exhausted):
    """A minimum no mask can reach (more pixels than a context crop): every seed is re-placed up to
    max_attempts times with a new window each time, then flagged in its json or left out, and counted."""
    from synth_support import manifest, read_samples

    out = _job(tmp_path, on_exhausted, "dataset.placement.min_mask_area=100000",
               "dataset.placement.max_attempts=2", f"dataset.placement.on_exhausted={on_exhausted}")
    metrics = manifest(out)["metrics"]
    assert metrics["empty_masks_replaced"] == 4
    if on_exhausted == "skip":
        assert manifest(out)["num_samples"] == 0 and metrics["empty_masks_skipped"] == 4
        return
    samples = read_samples(out)
    assert len(samples) == 4 and metrics["empty_masks_flagged"] == 4
    for s in samples.values():
        meta = s["json"]
        assert meta["attempt"] == 1 and meta["retries"] == [{"attempt": 0, "reason": "empty_mask"}]
        assert meta["empty_mask"]["flagged"] and meta["empty_mask"]["attempts"] == 2


def test_the_default_minimum_writes_no_sample_with_an_empty_mask(tmp_path):
    from synth_support import manifest, read_samples

    out = _job(tmp_path, "plain")
    flagged = {k for k, s in read_samples(out).items() if "empty_mask" in s["json"]}
    for key, s in read_samples(out).items():
        assert key in flagged or all(d["mask_area"] >= 4 for d in s["json"]["defects"])
    assert manifest(out)["metrics"]["empty_masks_flagged"] == len(flagged)


@pytest.mark.parametrize("where", [["dataset.source=generate"], ["dataset.source=images", "dataset.window_choice=fixed",
                                                                  "dataset.fixed_window=[10,10]"]])
def test_the_default_candidates_leave_a_single_window_alone(tmp_path, where):
    """Generated boards and a fixed window have one window to take: the default candidates (4) apply to real
    images with uniform windows only, and these plans carry no candidates."""
    from test_synth_config import spec_of

    spec = spec_of([*PCB, *where, f"dataset.images={_folder(tmp_path)}", f"out_dir={tmp_path / 'run'}"])
    assert spec.dataset.placement.candidates == 4
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in range(20)]
    assert all(p.defects[0].candidates == () for p in plans)
    if "dataset.window_choice=fixed" in where:
        assert {p.window for p in plans} == {(10, 10)}
