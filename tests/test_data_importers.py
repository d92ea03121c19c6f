"""Importers: a folder of defect-free images, and Pascal VOC boxes in the PKU-Market-PCB layout."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr.data import PKU_CLASS_MAP, import_image_folder, import_voc
from dmgr.data.importers import main

VOC = Path(__file__).parent / "fixtures" / "voc"
IMAGES, ANNOTATIONS = VOC / "images", VOC / "annotations"
BROKEN = str(IMAGES / "broken.jpg")


def test_voc_cuts_patches_centred_on_boxes(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary = import_voc(IMAGES, ANNOTATIONS, tmp_path, PKU_CLASS_MAP, patch_size=32)
    assert summary["images"] == 2 and summary["patches"] == 3
    assert summary["per_class"] == {"missinghole": 1, "spur": 1, "short": 1}
    assert summary["unknown_classes"] == {"scratch": 2}
    assert summary["skipped"] == [BROKEN]
    assert any(BROKEN in r.getMessage() for r in caplog.records)
    assert sum("scratch" in r.getMessage() for r in caplog.records) == 1  # reported once
    for name in ("missinghole/board_a_0.png", "spur/board_a_1.png", "short/board_b_0.png"):
        assert Image.open(tmp_path / name).size == (32, 32)
    # missing_hole box (10, 12, 22, 24): centre (16, 18), the window moves inside the image to x0=0, y0=2.
    source = np.asarray(Image.open(IMAGES / "board_a.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "missinghole" / "board_a_0.png")), source[2:34, 0:32])
    # spur box (100, 60, 118, 78) in a 120 x 80 image: clamped to the bottom-right corner.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "spur" / "board_a_1.png")), source[48:80, 88:120])
    labels = json.loads((tmp_path / "labels.json").read_text())["items"]
    assert {item["class_id"] for item in labels} == {0, 3, 4}


def test_voc_rescales_the_board_first(tmp_path):
    summary = import_voc(IMAGES, ANNOTATIONS, tmp_path, {"short": "short", "missing_hole": 0}, patch_size=16,
                         image_size=40)
    assert summary["per_class"] == {"missinghole": 1, "short": 1}
    assert summary["unknown_classes"] == {"spur": 1, "scratch": 2}
    assert Image.open(tmp_path / "short" / "board_b_0.png").size == (16, 16)


def test_voc_skips_a_corrupt_annotation(tmp_path, caplog):
    annotations = tmp_path / "annotations"
    shutil.copytree(ANNOTATIONS, annotations)
    (annotations / "zz_bad.xml").write_text("<annotation><object>")
    with caplog.at_level(logging.WARNING):
        summary = import_voc(IMAGES, annotations, tmp_path / "out", PKU_CLASS_MAP, patch_size=32)
    assert summary["patches"] == 3 and str(annotations / "zz_bad.xml") in summary["skipped"]
    assert any("zz_bad.xml" in r.getMessage() for r in caplog.records)


def test_image_folder_resizes_and_crops(tmp_path, caplog):
    nested = tmp_path / "src" / "line2"
    nested.mkdir(parents=True)
    Image.open(IMAGES / "board_a.jpg").save(nested / "a.bmp")
    with caplog.at_level(logging.WARNING):
        summary = import_image_folder(IMAGES, tmp_path / "out", 48)
        nested_summary = import_image_folder(tmp_path / "src", tmp_path / "out2", 48)
    assert summary == {"written": 2, "skipped": [BROKEN]}
    assert any(BROKEN in r.getMessage() for r in caplog.records)
    for name in ("board_a.png", "board_b.png"):
        img = Image.open(tmp_path / "out" / name)
        assert img.size == (48, 48) and img.mode == "RGB"
    assert nested_summary["written"] == 1 and (tmp_path / "out2" / "line2_a.png").is_file()


def test_importers_cli(tmp_path, capsys):
    main(["voc", "--images", str(IMAGES), "--annotations", str(ANNOTATIONS), "--dst", str(tmp_path / "voc"),
          "--patch-size", "24", "--map", "short=short", "spur=spur"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["per_class"] == {"short": 1, "spur": 1}
    main(["folder", str(IMAGES), str(tmp_path / "clean"), "--size", "32"])
    assert json.loads(capsys.readouterr().out)["written"] == 2
