"""The export options on runs built here sample by sample (shards in the data contract's layout, no synthesis):
the validation split by seed, flagged samples, the user's real images, tiles of large frames, COCO ids of any
seed, and grey (L) and RGB images carried through every format."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dmgr.export.__main__ import main
from dmgr.export.items import split_of

CLASSES = ["scratch", "dent"]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def frame(seed: int, width: int, height: int, grey: bool) -> np.ndarray:
    rng = np.random.default_rng(seed % 2**32)
    shape = (height, width) if grey else (height, width, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def defect(x: int, y: int, w: int, h: int, class_id: int = 0) -> dict:
    return {"class_id": class_id, "class_name": CLASSES[class_id], "window_box": [x, y, x + w, y + h]}


def make_run(folder: Path, seeds: list[int], width: int = 48, height: int = 40, grey: bool = False,
             defects=None, meta=None, per_shard: int = 4) -> Path:
    """A finished run of generated frames (with twins) whose defect masks are their window boxes less a corner.

    defects(seed) -> the seed's defects (default: one 8 x 6 window of class seed % 2); meta(seed) -> extra json."""
    shards = []
    (folder / "shards").mkdir(parents=True)
    for start in range(0, len(seeds), per_shard):
        name = f"dmgr-{start // per_shard:06d}.tar"
        with tarfile.open(folder / "shards" / name, "w") as tar:
            for seed in seeds[start:start + per_shard]:
                image = frame(seed, width, height, grey)
                found = defects(seed) if defects else [defect(4 + seed % 20, 5 + seed % 15, 8, 6, seed % 2)]
                mask = np.zeros((height, width), dtype=np.uint8)
                for d in found:
                    x0, y0, x1, y1 = d["window_box"]
                    mask[y0:y1, x0:x1] = 255
                    mask[y0, x0] = 0
                json_meta = {"seed": seed, "class_id": found[0]["class_id"], "class_name": found[0]["class_name"],
                             "window_box": found[0]["window_box"], "defects": found,
                             "mask_area": int((mask > 0).sum()), **(meta(seed) if meta else {})}
                members = {"png": _png(image), "mask.png": _png(mask), "json": json.dumps(json_meta).encode(),
                           "twin.png": _png(frame(seed + 1, width, height, grey))}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{seed:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        digest = hashlib.sha256((folder / "shards" / name).read_bytes()).hexdigest()
        shards.append({"name": name, "samples": len(seeds[start:start + per_shard]), "sha256": digest})
    config = {"dataset": {"name": "parts", "classes": CLASSES, "source": "generate"}}
    (folder / "manifest.json").write_text(json.dumps({"config": config, "shards": shards}))
    return folder


def export(fmt: str, run: Path, out: Path, *options: str) -> dict:
    return main([fmt, str(run), str(out), *options])


def stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.iterdir()} if folder.is_dir() else set()


def keys(seeds) -> set[str]:
    return {f"{s:08d}" for s in seeds}


def coco_split(out: Path, split: str) -> dict:
    return json.loads((out / f"instances_{split}.json").read_text())


def test_val_split_is_by_seed_in_every_format_and_stable_when_the_run_grows(tmp_path):
    small = make_run(tmp_path / "small", list(range(40)))
    grown = make_run(tmp_path / "grown", list(range(120)))
    val = {s for s in range(120) if split_of(s, 0.1) == "val"}
    assert 4 <= len(val) <= 24  # about a tenth
    for run, seeds in ((small, range(40)), (grown, range(120))):
        out = tmp_path / f"yolo-{run.name}"
        export("yolo", run, out)  # the default --val 0.1
        data = yaml.safe_load((out / "data.yaml").read_text())
        assert (data["train"], data["val"]) == ("images/train", "images/val")
        assert stems(out / "images" / "val") == keys(val & set(seeds)) == stems(out / "labels" / "val")
        assert stems(out / "images" / "train") == keys(set(seeds) - val) == stems(out / "labels" / "train")

        out = tmp_path / f"coco-{run.name}"
        export("coco", run, out)
        for split, expected in (("val", val & set(seeds)), ("train", set(seeds) - val)):
            images = coco_split(out, split)["images"]
            assert {i["seed"] for i in images} == expected
            assert stems(out / "images" / split) == keys(expected)
    # a larger share only moves seeds from train to val
    assert val <= {s for s in range(120) if split_of(s, 0.3) == "val"}


