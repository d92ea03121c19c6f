"""Importers: a folder of defect-free images, and Pascal VOC boxes in the PKU-Market-PCB layout."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmgr.data import PKU_CLASS_MAP, import_image_folder, import_voc
from dmgr.data.importers import import_coco, main
from dmgr.data.patches import import_masked

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
    assert summary == {"written": 2, "skipped": [BROKEN], "grey_converted": 0, "conversions": {}}
    assert any(BROKEN in r.getMessage() for r in caplog.records)
    for name in ("board_a.png", "board_b.png"):
        img = Image.open(tmp_path / "out" / name)
        assert img.size == (48, 48) and img.mode == "RGB"
    assert nested_summary["written"] == 1 and (tmp_path / "out2" / "line2_a.png").is_file()


def test_importers_cli(tmp_path, capsys):
    root = tmp_path / "root"
    main(["voc", "--images", str(IMAGES), "--annotations", str(ANNOTATIONS), "--data-root", str(root),
          "--patch-size", "24", "--map", "short=short", "spur=spur"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["per_class"] == {"short": 1, "spur": 1}
    assert (root / "local" / "short" / "board_b_0.png").is_file()
    assert (root / "local" / "short" / "board_b_0.mask.png").is_file()
    main(["folder", str(IMAGES), str(root), "--size", "32"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["written"] == 2
    assert sorted(p.name for p in (root / "global").iterdir()) == ["board_a.png", "board_b.png"]
    assert f"data_root={root}" in captured.err


def test_importers_cli_refuses_a_subfolder_as_data_root(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["folder", str(IMAGES), str(tmp_path / "root" / "global"), "--size", "32"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "give the data root itself" in err
    assert not (tmp_path / "root").exists()


VOC_XML = """<annotation><filename>{name}</filename>{objects}</annotation>"""
VOC_OBJECT = ("<object><name>spur</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>"
              "</bndbox></object>")


def test_voc_skips_boxes_outside_the_image_and_clips_the_others(tmp_path, caplog):
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir()
    annotations.mkdir()
    Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(images / "small.png")
    boxes = [(-286, 4764, 8764, 9763), (70, -5, 95, 10), (20, 20, 30, 30)]
    objects = "".join(VOC_OBJECT.format(*b) for b in boxes)
    (annotations / "small.xml").write_text(VOC_XML.format(name="small.png", objects=objects))
    with caplog.at_level(logging.WARNING):
        summary = import_voc(images, annotations, tmp_path / "out", {"spur": "spur"}, patch_size=16)
    assert summary["patches"] == 2 and summary["boxes_outside"] == 1 and summary["boxes_clipped"] == 1
    assert any("does not intersect" in r.getMessage() and "-286" in r.getMessage() for r in caplog.records)
    labels = {item["file"]: item["box"] for item in json.loads((tmp_path / "out" / "labels.json").read_text())["items"]}
    assert set(labels) == {"spur/small_1.png", "spur/small_2.png"}
    # (70, -5, 95, 10) clipped to (70, 0, 80, 10); the patch lies at the top-right corner (64, 0).
    assert labels["spur/small_1.png"] == [6.0, 0.0, 16.0, 10.0]
    mask = np.asarray(Image.open(tmp_path / "out" / "spur" / "small_1.mask.png")) > 0
    assert mask.sum() == 100 and mask[:10, 6:].all()
    for box in labels.values():
        assert 0 <= box[0] < box[2] <= 16 and 0 <= box[1] < box[3] <= 16


def test_coco_polygons_give_masks_and_grey_images_are_converted(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 50), 120, np.uint8), "L").save(images / "cell.png")
    coco = {"images": [{"id": 7, "file_name": "cell.png", "width": 50, "height": 40}],
            "categories": [{"id": 3, "name": "crack"}, {"id": 1, "name": "finger"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 6, 6],
                 "segmentation": [[10, 10, 16, 10, 16, 16, 10, 16]]},
                {"id": 2, "image_id": 7, "category_id": 1, "bbox": [30, 20, 4, 4]},
                {"id": 3, "image_id": 7, "category_id": 1, "bbox": [300, 200, 4, 4]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.INFO):
        summary = import_coco(tmp_path / "coco.json", images, tmp_path / "out", patch_size=16)
    assert summary["classes"] == ["finger", "crack"] and summary["grey_converted"] == 1
    assert summary["per_class"] == {"crack": 1, "finger": 1} and summary["boxes_outside"] == 1
    assert summary["conversions"] == {"grey to RGB": 1}
    assert len([r for r in caplog.records if "1 grey to RGB" in r.getMessage()]) == 1
    patch = Image.open(tmp_path / "out" / "crack" / "cell_1.png")
    assert patch.mode == "RGB" and patch.size == (16, 16)
    assert 36 <= (np.asarray(Image.open(tmp_path / "out" / "crack" / "cell_1.mask.png")) > 0).sum() <= 49
    assert (np.asarray(Image.open(tmp_path / "out" / "finger" / "cell_2.mask.png")) > 0).sum() == 16


def test_masked_defects_become_patches_with_their_masks(tmp_path):
    defects, masks = tmp_path / "defects" / "scratch", tmp_path / "masks" / "scratch"
    defects.mkdir(parents=True)
    masks.mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[30:34, 50:60] = 255
    Image.fromarray(image).save(defects / "a.png")
    Image.fromarray(mask).save(masks / "a_mask.png")  # MVTec AD's name
    Image.fromarray(image).save(defects / "b.png")  # no mask: skipped
    summary = import_masked(tmp_path / "defects", tmp_path / "masks", tmp_path / "out", patch_size=16)
    assert summary["classes"] == ["scratch"] and summary["patches"] == 1
    assert summary["without_mask"] == [str(defects / "b.png")]
    # centre (55, 32): the patch starts at x = 47, y = 24
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "scratch" / "a.png")), image[24:40, 47:63])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "scratch" / "a.mask.png")), mask[24:40, 47:63])
