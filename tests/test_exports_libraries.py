"""Exports as the libraries that load them see them: YOLO polygons through OpenCV's fillPoly (the way
Ultralytics rasterises them), data.yaml paths after a move, COCO through pycocotools, and, in .venv-detect
(`make detect-env`), Ultralytics' check_det_dataset, YOLODataset and a 1-epoch yolov8n-seg, and anomalib's
Folder datamodule; and the errors of the export and preview commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from product_support import cli
from synth_support import ROOT, read_samples, run_synth
from test_exports_formats import make_run, real_folder
from test_own_product import filled, own_mask
from test_synth_backgrounds import IMAGES, write_boards

from dmgr.export.items import split_of
from dmgr.export.polygons import components
from dmgr.export.yolo import label_lines
from dmgr.shards import dataset
from dmgr.synth.backgrounds import scan_backgrounds

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

SEEDS = 6


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_boards(tmp_path_factory.mktemp("pool"), 8)


@pytest.fixture(scope="module")
def run(tmp_path_factory, pool):
    """A default run (no extras) on real boards: 6 seeds from a pool of 8, so some boards carry no defect."""
    out = tmp_path_factory.mktemp("run")
    run_synth([*IMAGES, f"dataset.images={pool}", f"seeds=0-{SEEDS - 1}", "samples_per_shard=2", "batch_size=3",
               f"out_dir={out}"])
    return out


def masks_of(run: Path) -> dict[str, tuple[np.ndarray, dict]]:
    return {k: (np.asarray(s["mask.png"].convert("L")) > 127, s["json"]) for k, s in read_samples(run).items()}


def ultralytics_mask(values: list[float], height: int, width: int, imgsz: tuple[int, int]) -> np.ndarray:
    """ultralytics.data.utils.polygon2mask on one label line: normalised coords times the size, int32, fillPoly."""
    points = np.array(values, dtype=np.float64).reshape(-1, 2) * [imgsz[1], imgsz[0]]
    mask = np.zeros(imgsz, dtype=np.uint8)
    polygons = np.asarray([points], dtype=np.int32).reshape((1, -1, 2))
    cv2.fillPoly(mask, polygons, color=1)
    return mask.astype(bool)


def blob_masks(count: int, size: int = 48) -> list[np.ndarray]:
    """Random unions of rectangles and discs: convex, concave and several-part masks."""
    rng = np.random.default_rng(7)
    ys, xs = np.mgrid[0:size, 0:size]
    masks = []
    for _ in range(count):
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = rng.integers(6, size - 6, 2).tolist() + [int(rng.integers(2, 7))]
            if rng.random() < 0.5:
                mask |= (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
            else:
                mask[cy - r:cy + r // 2 + 1, cx - r // 2:cx + r] = True
        masks.append(mask)
    return masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_yolo_polygons_rasterise_back_to_the_mask_under_opencv_fillpoly():
    scores = []
    for mask in blob_masks(40):
        height, width = mask.shape
        lines, empty = label_lines([(0, mask)], boxes=False)
        assert empty == 0 and lines
        drawn = np.zeros_like(mask)
        for line in lines:
            drawn |= ultralytics_mask([float(v) for v in line.split()[1:]], height, width, (height, width))
        scores.append(iou(drawn, mask))
        assert not (drawn & ~mask).any(), "fillPoly must not paint outside the mask"
    assert min(scores) >= 0.95, scores


def test_yolo_polygons_of_a_run_rasterise_back_under_opencv_and_data_yaml_survives_a_move(run, tmp_path):
    out = tmp_path / "yolo"
    cli("dmgr.export", "yolo", str(run), str(out), "--val", "0.5")
    masks = masks_of(run)
    assert any(mask.any() for mask, _ in masks.values())
    for key, (mask, meta) in masks.items():
        height, width = mask.shape
        drawn = np.zeros_like(mask)
        for line in (out / "labels" / split_of(int(key), 0.5) / f"{key}.txt").read_text().splitlines():
            drawn |= ultralytics_mask([float(v) for v in line.split()[1:]], height, width, (height, width))
        # a YOLO line is one outer outline: exactly each connected part, its holes filled (the tiny random
        # model's noisy masks have many; trained models' blobs, as in the test above, have none)
        expected = np.zeros_like(mask)
        for defect in meta["defects"]:
            for part in components(own_mask(mask, defect)):
                expected |= filled(part)
        assert np.array_equal(drawn, expected)

    moved = tmp_path / "elsewhere" / "yolo-moved"
    moved.parent.mkdir()
    shutil.move(out, moved)
    data_yaml = moved / "data.yaml"
    data = yaml.safe_load(data_yaml.read_text())
    # ultralytics.data.utils.check_det_dataset: root = data["path"] or the yaml's folder; a relative root that does
    # not exist from the working directory is taken under DATASETS_DIR
    root = Path(data.get("path") or data_yaml.parent)
    for split in ("train", "val"):
        images = (root / data[split]).resolve()
        assert images == (moved / "images" / split).resolve() and images.is_dir()
        assert sorted(p.name for p in images.iterdir()) == sorted(f"{k}.png" for k in masks
                                                                  if split_of(int(k), 0.5) == split)


def test_coco_masks_decode_and_score_ap_one_against_themselves(run, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "coco"
    cli("dmgr.export", "coco", str(run), str(out), "--val", "0")
    coco = COCO(str(out / "instances_train.json"))
    masks = masks_of(run)
    ids = {image["seed"]: image["id"] for image in coco.dataset["images"]}
    for key, (mask, _) in masks.items():
        union = np.zeros_like(mask)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[ids[int(key)]])):
            assert ann["iscrowd"] == 0
            union |= coco.annToMask(ann).astype(bool)
        assert np.array_equal(union, mask)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns
    detections = coco.loadRes([{**a, "score": 1.0} for a in anns])
    evaluation = COCOeval(coco, detections, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def fitted_pool(pool: Path, run: Path) -> dict[str, np.ndarray]:
    """sha256 -> the pool image as the run fitted it."""
    config = json.loads((run / "manifest.json").read_text())["config"]["dataset"]
    backgrounds = scan_backgrounds(pool, config["image_size"], config["window_size"], config["margin"])
    return {item.sha256: backgrounds.image(i) for i, item in enumerate(backgrounds.items)}


def check_anomalib_folder(out: Path) -> dict:
    """What anomalib's Folder / make_folder_dataset needs: every named folder there, normal/ not empty, masks named as
    the abnormal images."""
    summary = json.loads((out / "export.json").read_text())
    folder = summary["counts"]["folder_datamodule"]
    assert folder["name"]
    for key in ("normal_dir", "abnormal_dir", "mask_dir"):
        assert (out / folder[key]).is_dir(), key
    assert any((out / folder["normal_dir"]).iterdir())
    assert sorted(os.listdir(out / "abnormal")) == sorted(os.listdir(out / "ground_truth"))
    return summary["counts"]


def test_anomalib_default_run_gets_normal_images_that_are_no_abnormal_images_background(run, pool, tmp_path):
    out = tmp_path / "anomalib"
    cli("dmgr.export", "anomalib", str(run), str(out))
    counts = check_anomalib_folder(out)
    masks = masks_of(run)
    abnormal = {p.stem for p in (out / "abnormal").iterdir()}
    assert abnormal == {k for k, (mask, _) in masks.items() if mask.any()} and abnormal
    used = {masks[k][1]["background"]["sha256"] for k in abnormal}
    fitted = fitted_pool(pool, run)
    normal = {p.stem: np.asarray(Image.open(p)) for p in [*(out / "normal").iterdir(), *(out / "normal_val").iterdir()]}
    # every unused board of the pool, exactly as the run fitted it; none an abnormal image's background
    assert sorted(normal) == sorted(sha[:16] for sha in fitted if sha not in used)
    for sha, image in fitted.items():
        if sha[:16] in normal:
            assert np.array_equal(normal[sha[:16]], image)
    assert counts["normal"] + counts["normal_val"] == len(normal) and counts["held_out"] == 0
    assert counts["normal_from"] == "pool"


def test_anomalib_holds_out_backgrounds_when_the_run_used_the_whole_pool(run, pool, tmp_path):
    masks = masks_of(run)
    used = {meta["background"]["image"] for mask, meta in masks.values()}
    only_used = tmp_path / "used-pool"
    only_used.mkdir()
    for name in used:
        shutil.copy(pool / name, only_used / name)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["dataset"]["images"] = str(only_used)
    (copy / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "anomalib"
    cli("dmgr.export", "anomalib", str(copy), str(out))
    counts = check_anomalib_folder(out)
    normal = {p.stem for p in [*(out / "normal").iterdir(), *(out / "normal_val").iterdir()]}
    abnormal = {p.stem for p in (out / "abnormal").iterdir()}
    assert normal and counts["held_out"] >= 1
    assert not normal & {masks[k][1]["background"]["sha256"][:16] for k in abnormal}
    assert counts["abnormal"] == len(abnormal) and counts["normal"] + counts["normal_val"] == len(normal)


def test_export_into_a_file_and_preview_of_a_damaged_shard_are_one_line_errors(run, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    result = cli("dmgr.export", "coco", str(run), str(target), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(target) in result.stderr

    shard = sorted((run / "shards").glob("*.tar"))[0]
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(shard.read_bytes()[:1500])
    result = cli("dmgr.preview", str(damaged), "--out", str(tmp_path / "p.png"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(damaged) in result.stderr


def test_reader_reshuffles_per_epoch_and_repeats_a_given_seed_and_epoch(run):
    def order(seed: int, epoch: int) -> list[str]:
        pipeline = dataset(run, shuffle=4, seed=seed)
        pipeline.set_epoch(epoch)
        return [meta["__key__"] for _, _, meta in pipeline]

    orders = [order(0, epoch) for epoch in range(4)]
    assert all(sorted(o) == [f"{s:08d}" for s in range(SEEDS)] for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert order(0, 2) == orders[2] and order(5, 2) == order(5, 2)


DETECT_PYTHON = ROOT / ".venv-detect" / "bin" / "python"


def in_libraries(*args: str, cwd: Path) -> dict:
    """tests/exports_in_libraries.py run by .venv-detect's python, offline: its json."""
    if not DETECT_PYTHON.is_file():
        pytest.fail(f"{DETECT_PYTHON} is missing: run `make detect-env` (Ultralytics and anomalib in their own venv)")
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(cwd / "yolo-config"), "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    result = subprocess.run([str(DETECT_PYTHON), str(ROOT / "tests" / "exports_in_libraries.py"), *args], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def label_count(folder: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.txt"))


