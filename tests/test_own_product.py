"""The whole chain for a user's own product on a tiny budget: prepare -> train both models -> synthesis on
the user's real images with the generated dataset config -> export to coco / yolo / anomalib, and the
streaming reader through a torch DataLoader."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from product_support import CLASSES, cli, make_product
from synth_support import read_samples
from test_train import TINY_GLOBAL, config

from dmgr.export.polygons import components
from dmgr.shards import collate, dataset
from dmgr.train import train

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

TINY_LOCAL_MASK = ("{image_size: 8, num_channels: 32, num_res_blocks: 1, channel_mult: '1,2', attention_resolutions: "
                   "'4', num_heads: 2, learn_sigma: true, resblock_updown: true, num_classes: 2, in_channels: 4}")
SEEDS = 6


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    product, data, conf = make_product(tmp / "product"), tmp / "data", tmp / "conf"
    cli("dmgr.data.prepare", "--name", "cells", "--good", str(product / "good"), "--defects",
        str(product / "defects"), "--masks", str(product / "masks"), "--out", str(data), "--image-size", "32",
        "--window-size", "8", "--conf-dir", str(conf))
    classes = sorted(CLASSES)
    common = [f"data_root={data}", "steps=4", "batch_size=4", "log_every=1", "sample_every=1000",
              "sample_steps=2", "progress=false", "lr=1e-3"]
    train(config(["arch=demo_global", f"arch.config={TINY_GLOBAL}", f"out_dir={tmp / 'global'}", *common]))
    train(config(["arch=demo_local_mask", f"arch.config={TINY_LOCAL_MASK}", f"arch.classes=[{','.join(classes)}]",
                  f"out_dir={tmp / 'local'}", *common]))
    run = tmp / "run"
    cli("dmgr.synth", f"hydra.searchpath=[file://{conf}]", "dataset=cells", "model=custom",
        f"model.global.checkpoint={tmp / 'global' / 'ema.safetensors'}",
        f"model.local.checkpoint={tmp / 'local' / 'ema.safetensors'}", "schedule=fast", "schedule.respacing=10",
        "schedule.T_s=6", "schedule.T_e=3", "schedule.time_travel=false", "schedule.pyramid_levels=3",
        "schedule.max_backtracks=2", "schedule.iterations=1", "threads=1",
        "dataset.defects_per_image=2", f"seeds=0-{SEEDS - 1}", "samples_per_shard=2", "batch_size=3",
        "extras.input=true", f"out_dir={run}", "progress=false", f"screen.data_root={data}",
        "screen.classifier_steps=20", "screen.max_attempts=2")
    return {"tmp": tmp, "data": data, "run": run, "classes": classes}


def test_synthesis_puts_the_users_classes_into_the_users_images(chain):
    manifest = json.loads((chain["run"] / "manifest.json").read_text())
    assert manifest["config"]["dataset"]["name"] == "cells"
    assert manifest["config"]["dataset"]["classes"] == chain["classes"]
    assert manifest["backgrounds"]["usable"] == 12
    assert manifest["metrics"]["screen"]["seeds"] == SEEDS  # the screen read every sample with the user's classes
    samples = read_samples(chain["run"])
    assert len(samples) == SEEDS
    for sample in samples.values():
        meta = sample["json"]
        assert meta["dataset"] == "cells" and meta["mask_method"] == "local"
        assert set(meta["screen"]["scores"]) >= {"fidelity", "mask_area"}
        assert {d["class_name"] for d in meta["defects"]} <= set(chain["classes"])
        source = np.asarray(Image.open(chain["data"] / "global" / meta["background"]["image"]))
        mask = np.asarray(sample["mask.png"].convert("L")) > 127
        assert (np.asarray(sample["png"])[~mask] == source[~mask]).all()


def shard_masks(run: Path) -> dict[int, tuple[np.ndarray, dict]]:
    return {int(k): (np.asarray(s["mask.png"].convert("L")) > 127, s["json"]) for k, s in read_samples(run).items()}


def own_mask(mask: np.ndarray, defect: dict) -> np.ndarray:
    x0, y0, x1, y1 = defect["window_box"]
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


def test_coco_export_reads_back_through_pycocotools_and_resumes(chain):
    from pycocotools.coco import COCO

    out = chain["tmp"] / "coco"
    cli("dmgr.export", "coco", str(chain["run"]), str(out), "--val", "0", "--include-flagged")
    coco = COCO(str(out / "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == chain["classes"]
    masks = shard_masks(chain["run"])
    ids = {image["seed"]: image["id"] for image in coco.dataset["images"]}
    assert sorted(ids) == sorted(masks)
    expected_annotations = 0
    for image_id, (mask, meta) in masks.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[ids[image_id]]))
        defects = [d for d in meta["defects"] if own_mask(mask, d).any()]
        expected_annotations += len(defects)
        assert len(anns) == len(defects)
        union = np.zeros_like(mask)
        for ann, defect in zip(sorted(anns, key=lambda a: a["id"]), defects):
            decoded = coco.annToMask(ann).astype(bool)
            assert np.array_equal(decoded, own_mask(mask, defect))
            assert coco.loadCats(ann["category_id"])[0]["name"] == defect["class_name"]
            assert ann["area"] == defect["mask_area"] == decoded.sum()
            union |= decoded
        assert np.array_equal(union, mask)
        shard_png = read_samples(chain["run"])[f"{image_id:08d}"]["png"]
        assert np.array_equal(np.asarray(Image.open(out / "images" / "train" / f"{image_id:08d}.png")),
                              np.asarray(shard_png))
    summary = json.loads((out / "export.json").read_text())
    assert summary["counts"]["images"]["train"] == SEEDS
    assert summary["counts"]["annotations"]["train"] == expected_annotations
    assert len(summary["shards"]) == 3 and all(len(s["sha256"]) == 64 for s in summary["shards"])

    # a rerun verifies and skips; a damaged exported file is noticed and its shard exported again
    before = (out / "images" / "train" / "00000003.png").read_bytes()
    options = ("--val", "0", "--include-flagged")  # every sample, in one split: compared with the shards
    assert json.loads(cli("dmgr.export", "coco", str(chain["run"]), str(out), *options).stdout)["this_run"] == {
        "shards_exported": 0, "shards_verified_and_skipped": 3}
    (out / "images" / "train" / "00000003.png").write_bytes(b"damaged")
    again = json.loads(cli("dmgr.export", "coco", str(chain["run"]), str(out), *options).stdout)
    assert again["this_run"] == {"shards_exported": 1, "shards_verified_and_skipped": 2}
    assert (out / "images" / "train" / "00000003.png").read_bytes() == before
    refused = cli("dmgr.export", "yolo", str(chain["run"]), str(out), check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "holds a coco export" in refused.stderr


def polygon_mask(values: list[float], height: int, width: int) -> np.ndarray:
    """Pixel centres inside the polygon (even-odd rule)."""
    xs_, ys_ = np.array(values[0::2]) * width, np.array(values[1::2]) * height
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    inside = np.zeros((height, width), dtype=bool)
    for i in range(len(xs_)):
        x0, y0, x1, y1 = xs_[i - 1], ys_[i - 1], xs_[i], ys_[i]
        crosses = (y0 > ys) != (y1 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


def filled(part: np.ndarray) -> np.ndarray:
    """The part with its holes: everything not reachable from outside through 4-connected background."""
    outside = np.pad(~part, 1)
    reached = np.zeros_like(outside)
    reached[0, :] = True
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= outside
        if np.array_equal(grown, reached):
            return ~reached[1:-1, 1:-1]
        reached = grown


def test_yolo_export_polygons_cover_the_masks_and_boxes_bound_them(chain):
    out = chain["tmp"] / "yolo"
    cli("dmgr.export", "yolo", str(chain["run"]), str(out), "--val", "0", "--include-flagged")
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(chain["classes"])) and data["task"] == "segment"
    boxes = chain["tmp"] / "yolo-boxes"
    cli("dmgr.export", "yolo", str(chain["run"]), str(boxes), "--boxes", "--val", "0", "--include-flagged")
    for image_id, (mask, meta) in shard_masks(chain["run"]).items():
        height, width = mask.shape
        drawn = np.zeros_like(mask)
        for line in (out / "labels" / "train" / f"{image_id:08d}.txt").read_text().splitlines():
            cls, *values = line.split()
            part = polygon_mask([float(v) for v in values], height, width)
            assert chain["classes"][int(cls)] in {d["class_name"] for d in meta["defects"]}
            drawn |= part
        # each connected part of each defect's mask gets a polygon that is exactly that part, holes filled
        expected = np.zeros_like(mask)
        for defect in meta["defects"]:
            for part in components(own_mask(mask, defect)):
                expected |= filled(part)
        assert np.array_equal(drawn, expected)
        lines = (boxes / "labels" / "train" / f"{image_id:08d}.txt").read_text().splitlines()
        defects = [d for d in meta["defects"] if own_mask(mask, d).any()]
        assert len(lines) == len(defects)
        for line, defect in zip(lines, defects):
            cls, cx, cy, w, h = line.split()
            x0, y0, x1, y1 = defect["mask_box"]
            assert chain["classes"][int(cls)] == defect["class_name"]
            assert np.allclose([float(cx) * width, float(cy) * height, float(w) * width, float(h) * height],
                               [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], atol=1e-3)


def test_anomalib_folder_layout(chain):
    out = chain["tmp"] / "anomalib"
    cli("dmgr.export", "anomalib", str(chain["run"]), str(out), "--include-flagged")
    samples = read_samples(chain["run"])
    abnormal = sorted(p.name for p in (out / "abnormal").iterdir())
    assert abnormal == sorted(p.name for p in (out / "ground_truth").iterdir())
    defective = [k for k, s in samples.items() if (np.asarray(s["mask.png"].convert("L")) > 127).any()]
    assert abnormal == sorted(f"{k}.png" for k in defective)
    for name in abnormal:
        assert np.array_equal(np.asarray(Image.open(out / "ground_truth" / name)),
                              np.asarray(samples[name[:-4]]["mask.png"].convert("L")))
    # normal/: the pool's images that are no abnormal image's background (dmgr/export/anomalib.py)
    backgrounds = {samples[name[:-4]]["json"]["background"]["sha256"][:16] for name in abnormal}
    normal = {p.stem for folder in ("normal", "normal_val") for p in (out / folder).iterdir()}
    assert normal and not normal & backgrounds
    counts = json.loads((out / "export.json").read_text())["counts"]
    assert counts["abnormal"] == len(abnormal) and counts["normal"] + counts["normal_val"] == len(normal)


@pytest.mark.parametrize("shuffle", [0, 4])
def test_streaming_reader_gives_every_sample_once_through_two_workers(chain, shuffle):
    loader = torch.utils.data.DataLoader(dataset(chain["run"], shuffle=shuffle), batch_size=2, num_workers=2,
                                         collate_fn=collate)
    keys = Counter()
    shards = read_samples(chain["run"])
    for images, masks, metas in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 40, 48)
        assert 0 <= images.min() and images.max() <= 1 and masks.shape[1:] == (1, 40, 48)
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        for image, mask, meta in zip(images, masks, metas):
            keys[meta["__key__"]] += 1
            sample = shards[meta["__key__"]]
            pixels = torch.from_numpy(np.array(sample["png"]))
            assert torch.equal((image * 255).round().byte().permute(1, 2, 0), pixels)
            assert torch.equal(mask[0].bool(), torch.from_numpy(np.asarray(sample["mask.png"].convert("L")) > 127))
            assert meta["seed"] == int(meta["__key__"])
    assert keys == Counter({key: 1 for key in shards})


def test_streaming_reader_names_a_damaged_sample(chain, tmp_path):
    import tarfile

    shard = sorted((chain["run"] / "shards").glob("*.tar"))[0]
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(shard) as src, tarfile.open(damaged, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".mask.png"):
                data = data[:20]
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"sample 0000000\d of .*damaged.tar: cannot decode"):
        list(dataset(str(damaged)))
