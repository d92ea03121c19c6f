"""The procedural PCB domain: boards, the six defect classes with exact masks, the export, the datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmgr.data import (
    CLASS_NAMES,
    ImageFolderDataset,
    PatchDataset,
    add_defect,
    export_global,
    export_local,
    export_test,
    make_board,
    patch_window,
)
from dmgr.data.defects import defect_sites
from dmgr.data.export import GLOBAL_OFFSET, TEST_OFFSET, board_seed


@cache
def board(seed: int, size: int):
    return make_board(seed, size)


def test_class_names_in_pku_order():
    assert CLASS_NAMES == ("missinghole", "mousebite", "opencircuit", "short", "spur", "spuriouscopper")


def test_board_is_deterministic_per_seed():
    a, b, c = make_board(3, 64), make_board(3, 64), make_board(4, 64)
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
    assert np.array_equal(a.image, b.image)
    assert a.traces == b.traces and a.pads == b.pads
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("size", [64, 256])
def test_board_sizes_share_one_layout(size):
    small, big = board(7, 64), board(7, size)
    assert big.image.shape == (size, size, 3)
    assert len(big.traces) == len(small.traces) and len(big.pads) == len(small.pads)
    # The 256 px board shrunk to 64 px looks like the 64 px board (same geometry, colours and lighting).
    shrunk = np.asarray(Image.fromarray(big.image).resize((64, 64), Image.BOX), dtype=float)
    assert np.abs(shrunk - small.image.astype(float)).mean() < 8


def test_board_looks_like_a_bare_pcb():
    b = board(1, 256)
    img = b.image.astype(float)
    green = (img[..., 1] > img[..., 0] + 20) & (img[..., 1] > img[..., 2])
    copper = (img[..., 0] > 120) & (img[..., 0] > img[..., 2] + 40)
    assert green.mean() > 0.4 and copper.mean() > 0.08  # mostly solder mask, plenty of copper
    assert b.pairs and sum(p.kind == "pad" and p.hole > 0 for p in b.pads) >= 2
    assert img[..., 1].std() > 3  # texture and lighting, not flat colour


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("class_id", range(6))
def test_defect_mask_is_exactly_the_change(class_id, size):
    for seed in (2, 9):
        b = board(seed, size)
        image, mask, box = add_defect(b, class_id, seed=5)
        assert image.shape == b.image.shape and image.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == bool and mask.any()
        change = np.abs(image.astype(float) - b.image.astype(float)).mean(axis=-1)
        assert change[~mask].mean() < 1.0
        assert change[mask].mean() > 10
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert mask.sum() < size * size / 16 / 2  # a defect, smaller than half a window


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_defect_is_deterministic(class_name):
    b = board(4, 64)
    first, again = add_defect(b, class_name, 3), add_defect(b, class_name, 3)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    others = [add_defect(b, class_name, s)[1] for s in range(4, 8)]
    assert any(not np.array_equal(first[1], m) for m in others)


def test_defect_goes_near_the_center():
    b = board(5, 256)
    pad = next(p for p in b.pads if p.kind == "pad" and p.hole > 0)
    _, mask, _ = add_defect(b, "missinghole", 0, center=pad.center)
    assert mask[int(pad.center[1]), int(pad.center[0])]
    # The middle of the longest trace stretch well inside the board (the outer track of the main bus).
    segs = [(np.hypot(*(q - p)), (p + q) / 2) for i in b.pairs[0] for p, q in zip(
        np.asarray(b.traces[i].points)[:-1], np.asarray(b.traces[i].points)[1:], strict=True)]
    target = max((s for s in segs if (s[1] > 40).all() and (s[1] < 216).all()), key=lambda s: s[0])[1]
    for name in ("opencircuit", "mousebite", "short", "spur"):
        _, _, box = add_defect(b, name, 0, center=target)
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        assert np.hypot(*(centre - target)) < 40, name


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_defects_go_where_their_class_sites_are(class_name):
    """The demo's per-class ROIs are built from `defect_sites`: every real defect of the class is centred on one
    (within 1.5 px at 64 px), and the sites of a class are not everywhere (pads are few, bare mask is not a trace)."""
    far = 0
    for seed in range(12):
        b = board(300 + seed, 64)
        _, _, box = add_defect(b, class_name, seed)
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        sites = defect_sites(b, class_name)
        assert sites.shape[1] == 2 and len(sites)
        far += np.abs(sites - centre).max(1).min() > 1.5
    assert far == 0
    b = board(300, 64)
    layer = "hole" if class_name == "missinghole" else "trace"
    on_layer = np.mean([b.coverage[layer][int(y), int(x)] > 0 for x, y in defect_sites(b, class_name)])
    expected = {"missinghole": True, "mousebite": True, "opencircuit": True, "spur": False, "spuriouscopper": False}
    if class_name in expected:
        assert on_layer > 0.9 if expected[class_name] else on_layer < 0.1


def test_class_rois_of_a_panel_hold_the_windows_centred_on_sites(tmp_path):
    from dmgr.synth.backgrounds import scan_backgrounds

    paths = export_global(tmp_path, 64, 2, panel=(160, 112), progress=False, roi_slack=2)
    lines = [json.loads(line) for line in (tmp_path / "backgrounds.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == [f"global/{p.name}" for p in paths]
    for line in lines:
        assert sorted(line["roi"]) == sorted(CLASS_NAMES)
        for name, roi_path in line["roi"].items():
            roi = np.asarray(Image.open(tmp_path / roi_path)) > 0
            assert roi.shape == (112, 160) and 0 < roi.mean() < 1, name
    # Read back by the synthesis job: the windows it may place a class in are centred near a site of that class:
    # half within the slack + a pixel of rounding, the others where the squares of neighbouring sites overlap
    # (e.g. along a row of pads).
    found = scan_backgrounds(tmp_path / "backgrounds.jsonl", 64, 16, 5)
    boards = [board(board_seed(GLOBAL_OFFSET, 0, j), 64) for j in range(6)]
    for name in CLASS_NAMES:
        corners = np.argwhere(found.allowed_corners(0, name))
        assert len(corners), name
        sites = np.concatenate([defect_sites(b, name) + [64 * (j % 3), 64 * (j // 3)] for j, b in enumerate(boards)])
        centres = corners[:, ::-1] + 8
        distance = np.abs(centres[:, None] - sites[None]).max(-1).min(1)
        assert np.median(distance) <= 3 and np.percentile(distance, 90) <= 6, name


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown defect class"):
        add_defect(board(1, 64), "scratch", 0)
    with pytest.raises(ValueError, match="board size"):
        make_board(0, 8)


def test_patch_window_is_centred_and_clamped():
    assert patch_window([30, 30, 34, 34], 16, 64) == [24, 24, 40, 40]
    assert patch_window([0, 60, 3, 64], 16, 64) == [0, 48, 16, 64]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("pcb")
    export_global(out, 64, 2, seed=1, progress=False)
    export_local(out, 64, 2, seed=1, progress=False)
    export_test(out, 64, 6, seed=1, progress=False)
    return out


def test_export_functions_write_the_folders(exported):
    assert sorted(p.name for p in (exported / "global").iterdir()) == ["000000.png", "000001.png"]
    assert Image.open(exported / "global" / "000000.png").size == (64, 64)
    labels = json.loads((exported / "local" / "labels.json").read_text())
    assert labels["patch_size"] == 16 and len(labels["items"]) == 12
    for item in labels["items"]:
        patch, mask = Image.open(exported / "local" / item["file"]), Image.open(exported / "local" / item["mask"])
        assert patch.size == mask.size == (16, 16) and patch.mode == "RGB" and mask.mode == "L"
        assert np.asarray(mask).max() == 255 and item["file"].startswith(item["class_name"] + "/")
        assert CLASS_NAMES[item["class_id"]] == item["class_name"]
    metas = [json.loads((exported / "test" / f"{i:06d}.json").read_text()) for i in range(6)]
    assert [m["class_name"] for m in metas] == list(CLASS_NAMES)
    for i, m in enumerate(metas):
        mask = np.asarray(Image.open(exported / "test" / f"{i:06d}.mask.png")) > 127
        x0, y0, x1, y1 = m["box"]
        assert mask.sum() == mask[y0:y1, x0:x1].sum() > 0


def test_export_parts_use_disjoint_seeds():
    seeds = {board_seed(GLOBAL_OFFSET, 0, i) for i in range(100)}
    assert not seeds & {board_seed(TEST_OFFSET, 0, i) for i in range(100)}
    with pytest.raises(ValueError):
        board_seed(GLOBAL_OFFSET, 9_999_999, 5)


def test_export_cli(tmp_path):
    cmd = [sys.executable, "-m", "dmgr.data.export", "--out", str(tmp_path), "--size", "64", "--boards", "1",
           "--patches-per-class", "1", "--test", "1", "--seed", "3", "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    assert (tmp_path / "global" / "000000.png").is_file()
    assert all((tmp_path / "local" / c / "000000.mask.png").is_file() for c in CLASS_NAMES)
    assert {p.name for p in (tmp_path / "test").iterdir()} == {"000000.png", "000000.mask.png", "000000.json"}


def test_datasets_read_the_export(exported):
    ds = ImageFolderDataset(exported / "global", 64, flip=True)
    assert len(ds) == 4
    x = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() < x.max() <= 1
    assert torch.equal(ds[2], x.flip(-1))
    assert ImageFolderDataset(exported / "global", 32)[1].shape == (3, 32, 32)
    patches = PatchDataset(exported / "local")
    assert len(patches) == 12
    labels = sorted(patches[i][1] for i in range(len(patches)))
    assert labels == sorted(list(range(6)) * 2)
    assert patches[0][0].shape == (3, 16, 16)
    only = PatchDataset(exported / "local", classes=("short", "spur"))
    assert {only[i][1] for i in range(len(only))} == {0, 1}
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(Path(exported) / "nothing", 64)


def test_domain_sheet_renders():
    from dmgr.data.sheet import domain_sheet

    sheet = domain_sheet(seed=2, sizes=(64,), cell=64)
    assert sheet.size == (7 * 64, 2 * (64 + 14))