def test_ultralytics_checks_loads_and_trains_a_split_yolo_export_with_real_images(tmp_path):
    run = make_run(tmp_path / "run", list(range(24)), width=64, height=64, grey=True)
    out = tmp_path / "yolo"
    cli("dmgr.export", "yolo", str(run), str(out), "--val", "0.25", "--add-real",
        str(real_folder(tmp_path / "real", "masks")), "--real-as-val")
    seen = in_libraries("yolo", str(out / "data.yaml"), "--train", str(tmp_path / "train"), cwd=tmp_path)
    assert seen["nc"] == 2 and seen["names"] == ["scratch", "dent"]
    val = {f"{s:08d}" for s in range(24) if split_of(s, 0.25) == "val"}
    assert seen["splits"]["train"]["images"] == sorted({f"{s:08d}" for s in range(24)} - val)
    assert seen["splits"]["val"]["images"] == sorted(val | {"real-images_dent_board0", "real-images_dent_board1"})
    for split in ("train", "val"):
        assert seen["splits"][split]["path"] == str((out / "images" / split).resolve())
        assert seen["splits"][split]["instances"] == label_count(out / "labels" / split) > 0
    assert seen["splits"]["val"]["classes"] == [0, 1]
    assert "last.pt" in seen["trained"]


def test_ultralytics_reads_the_tiles_of_large_frames(tmp_path):
    defects = [{"class_id": 1, "class_name": "dent", "window_box": [900, 700, 940, 730]}]
    run = make_run(tmp_path / "run", [0, 1, 2], width=1600, height=1200, grey=True, defects=lambda s: defects)
    out = tmp_path / "yolo"
    cli("dmgr.export", "yolo", str(run), str(out), "--tile", "320", "--tile-background", "2", "--val", "0")
    assert yaml.safe_load((out / "data.yaml").read_text())["val"] == "images/train"  # no val seed: val = train
    seen = in_libraries("yolo", str(out / "data.yaml"), cwd=tmp_path)
    tiles = json.loads((out / "tiles.json").read_text())["tiles"]
    assert seen["splits"]["train"]["images"] == sorted(Path(name).stem for name in tiles)
    assert len(tiles) == 9  # per frame: one tile on the defect, two defect-free ones
    assert seen["splits"]["train"]["instances"] == 3


