"""The downstream benchmark at a native-size run's frame size: the held-out boards, the rendered sources and
the segmenter on W x H panels of boards (the demo backgrounds' layout and pixel scale)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from dmgr.data import make_board
from dmgr.data.defects import add_defect
from dmgr.data.export import GLOBAL_OFFSET, TEST_OFFSET, make_panel, panel_tiles
from dmgr.eval.downstream import DownstreamSettings, heldout_set, model_key
from dmgr.eval.real import CLEAN_TEST, PANEL_FILL, USER, defective_boards, heldout_boards, in_panel
from dmgr.eval.segment import SegmentSettings, SegNet, predict_maps, random_crops, train_segmenter
from dmgr.eval.sources import cut_paste, perlin_anomalies
from dmgr.images import from_uint8

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

PANEL = (80, 56)  # 3 x 2 tiles of 32 px boards, the last column and row cut


def _tile_of(mask: torch.Tensor, size: int) -> tuple[slice, slice, int, int]:
    """Row and column slices of the panel tile that holds the mask, and the visible height and width."""
    ys, xs = torch.nonzero(mask[0], as_tuple=True)
    x, y = int(xs.min()) // size * size, int(ys.min()) // size * size
    h, w = min(size, mask.shape[1] - y), min(size, mask.shape[2] - x)
    return slice(y, y + h), slice(x, x + w), h, w


def test_test_panels_hold_the_square_test_boards_with_their_exact_masks():
    square, panels = heldout_boards(7, 2, 32), heldout_boards(7, 2, 32, PANEL)
    assert panels.images.shape == (9, 3, 56, 80) and panels.masks.shape == (9, 1, 56, 80)
    assert torch.equal(panels.classes, square.classes)
    for i in range(7):  # the same board, defect and mask, whole, in one tile
        rows, cols, h, w = _tile_of(panels.masks[i], 32)
        assert torch.equal(panels.images[i, :, rows, cols], square.images[i, :, :h, :w])
        assert torch.equal(panels.masks[i, :, rows, cols], square.masks[i, :, :h, :w])
        assert int(panels.masks[i].sum()) == int(square.masks[i].sum())
    assert not panels.masks[7:].any()
    # the mask marks exactly where a defective panel differs from the same panel without the defect
    clean = from_uint8(make_board(TEST_OFFSET + 2, 32).image[None])[0]
    rows, cols, h, w = _tile_of(panels.masks[2], 32)
    without = panels.images[2].clone()
    without[:, rows, cols] = clean[:, :h, :w]
    assert torch.equal((panels.images[2] != without).any(0, keepdim=True), panels.masks[2])


def test_the_other_tiles_are_boards_of_the_same_held_out_stream_used_nowhere_else():
    panels = heldout_boards(2, 2, 32, PANEL)
    tiles = panel_tiles(32, PANEL)
    corners = [(x, y) for y in (0, 32) for x in (0, 32, 64)]
    for i, (offset, k) in enumerate([(TEST_OFFSET, 0), (TEST_OFFSET, 1), (CLEAN_TEST, 0), (CLEAN_TEST, 1)]):
        image, fill = panels.images[i], offset + PANEL_FILL + k * tiles
        own = 0
        for x, y in corners:
            h, w = min(32, 56 - y), min(32, 80 - x)
            block = image[:, y : y + h, x : x + w]
            if torch.equal(block, from_uint8(make_board(offset + k, 32).image[None])[0, :, :h, :w]):
                own += 1
                continue
            fillers = [from_uint8(make_board(fill + t, 32).image[None])[0, :, :h, :w] for t in range(tiles)]
            assert any(torch.equal(block, f) for f in fillers) or panels.masks[i, :, y : y + h, x : x + w].any()
        assert own + int(panels.masks[i].any()) == 1


def test_real_panels_of_the_user_stream_are_the_user_boards():
    square, panels = defective_boards(USER, 6, 32), defective_boards(USER, 6, 32, panel=PANEL)
    for i in range(6):
        rows, cols, h, w = _tile_of(panels.masks[i], 32)
        assert torch.equal(panels.images[i, :, rows, cols], square.images[i, :, :h, :w])


def test_cut_paste_into_panels_changes_only_the_window_of_the_demo_background():
    n, window, margin = 6, 8, 2
    pairs = cut_paste(n, 32, window, margin, seed=3, panel=PANEL)
    assert pairs.images.shape == (n, 3, 56, 80)
    tiles = panel_tiles(32, PANEL)
    for i in range(n):
        background = from_uint8(make_panel([GLOBAL_OFFSET + i * tiles + j for j in range(tiles)], 32, PANEL)[None])
        changed = (pairs.images[i : i + 1] != background).any(1)[0]
        ys, xs = torch.nonzero(changed | pairs.masks[i, 0], as_tuple=True)
        assert xs.max() - xs.min() < window and ys.max() - ys.min() < window  # changes and mask: one window
        assert pairs.masks[i].any()
        assert margin <= int(xs.min()) and int(xs.max()) < 80 - margin
        assert margin <= int(ys.min()) and int(ys.max()) < 56 - margin
    # windows spread over the whole panel, not only the first 32 px board
    centres = [torch.nonzero(m[0]).float().mean(0) for m in cut_paste(24, 32, window, margin, panel=PANEL).masks]
    assert max(float(c[1]) for c in centres) > 40


def test_perlin_anomalies_on_panels_blend_only_inside_their_mask():
    pairs = perlin_anomalies(3, 32, seed=1, panel=PANEL)
    tiles = panel_tiles(32, PANEL)
    assert pairs.images.shape == (3, 3, 56, 80) and pairs.masks.flatten(1).any(1).all()
    for i in range(3):
        background = from_uint8(make_panel([GLOBAL_OFFSET + i * tiles + j for j in range(tiles)], 32, PANEL)[None])
        outside = ~pairs.masks[i : i + 1].expand(1, 3, -1, -1)
        assert torch.equal(pairs.images[i : i + 1][outside], background[outside])


def test_segnet_takes_any_frame_size():
    model = SegNet(4, 7).eval()
    for height, width in ((56, 80), (55, 81), (30, 17)):
        assert model(torch.zeros(2, 3, height, width)).shape == (2, 7, height, width)


def test_segmenter_trains_and_predicts_on_panels():
    pairs = defective_boards(USER, 4, 32, panel=PANEL)
    for task in ("binary", "classes"):
        settings = SegmentSettings(steps=3, batch_size=2, width=4, task=task)
        maps = predict_maps(train_segmenter(pairs, settings, seed=0), pairs.images[:2])
        assert maps.shape == (2, 1 if task == "binary" else 7, 56, 80) and torch.isfinite(maps).all()


def test_training_crops_cut_image_and_mask_at_the_same_place_and_leave_small_frames_whole():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 3 * 56 * 80, dtype=torch.float32).view(2, 3, 56, 80)
    masks = images[:, :1] % 7 == 0
    crops, crop_masks = random_crops(g, images, masks, 32)
    assert crops.shape == (2, 3, 32, 32) and crop_masks.shape == (2, 1, 32, 32)
    for image, crop, crop_mask in zip(images, crops, crop_masks):
        flat = int(crop[0, 0, 0])  # the crop's first pixel locates it in its frame
        y, x = divmod(flat % (56 * 80), 80)
        assert torch.equal(crop, image[:, y : y + 32, x : x + 32])
        assert torch.equal(crop_mask, image[:1, y : y + 32, x : x + 32] % 7 == 0)
    state = g.get_state()
    whole = random_crops(g, images[..., :32, :32], masks[..., :32, :32], 32)
    assert whole[0] is not None and torch.equal(whole[0], images[..., :32, :32])
    assert torch.equal(g.get_state(), state)  # nothing drawn: 64 px benchmarks train as before
    with pytest.raises(Exception, match="segment.crop"):
        SegmentSettings(crop=30)


def test_crops_change_the_model_key_and_training_on_panels():
    pairs = defective_boards(USER, 4, 32, panel=PANEL)
    settings = DownstreamSettings(image_size=32, window=8, panel=PANEL)
    whole = replace(settings, segment=replace(settings.segment, crop=None))
    assert model_key(pairs, settings, 0) != model_key(pairs, whole, 0)
    small = SegmentSettings(steps=3, batch_size=2, width=4, crop=32)
    cropped = predict_maps(train_segmenter(pairs, small, seed=0), pairs.images[:2])
    uncropped = predict_maps(train_segmenter(pairs, replace(small, crop=None), seed=0), pairs.images[:2])
    assert cropped.shape == uncropped.shape == (2, 1, 56, 80)  # tested on whole frames either way
    assert (cropped - uncropped).abs().max() > 1e-4


def test_panel_models_have_their_own_cache_keys():
    pairs = defective_boards(USER, 2, 32)
    square = DownstreamSettings(image_size=32, window=8)
    assert model_key(pairs, square, 0) != model_key(pairs, replace(square, panel=PANEL), 0)
    assert model_key(pairs, square, 0) == model_key(pairs, replace(square, panel=None), 0)


def test_a_one_tile_panel_is_the_board_itself_and_a_defect_that_fits_no_tile_is_refused():
    image, mask, box = add_defect(make_board(TEST_OFFSET, 32), 0, 0)
    out, out_mask = in_panel(image, mask, box, TEST_OFFSET, 0, 32, (32, 32))
    assert np.array_equal(out, image) and np.array_equal(out_mask, mask)
    with pytest.raises(ValueError, match="fits no tile of a 1x1 panel"):
        in_panel(image, mask, box, TEST_OFFSET, 0, 32, (1, 1))


def test_the_test_set_is_cached_by_the_settings_that_shape_it(tmp_path):
    settings = DownstreamSettings(test_defective=3, test_clean=1, image_size=32, window=8, panel=PANEL)
    first = heldout_set(settings, tmp_path)
    assert len(list(tmp_path.glob("test-*.pt"))) == 1
    again = heldout_set(settings, tmp_path)
    for field in ("images", "masks", "classes"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    assert torch.equal(first.images, heldout_boards(3, 1, 32, PANEL).images)
    square = heldout_set(replace(settings, panel=None), tmp_path)
    assert square.images.shape == (4, 3, 32, 32) and len(list(tmp_path.glob("test-*.pt"))) == 2


def test_a_test_set_without_clean_boards():
    for panel, shape in ((PANEL, (56, 80)), (None, (32, 32))):
        boards = heldout_boards(2, 0, 32, panel)
        assert boards.images.shape == (2, 3, *shape) and boards.classes.tolist() == [0, 1]
