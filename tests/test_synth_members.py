"""dmgr.synth.record.members: an attempt's typed results -> the members the run's extras name, with known
pixel values, and its json's boxes, areas and loss."""

from __future__ import annotations

import numpy as np
import pytest
from test_synth_config import spec_of

from dmgr.synth.engine import Attempt, DefectResult
from dmgr.synth.plan import plan_sample
from dmgr.synth.record import attempt_sample

DIGESTS = {"global": "g", "local": "l"}


def attempt_of(spec, plan, value: int) -> Attempt:
    """Image value `value`, every mask method the same 2x3 block at (x, y) = (5, 7)."""
    size, w = spec.dataset.image_size, spec.dataset.window_size
    mask = np.zeros((size, size), dtype=bool)
    mask[7:9, 5:8] = True
    methods = spec.available_masks if spec.extras.masks else (spec.mask.method,)
    defect = DefectResult(plan.defects[0], [1, 2, 1 + w, 2 + w], [5, 7, 8, 9], 6, 0.5)
    attempt = Attempt(plan, np.full((size, size, 3), value, np.uint8), mask, [defect], True,
                      masks={m: mask for m in methods})
    if spec.extras.crop:
        attempt.pictures = {"crop": np.full((w, w, 3), 255, np.uint8), "twin": np.full((size, size, 3), 255, np.uint8),
                            "paste": np.full((size, size, 3), 127, np.uint8)}
        attempt.paste_mask = ~mask
    return attempt


@pytest.mark.parametrize("extras", [[], ["extras.crop=true", "extras.twin=true", "extras.masks=true",
                                         "extras.paste=true"]])
def test_members_are_the_ones_the_extras_name_with_known_values(tmp_path, extras):
    spec = spec_of([*extras, f"out_dir={tmp_path / 'run'}"])
    plans = [plan_sample(s, spec.dataset) for s in (3, 4)]
    samples = [attempt_sample(spec, DIGESTS, attempt_of(spec, p, v)) for p, v in zip(plans, (0, 127))]

    names = spec.extras.members(spec.available_masks)
    expected = ("png", "mask.png", "json")
    if extras:
        expected += ("crop.png", "twin.png", "mask_local.png", "mask_diff.png", "mask_gate.png",
                     "paste.png", "paste_mask.png")
    assert names == expected
    block = np.zeros((64, 64), dtype=np.uint8)
    block[7:9, 5:8] = 255
    for k, sample in enumerate(samples):
        assert list(sample) == ["seed", *names] and sample["seed"] == plans[k].seed
        assert sample["png"].mode == "RGB" and sample["png"].size == (64, 64)
        assert (np.asarray(sample["png"]) == (0, 127)[k]).all()
        masks = [n for n in names if n.startswith("mask")]
        for name in masks:
            assert sample[name].mode == "L" and np.array_equal(np.asarray(sample[name]), block), name
        meta = sample["json"]
        assert meta["seed"] == plans[k].seed and meta["class_name"] == plans[k].class_name
        assert meta["window_box"] == [1, 2, 17, 18] and meta["final_loss"] == 0.5
        assert meta["mask_box"] == [5, 7, 8, 9] and meta["mask_area"] == 6
        assert meta["checkpoints"] == {"model": "tiny_random", **DIGESTS} and "defects" not in meta
        if extras:
            assert (np.asarray(sample["crop.png"]) == 255).all() and sample["crop.png"].size == (16, 16)
            assert (np.asarray(sample["twin.png"]) == 255).all()
            assert (np.asarray(sample["paste.png"]) == 127).all()
            assert np.array_equal(np.asarray(sample["paste_mask.png"]), 255 - block)