def test_anomalib_folder_datamodule_sets_up_the_split_export(run, tmp_path):
    out = tmp_path / "anomalib"
    cli("dmgr.export", "anomalib", str(run), str(out), "--val", "0.5")
    seen = in_libraries("anomalib", str(out), cwd=tmp_path)
    normal, normal_val = ({p.stem for p in (out / folder).iterdir()} for folder in ("normal", "normal_val"))
    abnormal = {p.stem for p in (out / "abnormal").iterdir()}
    assert normal and normal_val and abnormal
    assert set(seen["train"]) == normal
    assert set(seen["test"]) | set(seen["val"]) == normal_val | abnormal
    assert set(seen["test_masks"]) <= abnormal
    assert all(label == (name in abnormal) for name, label in seen["test_labels"].items())


def test_a_grey_run_exports_grey_images_in_every_format(tmp_path):
    boards = tmp_path / "boards"
    boards.mkdir()
    for path in sorted(write_boards(tmp_path / "rgb", 6).iterdir()):
        Image.open(path).convert("L").save(boards / path.name)
    run = tmp_path / "run"
    run_synth([*IMAGES, f"dataset.images={boards}", "seeds=0-2", "samples_per_shard=3", "batch_size=3",
               f"out_dir={run}"])
    for fmt in ("yolo", "coco", "anomalib"):
        out = tmp_path / fmt
        cli("dmgr.export", fmt, str(run), str(out), "--val", "0.5")
        images = [p for p in out.rglob("*.png") if "ground_truth" not in p.parts]
        assert len(images) >= 3 and all(Image.open(p).mode == "L" for p in images), fmt
    assert any((tmp_path / "anomalib" / folder).iterdir() for folder in ("normal", "normal_val"))
