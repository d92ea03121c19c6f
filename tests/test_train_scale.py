"""Training at synthesis's scale: global tiles of the images resized by `scale`, local patches cut at it,
the scale recorded in the checkpoint and compared at synthesis."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from product_support import make_product

from dmgr import CONF_DIR
from dmgr.data.dataset import TileDataset, TileError, TileSampler, resize_by, to_model_range
from dmgr.data.prepare import main as prepare_main
from dmgr.models import build_unet, save_checkpoint, stored_metadata
from dmgr.synth.config import validate
from dmgr.train import TrainConfigError, train

TINY_GLOBAL = "{image_size: 16, num_channels: 32, num_res_blocks: 1, channel_mult: '1,2', attention_resolutions: '8', num_heads: 2, learn_sigma: true}"  # noqa: E501
QUADRANTS = ((200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0))  # top-left, top-right, bottom-left, bottom-right


def quadrant_frame(w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2:], a[h // 2:, : w // 2], a[h // 2:, w // 2:] = QUADRANTS
    return Image.fromarray(a)


def smooth_frame(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    grey = 128 + 90 * np.sin(x / 3.0) * np.cos(y / 4.0)
    return np.stack([grey, 255 - grey, grey / 2], -1).round().astype(np.uint8)


def tiles(dataset: TileDataset, seed: int = 0, rank: int = 0, steps: int = 1, batch: int = 4) -> np.ndarray:
    sampler = TileSampler(len(dataset), batch, seed, rank, 0, steps)
    return np.stack([dataset[key].numpy() for keys in sampler for key in keys])


def to_uint8(tile: np.ndarray) -> np.ndarray:
    return ((tile.transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)


def test_tiles_are_image_size_and_come_from_the_whole_frame(tmp_path):
    quadrant_frame(64, 48).save(tmp_path / "frame.png")
    dataset = TileDataset(tmp_path, 16)
    drawn = tiles(dataset, steps=40)
    assert drawn.shape == (160, 3, 16, 16)
    colours = {tuple(to_uint8(t)[0, 0]) for t in drawn} | {tuple(to_uint8(t)[-1, -1]) for t in drawn}
    assert colours == set(QUADRANTS), "tiles reach every quadrant of the frame"
    whole = [t for t in drawn if len({tuple(c) for c in to_uint8(t).reshape(-1, 3)}) == 1]
    assert {tuple(to_uint8(t)[0, 0]) for t in whole} == set(QUADRANTS)  # and lie wholly inside each one


def test_a_2x_frame_at_scale_half_gives_tiles_of_the_downscaled_frame(tmp_path):
    small = smooth_frame(40, 32)
    Image.fromarray(small).resize((80, 64), Image.NEAREST).save(tmp_path / "frame.png")
    dataset = TileDataset(tmp_path, 16, scale=0.5)
    assert dataset.frame(0).shape == (32, 40, 3)
    expected = np.asarray(resize_by(Image.open(tmp_path / "frame.png").convert("RGB"), 0.5)).astype(int)
    for tile in tiles(dataset, steps=3):
        tile = to_uint8(tile).astype(int)
        # the tile is a crop of the downscaled frame (mirrored or not) ...
        crops = [expected[y:y + 16, x:x + 16] for y in range(17) for x in range(25)]
        best = min(min(np.abs(tile - c).max(), np.abs(tile[:, ::-1] - c).max()) for c in crops)
        assert best <= 1
        # ... and so of the 1x frame's content, not of the 2x frame at its own pixels
        near = min(min(np.abs(tile - small[y:y + 16, x:x + 16]).mean(), np.abs(tile[:, ::-1] - small[y:y + 16, x:x + 16]).mean())  # noqa: E501
                   for y in range(17) for x in range(25))
        assert near < 8


def test_tile_draws_depend_on_seed_rank_and_step_only(tmp_path):
    for i in range(3):
        quadrant_frame(40 + 8 * i, 40).save(tmp_path / f"f{i}.png")
    dataset = TileDataset(tmp_path, 16)
    assert np.array_equal(tiles(dataset, seed=3, steps=4), tiles(TileDataset(tmp_path, 16), seed=3, steps=4))
    assert not np.array_equal(tiles(dataset, seed=3, steps=4), tiles(dataset, seed=4, steps=4))
    assert not np.array_equal(tiles(dataset, rank=0, steps=4), tiles(dataset, rank=1, steps=4))
    resumed = TileSampler(len(dataset), 4, 0, 0, 2, 4)  # from step 2: the same batches as steps 2 and 3
    assert list(resumed) == list(TileSampler(len(dataset), 4, 0, 0, 0, 4))[2:]


def test_the_frame_cache_gives_the_tiles_of_decoding_from_workers_and_after_a_restart(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(smooth_frame(70, 52)).save(frames / "colour.png")
    Image.fromarray(smooth_frame(60, 50)[..., 0]).save(frames / "grey.png")
    cache = tmp_path / "cache"
    cached = TileDataset(frames, 16, scale=0.75, cache=cache)
    decoded = TileDataset(frames, 16, scale=0.75, cache=False)
    expected = tiles(decoded, seed=5, steps=6)
    assert np.array_equal(tiles(cached, seed=5, steps=6), expected)  # bit for bit: the cache holds the pixels
    assert sorted(np.load(f).shape[-1] for f in cache.glob("*.npy")) == [1, 3]  # grey kept as one channel
    # a restart reads the cache it finds and resumes the same draws from its step
    restarted = TileDataset(frames, 16, scale=0.75, cache=cache)
    resumed = TileSampler(len(restarted), 4, 5, 0, 3, 6)
    assert np.array_equal(np.stack([restarted[k].numpy() for b in resumed for k in b]), expected[12:])
    # DataLoader workers give the same batches in the same order, as uint8 (raw) as training reads them
    raw = TileDataset(frames, 16, scale=0.75, cache=cache, raw=True)
    loader = torch.utils.data.DataLoader(raw, batch_sampler=TileSampler(len(raw), 4, 5, 0, 0, 6), num_workers=2)
    batches = list(loader)
    assert all(b.dtype == torch.uint8 for b in batches)
    assert np.array_equal(to_model_range(torch.cat(batches)).numpy(), expected)
    # another content under the same name is another cache entry, never a stale frame
    Image.fromarray(smooth_frame(70, 52)[::-1].copy()).save(frames / "colour.png")
    TileDataset(frames, 16, scale=0.75, cache=cache)
    assert len(list(cache.glob("*.npy"))) == 3
    assert np.array_equal(tiles(TileDataset(frames, 16, scale=0.75, cache=cache), seed=5, steps=6),
                          tiles(TileDataset(frames, 16, scale=0.75, cache=False), seed=5, steps=6))


def test_images_smaller_than_a_tile_are_skipped_and_counted(tmp_path, caplog):
    quadrant_frame(64, 64).save(tmp_path / "big.png")
    quadrant_frame(40, 48).save(tmp_path / "small.png")
    with caplog.at_level(logging.WARNING):
        dataset = TileDataset(tmp_path, 32, scale=0.5)
    assert len(dataset) == 1 and [Path(p).name for p in dataset.skipped] == ["small.png"]
    assert len([r for r in caplog.records if "1 of 2 images" in r.getMessage()]) == 1
    (tmp_path / "big.png").unlink()
    with pytest.raises(TileError) as info:
        TileDataset(tmp_path, 32, scale=0.5)
    assert "\n" not in str(info.value) and "40x48" in str(info.value) and "scale=0.8 up" in str(info.value)


def train_config(root: Path, out: Path, *extra: str):
    overrides = ["arch=demo_global", f"arch.config={TINY_GLOBAL}", f"data_root={root}", f"out_dir={out}", "steps=2",
                 "batch_size=2", "sample_every=1000", "sample_steps=2", "progress=false", *extra]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="train", overrides=overrides)


def test_the_checkpoint_records_the_scale_of_the_prepared_data_root(tmp_path):
    root = tmp_path / "data"
    (root / "global").mkdir(parents=True)
    quadrant_frame(40, 32).save(root / "global" / "a.png")
    (root / "prepare.json").write_text(json.dumps({"scale": 0.5}))
    train(train_config(root, tmp_path / "run"))  # scale left out: the data root's
    _, meta = stored_metadata(tmp_path / "run" / "ema.safetensors")
    assert float(meta["dmgr.scale"]) == 0.5
    assert json.loads((tmp_path / "run" / "train.json").read_text())["scale"] == 0.5
    with pytest.raises(TrainConfigError, match=r"^scale=1: .* prepared at scale 0.5 .*give scale=0.5"):
        train(train_config(root, tmp_path / "other", "scale=1.0"))
    (root / "prepare.json").unlink()
    with pytest.raises(TrainConfigError, match=r"^data_root=.*holds one 16 px tile at scale=0.25 .*scale=0.5 up"):
        train(train_config(root, tmp_path / "other", "scale=0.25"))
    assert not (tmp_path / "other").exists()


def prepare_args(product: Path, out: Path, *extra: str) -> list[str]:
    return ["--name", "cells", "--good", str(product / "good"), "--defects", str(product / "defects"),
            "--masks", str(product / "masks"), "--out", str(out / "data"), "--conf-dir", str(out / "conf"), *extra]


def test_prepare_cuts_local_patches_of_window_over_scale_image_pixels(tmp_path):
    product = make_product(tmp_path / "product", good=2, per_class=1)
    prepare_main(prepare_args(product, tmp_path, "--image-size", "16", "--window-size", "4", "--scale", "0.5"))
    data = tmp_path / "data"
    summary = json.loads((data / "prepare.json").read_text())
    assert summary["scale"] == 0.5 and summary["patch_image_pixels"] == 8
    assert "scale=0.5" in summary["next"]["train_local"]
    assert "scale: 0.5" in (tmp_path / "conf" / "dataset" / "cells.yaml").read_text()
    assert Image.open(data / "global" / "cell-000.png").size == (48, 40)  # defect-free images at their own size
    labels = json.loads((data / "local" / "labels.json").read_text())
    assert labels["patch_size"] == 4 and labels["image_pixels"] == 8
    for item in labels["items"]:
        source = Path(item["source"])
        image = np.asarray(Image.open(source).convert("RGB"))
        mask = np.asarray(Image.open(product / "masks" / source.parent.name / source.name)) > 0
        ys, xs = np.nonzero(mask)  # the patch: 8 image pixels centred on the mask's box, inside the image
        x0 = int(min(max(round((xs.min() + xs.max() + 1) / 2 - 4), 0), image.shape[1] - 8))
        y0 = int(min(max(round((ys.min() + ys.max() + 1) / 2 - 4), 0), image.shape[0] - 8))
        crop = Image.fromarray(image[y0:y0 + 8, x0:x0 + 8]).resize((4, 4), Image.BILINEAR)
        patch = Image.open(data / "local" / item["file"])
        assert patch.size == (4, 4) and np.array_equal(np.asarray(patch.convert("RGB")), np.asarray(crop))
        mask_crop = Image.fromarray(mask[y0:y0 + 8, x0:x0 + 8].astype(np.uint8) * 255).resize((4, 4), Image.NEAREST)
        patch_mask = Image.open(data / "local" / item["file"].replace(".png", ".mask.png"))
        assert np.array_equal(np.asarray(patch_mask) > 0, np.asarray(mask_crop) > 0)


def test_prepare_skips_and_counts_small_images_and_names_the_scale_that_fits(tmp_path, capsys, caplog):
    product = make_product(tmp_path / "product", good=2, per_class=1)
    quadrant_frame(20, 20).save(product / "good" / "tiny.png")
    with caplog.at_level(logging.WARNING):
        prepare_main(prepare_args(product, tmp_path, "--image-size", "32", "--window-size", "8"))
    summary = json.loads((tmp_path / "data" / "prepare.json").read_text())
    assert summary["global"]["written"] == 2 and [Path(p).name for p in summary["global"]["too_small"]] == ["tiny.png"]
    assert len([r for r in caplog.records if "1 of 3 defect-free images" in r.getMessage()]) == 1
    with pytest.raises(SystemExit) as info:
        prepare_main(prepare_args(product, tmp_path / "again", "--image-size", "32", "--window-size", "8",
                                  "--scale", "0.5"))
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--scale=0.5" in lines[0] and "48x40" in lines[0] and "--scale=0.8 up" in lines[0]


def synth_spec(tmp_path: Path, scales: tuple[float | None, float | None], *extra: str):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    quadrant_frame(160, 144).save(images / "a.png")
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        base = compose(config_name="synth", overrides=["model=tiny_random"])
    paths = []
    for which, scale in zip(("global", "local"), scales):
        meta = {"dmgr.scale": repr(scale)} if scale is not None else {}
        if which == "local":
            meta["dmgr.classes"] = json.dumps(list(base.dataset.classes))
        model = build_unet(dict(base.model[which].config))
        paths.append(save_checkpoint(model, tmp_path / f"{which}.safetensors", meta))
    overrides = ["model=custom", f"model.global.checkpoint={paths[0]}", f"model.local.checkpoint={paths[1]}",
                 f"dataset.images={images}", f"out_dir={tmp_path / 'run'}", "screen.enabled=false", *extra]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return validate(compose(config_name="synth", overrides=overrides))


def test_synthesis_at_another_scale_warns_in_one_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dmgr.synth"):
        spec = synth_spec(tmp_path, (0.5, 0.5), "dataset.scale=1.0")
    assert spec.model.global_net.scale == 0.5
    warned = [r.getMessage() for r in caplog.records if "trained at scale" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "model.global was trained at scale=0.5" in warned[0] and "dataset.scale=1" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dmgr.synth"):
        synth_spec(tmp_path, (0.5, 0.5), "dataset.scale=0.5")  # the same scale
        synth_spec(tmp_path, (None, None), "dataset.scale=0.5")  # not recorded: unknown
    assert not [r for r in caplog.records if "trained at scale" in r.getMessage()]
