"""shard_members: a batch's tensors -> the members the run's extras name, with known pixel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_synth_config import spec_of

from dmgr.synth.engine import Batch, shard_members
from dmgr.synth.plan import plan_sample

DIGESTS = {"global": "g", "local": "l"}


def batch_of(spec, plans, extras: bool) -> Batch:
    """Two samples: image values -1 / 0, every mask method the same 2x3 block at (x, y) = (5, 7)."""
    size, w = spec.dataset.image_size, spec.dataset.window_size
    b = len(plans)
    mask = torch.zeros(b, size, size, dtype=torch.bool)
    mask[:, 7:9, 5:8] = True
    image = torch.stack([torch.full((3, size, size), -1.0), torch.zeros(3, size, size)])
    methods = spec.available_masks if spec.extras.masks else (spec.mask.method,)
    defects = [[{"window_box": [1, 2, 1 + w, 2 + w], "final_loss": 0.5}] for _ in plans]
    batch = Batch(image, {m: mask for m in methods}, defects, [True, False])
    if extras:
        batch.crop = torch.ones(b, 3, w, w)
        batch.twin = torch.full((b, 3, size, size), 2.0)  # clamped to 255
        batch.paste, batch.paste_mask = torch.zeros(b, 3, size, size), ~mask
    return batch


@pytest.mark.parametrize("extras", [[], ["extras.crop=true", "extras.twin=true", "extras.masks=true",
                                         "extras.paste=true"]])
def test_members_are_the_ones_the_extras_name_with_known_values(tmp_path, extras):
    spec = spec_of([*extras, f"out_dir={tmp_path / 'run'}"])
    plans = [plan_sample(s, spec.dataset) for s in (3, 4)]
    samples = shard_members(spec, DIGESTS, plans, batch_of(spec, plans, bool(extras)))

    names = spec.extras.members(spec.available_masks)
    expected = ("png", "mask.png", "json")
    if extras:
        expected += ("crop.png", "twin.png", "mask_local.png", "mask_diff.png", "mask_gate.png",
                     "paste.png", "paste_mask.png")
    assert names == expected
    assert [s["seed"] for s in samples] == [3, 4] and [s["finite"] for s in samples] == [True, False]
    block = np.zeros((64, 64), dtype=np.uint8)
    block[7:9, 5:8] = 255
    for k, sample in enumerate(samples):
        assert list(sample) == ["seed", "finite", *names]
        assert sample["png"].mode == "RGB" and sample["png"].size == (64, 64)
        assert (np.asarray(sample["png"]) == (0, 127)[k]).all()  # to_uint8: (x + 1) * 127.5, truncated
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
