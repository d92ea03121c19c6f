"""The user's background images as the synthesis job reads them: bit depth, orientation, provenance, the
JSONL manifest's text and paths, and the demo's default folder on a fresh clone."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_inputs_decode import exif_rotated, expected8, ramp16
from test_synth_config import spec_of

from dmgr.data.board import make_board
from dmgr.schema import ConfigError
from dmgr.synth import backgrounds as bg
from dmgr.synth.backgrounds import BackgroundError, scan_backgrounds


def board(path, seed: int = 0, size: int = 64):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_board(seed, size).image).save(path)
    return path


def test_a_16_bit_grey_background_is_scaled_not_white(tmp_path, caplog):
    values = ramp16(64, 64)
    (tmp_path / "in").mkdir()
    Image.fromarray(values).save(tmp_path / "in" / "mono.png")
    with caplog.at_level(logging.INFO):
        found = scan_backgrounds(tmp_path / "in", 64, 16, 5)
    image = found.image(0)
    assert (image == expected8(values)[:, :, None]).all()
    assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) > 60
    assert len([r for r in caplog.records if "16-bit" in r.getMessage()]) == 1


def test_a_background_replaced_after_the_scan_is_never_used_under_the_old_digest(tmp_path):
    path = board(tmp_path / "in" / "a.png", seed=1)
    found = scan_backgrounds(tmp_path / "in", 64, 16, 5)
    assert found.items[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    board(path, seed=2)  # replaced while the run goes on
    with pytest.raises(ConfigError, match="changed since the run started") as caught:
        found.image(0)
    assert "a.png" in str(caught.value) and "\n" not in str(caught.value)
    rescanned = scan_backgrounds(tmp_path / "in", 64, 16, 5)  # a new run: the new bytes, their own digest
    assert rescanned.digest != found.digest
    assert (rescanned.image(0) == make_board(2, 64).image).all()


def test_a_roi_drawn_on_the_upright_view_aligns_with_an_exif_rotated_image(tmp_path):
    stored = make_board(3, 80).image[:64]  # stored 80 wide, 64 high; shown turned: 64 wide, 80 high
    (tmp_path / "photo.png").write_bytes(exif_rotated(stored))
    roi = np.zeros((80, 64), dtype=np.uint8)
    roi[8:40] = 255  # rows 8..39 of the upright view
    Image.fromarray(roi).save(tmp_path / "photo.roi.png")
    (tmp_path / "list.jsonl").write_text(json.dumps({"image": "photo.png", "roi": "photo.roi.png"}) + "\n")
    found = scan_backgrounds(tmp_path / "list.jsonl", 64, 16, 5)
    assert len(found) == 1, found.skipped
    upright = np.rot90(stored, k=-1)  # orientation 6: turned 90 degrees clockwise
    assert found.items[0].size == (64, 80)
    assert (found.image(0) == upright).all()  # the whole upright frame, at its own size
    ys, xs = np.nonzero(found.allowed_corners(0))
    assert ys.min() == 8 and ys.max() == 40 - 16 and xs.min() == 5 and xs.max() == 64 - 16 - 5


def test_a_manifest_with_a_byte_order_mark_reads(tmp_path):
    board(tmp_path / "a.png")
    (tmp_path / "list.jsonl").write_text(json.dumps({"image": "a.png"}) + "\n", encoding="utf-8-sig")
    assert [b.name for b in scan_backgrounds(tmp_path / "list.jsonl", 64, 16, 5).items] == ["a.png"]


def test_manifest_paths_are_recorded_normalised(tmp_path):
    board(tmp_path / "lists" / "a.png", seed=1)
    outside = board(tmp_path / "elsewhere" / "b.png", seed=2)
    lines = [{"image": "./sub/../a.png"}, {"image": "../elsewhere/./b.png"}]
    (tmp_path / "lists" / "list.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    names = [b.name for b in scan_backgrounds(tmp_path / "lists" / "list.jsonl", 64, 16, 5).items]
    assert names[0] == "a.png"
    assert names[1] == os.path.normpath(outside.absolute()) and ".." not in names[1]


def test_duplicate_manifest_lines_are_counted_in_one_warning(tmp_path, caplog):
    for name in ("a", "b"):
        board(tmp_path / f"{name}.png")
    lines = ["a.png", "b.png", "a.png", "./a.png", "b.png"]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"image": n}) + "\n" for n in lines))
    with caplog.at_level(logging.WARNING):
        found = scan_backgrounds(tmp_path / "list.jsonl", 64, 16, 5)
    assert [b.name for b in found.items] == ["a.png", "b.png", "a.png", "a.png", "b.png"]  # used as listed
    warnings = [r.getMessage() for r in caplog.records if "earlier line" in r.getMessage()]
    assert len(warnings) == 1 and "3 lines" in warnings[0] and "3 (= 1), 4 (= 1), 5 (= 2)" in warnings[0]


def test_a_manifest_that_is_not_text_is_one_line(tmp_path):
    (tmp_path / "list.jsonl").write_bytes(bytes(range(128, 256)) * 4096)
    with pytest.raises(BackgroundError, match="not UTF-8") as caught:
        scan_backgrounds(tmp_path / "list.jsonl", 64, 16, 5)
    assert "\n" not in str(caught.value)


def make_backgrounds(out: Path, boards: int) -> None:
    """What `make backgrounds` runs (the Makefile's own command line), into `out` with `boards` boards."""
    from dmgr.data.export import main

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    line = re.search(r"-m dmgr\.data\.export --out \$\(DEMO_BACKGROUNDS\) (.*)$", makefile, re.M).group(1)
    args = shlex.split(line)
    args[args.index("--boards") + 1] = str(boards)
    main(["--out", str(out), *args])


def test_the_demo_backgrounds_are_rendered_on_first_use(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bg, "DEMO_BOARDS", 3)
    monkeypatch.setattr("dmgr.synth.config.PROJECT_ROOT", tmp_path / "fresh-clone")
    assert bg.demo_backgrounds("outputs/other/global") is None
    with caplog.at_level(logging.INFO):
        spec = spec_of(["dataset=pcb_demo", "dataset.source=images", f"out_dir={tmp_path / 'run'}"])
    folder = tmp_path / "outputs" / "pcb-backgrounds" / "global"
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert (folder.parent / ".exported").is_file()
    make_backgrounds(tmp_path / "by-make", 3)
    for name in ("global/000000.png", "global/000002.png", "roi/000001.short.png", "backgrounds.jsonl"):
        assert (folder.parent / name).read_bytes() == (tmp_path / "by-make" / name).read_bytes(), name
    assert np.asarray(Image.open(folder / "000000.png")).shape == (112, 160, 3)  # panels, not squares
    assert len(spec.backgrounds) == 3
    assert [r.class_name for r in spec.backgrounds.items[0].class_rois] == list(spec.dataset.classes)
    assert len([r for r in caplog.records if "rendering the demo" in r.getMessage()]) == 1


def test_a_demo_render_without_rois_is_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bg, "DEMO_BOARDS", 2)
    stale = tmp_path / "outputs" / "pcb-backgrounds"
    (stale / "global").mkdir(parents=True)
    (stale / "global" / "000000.png").write_bytes(b"an old render")
    found = bg.demo_backgrounds("outputs/pcb-backgrounds/backgrounds.jsonl")
    assert found == (stale / "backgrounds.jsonl").resolve() and len(found.read_text().splitlines()) == 2
    assert Image.open(stale / "global" / "000000.png").size == (160, 112)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["pcb-backgrounds"]