def test_anomalib_splits_its_defect_free_images_and_keeps_every_defect_image(tmp_path):
    run = make_run(tmp_path / "run", list(range(60)))
    out = tmp_path / "anomalib"
    counts = export("anomalib", run, out, "--val", "0.5")["counts"]
    normal, normal_val = stems(out / "normal"), stems(out / "normal_val")
    assert normal and normal_val and not normal & normal_val
    assert normal_val == {k for k in normal | normal_val if split_of(k, 0.5) == "val"}
    assert counts["folder_datamodule"]["normal_test_dir"] == "normal_val"
    assert counts["normal"] == len(normal) and counts["normal_val"] == len(normal_val)
    held = normal | normal_val
    assert stems(out / "abnormal") == keys(range(60)) - held == stems(out / "ground_truth")


def flagged_meta(seed: int) -> dict:
    if seed % 5 == 1:
        return {"screen": {"accepted": False, "attempts": 4, "flagged": True}}
    if seed % 5 == 2:
        return {"empty_mask": {"mask_area": 3, "min_area": 8, "attempts": 6, "flagged": True}}
    return {"screen": {"accepted": True, "attempts": 1}}


@pytest.mark.parametrize("fmt", ["yolo", "coco", "anomalib"])
def test_flagged_samples_are_left_out_and_counted_unless_included(tmp_path, fmt, capsys):
    seeds = list(range(20))
    flagged = {s for s in seeds if s % 5 in (1, 2)}
    run = make_run(tmp_path / "run", seeds, meta=flagged_meta)

    def written(out: Path) -> set[str]:
        if fmt == "anomalib":
            return stems(out / "abnormal") | stems(out / "normal") | stems(out / "normal_val")
        return stems(out / "images" / "train") | stems(out / "images" / "val")

    summary = export(fmt, run, tmp_path / "default", "--val", "0.2")
    printed = json.loads(capsys.readouterr().out)
    assert not written(tmp_path / "default") & keys(flagged)
    assert summary["samples"] == {"read": 20, "flagged": 8, "flagged_left_out": 8, "real_images": 0}
    assert printed["samples"] == summary["samples"]
    assert json.loads((tmp_path / "default" / "export.json").read_text())["samples"] == summary["samples"]

    summary = export(fmt, run, tmp_path / "all", "--val", "0.2", "--include-flagged")
    assert keys(flagged) <= written(tmp_path / "all")
    if fmt != "anomalib":
        assert written(tmp_path / "all") == keys(seeds)
    assert summary["samples"] == {"read": 20, "flagged": 8, "flagged_left_out": 0, "real_images": 0}


def real_folder(root: Path, layout: str, cls: str = "dent") -> Path:
    """Two real 30 x 24 defect images with an 5 x 4 defect at (10, 8), in one of the three layouts."""
    images = root / {"masks": f"images/{cls}", "defects": f"defects/{cls}"}.get(layout, "images")
    images.mkdir(parents=True)
    mask = np.zeros((24, 30), dtype=np.uint8)
    mask[8:12, 10:15] = 255
    for i in range(2):
        Image.fromarray(frame(100 + i, 30, 24, grey=True)).save(images / f"board{i}.png")
        if layout in ("masks", "defects"):
            (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "masks" / cls / f"board{i}.png")
        elif layout == "voc":
            xml = (f"<annotation><filename>board{i}.png</filename><object><name>{cls}</name><bndbox><xmin>10</xmin>"
                   "<ymin>8</ymin><xmax>15</xmax><ymax>12</ymax></bndbox></object></annotation>")
            (root / f"board{i}.xml").write_text(xml)
    if layout == "coco":
        coco = {"categories": [{"id": 7, "name": cls}],
                "images": [{"id": i, "file_name": f"board{i}.png", "width": 30, "height": 24} for i in range(2)],
                "annotations": [{"id": i, "image_id": i, "category_id": 7, "bbox": [10, 8, 5, 4], "iscrowd": 0}
                                for i in range(2)]}
        (root / "instances.json").write_text(json.dumps(coco))
    return root


