"""Real evaluation data, the baseline sources, the patch classifier and the segmenter."""

import pytest
import torch

from dmgr.data import make_board
from dmgr.data.export import GLOBAL_OFFSET, TEST_OFFSET
from dmgr.eval.real import (
    CLEAN,
    USER,
    Boards,
    clean_boards,
    defect_patches,
    defective_boards,
    heldout_boards,
)
from dmgr.eval.segment import SegmentSettings, detection_scores, predict_maps, train_segmenter
from dmgr.eval.sources import cut_paste, perlin_anomalies, perlin_noise
from dmgr.images import from_uint8


def test_test_boards_are_the_exported_test_set_plus_clean_boards():
    test = heldout_boards(7, 3, 64)
    assert test.images.shape == (10, 3, 64, 64) and test.masks.shape == (10, 1, 64, 64)
    assert test.classes.tolist() == [0, 1, 2, 3, 4, 5, 0, -1, -1, -1]
    assert test.masks[:7].flatten(1).any(1).all() and not test.masks[7:].any()
    # the mask marks exactly where the defective board differs from its clean board
    clean = from_uint8(make_board(TEST_OFFSET + 2, 64).image[None])
    assert torch.equal((test.images[2:3] != clean).any(1, keepdim=True), test.masks[2:3])


def test_patches_hold_one_of_each_label_per_board():
    patches = defect_patches(USER, 3, 64, 16, jitter=2, seed=0)
    assert patches.images.shape == (21, 3, 16, 16)
    assert sorted(patches.labels.tolist()) == sorted(list(range(7)) * 3)
    assert not patches.masks[patches.labels == CLEAN].any()
    assert patches.masks[patches.labels != CLEAN].flatten(1).any(1).all()


def test_cut_paste_changes_only_the_window_and_masks_the_pasted_defect():
    n = 6
    pairs = cut_paste(n, 64, 16, margin=5, seed=3)
    backgrounds = clean_boards(GLOBAL_OFFSET, n, 64).images
    changed = (pairs.images != backgrounds).any(1)
    for i in range(n):
        ys, xs = torch.nonzero(changed[i] | pairs.masks[i, 0], as_tuple=True)
        assert xs.max() - xs.min() < 16 and ys.max() - ys.min() < 16  # changes and mask: one window
        assert pairs.masks[i].any()
    assert pairs.classes.tolist() == [0, 1, 2, 3, 4, 5]


def test_perlin_noise_is_deterministic_and_bounded():
    a = perlin_noise(64, 64, (4, 2), torch.Generator().manual_seed(0))
    b = perlin_noise(64, 64, (4, 2), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (64, 64)
    assert a.abs().max() <= 1.0 + 1e-6 and a.std() > 0.1


def test_perlin_anomalies_blend_only_inside_their_mask():
    pairs = perlin_anomalies(5, 64, seed=1)
    backgrounds = clean_boards(GLOBAL_OFFSET, 5, 64).images
    outside = ~pairs.masks.expand_as(pairs.images)
    assert torch.allclose(pairs.images[outside], backgrounds[outside])
    assert pairs.masks.flatten(1).any(1).all()
    assert (pairs.images[~outside] - backgrounds[~outside]).abs().mean() > 0.05


@pytest.mark.slow
def test_segmenter_learns_an_obvious_defect():
    g = torch.Generator().manual_seed(0)
    n, size = 32, 32
    images = torch.rand(n, 3, size, size, generator=g) * 0.2 - 0.6
    masks = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in range(n):
        x, y = torch.randint(2, size - 8, (2,), generator=g).tolist()
        masks[i, 0, y : y + 5, x : x + 5] = True
    images = torch.where(masks, torch.tensor(0.8), images)
    train = Boards(images[:24], masks[:24], torch.zeros(24, dtype=torch.long))
    # the last two test boards are clean: their square is as dark as the background
    test_images = torch.cat([images[24:30], torch.where(masks[30:], torch.tensor(-0.5), images[30:])])
    test_masks = torch.cat([masks[24:30], torch.zeros_like(masks[30:])])
    test = Boards(test_images, test_masks, torch.tensor([0, 1, 2, 3, 4, 5, -1, -1]))
    model = train_segmenter(train, SegmentSettings(steps=200, batch_size=8, width=8, lr=1e-2), seed=0)
    scores = detection_scores(predict_maps(model, test.images), test)
    assert scores["pixel_auroc"] > 0.95 and scores["pixel_ap"] > 0.8 and scores["mean_iou"] > 0.5


@pytest.mark.slow
def test_segmenter_training_is_seeded():
    pairs = defective_boards(USER, 4, 32)
    settings = SegmentSettings(steps=3, batch_size=2, width=4)
    a, b = train_segmenter(pairs, settings, seed=5), train_segmenter(pairs, settings, seed=5)
    c = train_segmenter(pairs, settings, seed=6)
    x = pairs.images[:2]
    assert torch.equal(predict_maps(a, x), predict_maps(b, x))
    assert not torch.equal(predict_maps(a, x), predict_maps(c, x))