def make_data(out: Path, per_class: int) -> None:
    """What `make data` runs (the Makefile's own command line), into `out` with `per_class` patches per class
    and no boards."""
    from dmgr.data.export import main

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    args = shlex.split(re.search(r"-m dmgr\.data\.export --out \$\(DEMO_DATA\) (.*)$", makefile, re.M).group(1))
    for flag, value in (("--boards", 0), ("--patches-per-class", per_class), ("--test", 0)):
        args[args.index(flag) + 1] = str(value)
    main(["--out", str(out), *args, "--quiet"])


def test_the_screens_demo_patches_are_rendered_on_first_use_as_make_data_writes_them(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bg, "DEMO_BOARDS", 2)
    monkeypatch.setattr(bg, "DEMO_PATCHES", 3)
    monkeypatch.setattr("dmgr.synth.config.PROJECT_ROOT", tmp_path / "fresh-clone")
    assert bg.demo_patches("outputs/other", ("short",)) is None
    assert bg.demo_patches("outputs/pcb-data", ("short", "scratch")) is None  # not the demo's classes
    assert not (tmp_path / "outputs" / "pcb-data").exists()
    demo = ["dataset=pcb_demo", "dataset.source=images", "screen.enabled=true", f"out_dir={tmp_path / 'r'}"]
    with caplog.at_level(logging.INFO):
        spec = spec_of(demo)
    assert spec.screen.enabled and spec.screen.data_root == (tmp_path / "outputs" / "pcb-data").resolve()
    make_data(tmp_path / "by-make", 3)
    rendered = sorted(p.relative_to(spec.screen.data_root) for p in spec.screen.data_root.rglob("*") if p.is_file())
    assert rendered == sorted(p.relative_to(tmp_path / "by-make") for p in (tmp_path / "by-make" / "local").rglob("*")
                              if p.is_file())
    assert len(rendered) == 6 * 3 * 2 + 1  # a patch and a mask per class and index, and labels.json
    for name in rendered:
        assert (spec.screen.data_root / name).read_bytes() == (tmp_path / "by-make" / name).read_bytes(), name
    assert len([r for r in caplog.records if "defect patches per class" in r.getMessage()]) == 1
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["pcb-backgrounds", "pcb-data"]  # no staging
    with caplog.at_level(logging.INFO):
        assert spec_of(demo).screen.data_digest == spec.screen.data_digest
    assert len([r for r in caplog.records if "defect patches per class" in r.getMessage()]) == 1  # rendered once


def test_a_missing_background_folder_names_the_commands(tmp_path):
    with pytest.raises(ConfigError) as caught:
        spec_of(["dataset=pcb_demo", "dataset.source=images", f"dataset.images={tmp_path / 'nowhere'}"])
    assert "no such folder" in str(caught.value) and "dmgr.data.prepare" in str(caught.value)
    assert "make backgrounds" in str(caught.value)