@pytest.mark.parametrize("layout", ["masks", "defects", "voc", "coco"])
def test_real_images_join_the_train_split_or_val_alone(tmp_path, layout):
    run = make_run(tmp_path / "run", list(range(10)))
    real = real_folder(tmp_path / "real", layout)
    out = tmp_path / "yolo"
    summary = export("yolo", run, out, "--add-real", str(real), "--boxes")
    names = {n for n in stems(out / "images" / "train") if n.startswith("real-")}
    assert len(names) == 2 and not any(n.startswith("real-") for n in stems(out / "images" / "val"))
    assert summary["samples"]["real_images"] == 2
    for name in names:
        with Image.open(out / "images" / "train" / f"{name}.png") as image:
            assert image.mode == "L" and image.size == (30, 24)
        cls, cx, cy, w, h = (out / "labels" / "train" / f"{name}.txt").read_text().split()
        assert cls == "1"  # "dent" in the run's classes
        assert [float(v) for v in (cx, cy, w, h)] == pytest.approx([12.5 / 30, 10 / 24, 5 / 30, 4 / 24], abs=1e-6)

    out = tmp_path / "coco"
    export("coco", run, out, "--add-real", str(real), "--real-as-val")
    val = coco_split(out, "val")
    real_images = [i for i in val["images"] if "real" in i]
    assert len(real_images) == 2 and not any("real" in i for i in coco_split(out, "train")["images"])
    ids = {i["id"] for i in real_images}
    areas = [a["area"] for a in val["annotations"] if a["image_id"] in ids]
    assert areas == [20, 20] and all(a["category_id"] == 2 for a in val["annotations"] if a["image_id"] in ids)



def test_real_images_are_anomalib_evaluation_data_with_their_masks(tmp_path):
    run = make_run(tmp_path / "run", list(range(10)))
    out = tmp_path / "anomalib"
    export("anomalib", run, out, "--add-real", str(real_folder(tmp_path / "real", "masks")))
    real = {n for n in stems(out / "abnormal") if n.startswith("real-")}
    assert real == {"real-images_dent_board0", "real-images_dent_board1"} and real <= stems(out / "ground_truth")
    for name in real:
        mask = np.asarray(Image.open(out / "ground_truth" / f"{name}.png"))
        expected = np.zeros((24, 30), dtype=np.uint8)
        expected[8:12, 10:15] = 255
        assert np.array_equal(mask, expected)
        assert Image.open(out / "abnormal" / f"{name}.png").mode == "L"

def test_a_real_class_the_run_does_not_have_is_a_one_line_error_before_anything_is_written(tmp_path, capsys):
    run = make_run(tmp_path / "run", list(range(4)))
    real = real_folder(tmp_path / "real", "voc", cls="crack")
    with pytest.raises(SystemExit) as stop:
        export("coco", run, tmp_path / "out", "--add-real", str(real))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "'crack'" in err and "scratch, dent" in err and "--add-real" in err
    assert not (tmp_path / "out").exists()


def big_defects(seed: int) -> list[dict]:
    # one defect in the middle, two close together near a corner, one on the right border
    return [defect(1200, 1000, 30, 20, 0), defect(60, 70, 16, 16, 1), defect(90, 95, 10, 12, 0),
            defect(2430, 500, 18, 40, 1)]


@pytest.mark.parametrize("fmt", ["yolo", "coco"])
def test_tiles_of_a_large_grey_frame_cover_every_defect_clip_its_labels_and_record_their_offset(tmp_path, fmt):
    run = make_run(tmp_path / "run", [3], width=2448, height=2048, grey=True, defects=big_defects)
    out = tmp_path / fmt
    export(fmt, run, out, "--tile", "640", "--tile-background", "1", "--val", "0", *(["--boxes"] * (fmt == "yolo")))
    with tarfile.open(run / "shards" / "dmgr-000000.tar") as tar:
        source = np.asarray(Image.open(io.BytesIO(tar.extractfile("00000003.png").read())))
        mask = np.asarray(Image.open(io.BytesIO(tar.extractfile("00000003.mask.png").read()))) > 127
    if fmt == "yolo":
        offsets = {f"images/train/{k}": v for k, v in json.loads((out / "tiles.json").read_text())["tiles"].items()}
        offsets = {Path(k).stem: v for k, v in offsets.items()}
        tiles = sorted(stems(out / "images" / "train"))
    else:
        images = coco_split(out, "train")["images"]
        offsets = {Path(i["file_name"]).stem: i for i in images}
        tiles = sorted(offsets)
        anns = coco_split(out, "train")["annotations"]
    defect_tiles = background = 0
    covered = np.zeros_like(mask)
    for name in tiles:
        record = offsets[name]
        x, y = record["offset"]
        assert record["frame"] == "00000003" and record["frame_size"] == [2448, 2048] and record["seed"] == 3
        with Image.open(out / "images" / "train" / f"{name}.png") as tile:
            assert tile.mode == "L" and tile.size == (640, 640)
            assert np.array_equal(np.asarray(tile), source[y:y + 640, x:x + 640])
        inside = mask[y:y + 640, x:x + 640]
        covered[y:y + 640, x:x + 640] = True
        if fmt == "yolo":
            lines = (out / "labels" / "train" / f"{name}.txt").read_text().splitlines()
            boxes = [[float(v) for v in line.split()[1:]] for line in lines]
        else:
            image_id = next(i["id"] for i in images if Path(i["file_name"]).stem == name)
            boxes = [a["bbox"] for a in anns if a["image_id"] == image_id]
        assert bool(boxes) == bool(inside.any())
        defect_tiles += bool(boxes)
        background += not boxes
        for box in boxes:  # each label lies in the tile, clipped to it
            x0, y0, w, h = (box[0] - box[2] / 2, box[1] - box[3] / 2, box[2], box[3]) if fmt == "yolo" else box
            scale = 640 if fmt == "yolo" else 1
            edge = 640 + 1e-3  # YOLO's 6 decimals
            assert -1e-3 <= x0 * scale and -1e-3 <= y0 * scale and (x0 + w) * scale <= edge and (y0 + h) * scale <= edge
    assert covered[mask].all()  # every defect pixel is in some tile
    assert defect_tiles == 3  # the two close defects share one tile
    assert background == defect_tiles  # --tile-background 1


def test_coco_ids_stay_valid_for_the_largest_seeds(tmp_path):
    from pycocotools.coco import COCO

    seeds = [2**63 - 1, 2**63 - 2, 9_300_000_000_000_000, 5]
    run = make_run(tmp_path / "run", seeds, defects=lambda s: [defect(4, 5, 8, 6), defect(20, 20, 6, 6, 1)])
    out = tmp_path / "coco"
    export("coco", run, out, "--val", "0")
    data = coco_split(out, "train")
    assert sorted(i["seed"] for i in data["images"]) == sorted(seeds)
    assert [i["id"] for i in data["images"]] == [1, 2, 3, 4]
    assert [a["id"] for a in data["annotations"]] == list(range(1, 9))
    coco = COCO(str(out / "instances_train.json"))
    for image in data["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == 2 and all(coco.annToMask(a).sum() == a["area"] for a in anns)


@pytest.mark.parametrize("grey", [True, False])
@pytest.mark.parametrize("fmt", ["yolo", "coco", "anomalib"])
def test_every_format_keeps_the_mode_of_the_run_images(tmp_path, fmt, grey):
    run = make_run(tmp_path / "run", list(range(8)), grey=grey)
    out = tmp_path / fmt
    export(fmt, run, out, "--val", "0.3")
    written = [p for p in out.rglob("*.png") if "ground_truth" not in p.parts]
    assert len(written) >= 8
    with tarfile.open(run / "shards" / "dmgr-000000.tar") as tar:
        first = np.asarray(Image.open(io.BytesIO(tar.extractfile("00000000.png").read())))
    for path in written:
        with Image.open(path) as image:
            assert image.mode == ("L" if grey else "RGB"), path
    match = next(p for p in written if p.stem == "00000000")
    assert np.array_equal(np.asarray(Image.open(match)), first)


def test_option_errors_name_the_option(tmp_path, capsys):
    run = make_run(tmp_path / "run", [0])
    for fmt, options, named in (("yolo", ["--tile", "600"], "--tile=600"), ("anomalib", ["--tile", "640"], "--tile"),
                                ("yolo", ["--real-as-val"], "--add-real"), ("coco", ["--val", "1"], "--val")):
        with pytest.raises(SystemExit) as stop:
            export(fmt, run, tmp_path / "out", *options)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and named in err, err



def test_a_frame_with_one_defect_tile_gets_a_defect_free_tile_at_the_default_ratio():
    from dmgr.export.tiles import tile_places

    mask = np.zeros((1000, 1500), dtype=bool)
    mask[480:500, 700:730] = True
    places = tile_places([(0, mask)], 1500, 1000, 320, 0.5, "00000001")
    assert len(places) == 2
    (x, y), (bx, by) = places
    assert mask[y:y + 320, x:x + 320].sum() == mask.sum() and not mask[by:by + 320, bx:bx + 320].any()
    assert tile_places([(0, mask)], 1500, 1000, 320, 0.5, "00000001") == places  # the same frame, the same tiles
