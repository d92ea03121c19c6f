"""Architectures sized for a product: the attention check, the presets in synthesis, the held-out slice, sweeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image
from product_support import cli
from test_train import TINY_GLOBAL, TINY_LOCAL

import dmgr.train as train_module
from dmgr import CONF_DIR
from dmgr.data import export_global, export_local
from dmgr.data.dataset import PatchDataset
from dmgr.models import build_unet, save_checkpoint
from dmgr.models.unet import UNetConfig, UNetConfigError, check_attention
from dmgr.synth.config import validate
from dmgr.synth.engine import load_engine
from dmgr.train import TrainConfigError, train

ARCH = Path(CONF_DIR) / "arch"


def config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcb")
    export_global(root, 32, 8, seed=0, progress=False)
    export_local(root, 32, 8, seed=0, progress=False)
    return root


def test_attention_no_level_reaches_is_refused_with_the_levels_to_choose(data_root, tmp_path):
    with pytest.raises(TrainConfigError) as info:  # the 64 px demo architecture at 128 px: "16" is ds 8, absent
        train(config("train", ["arch=demo_global", "arch.config.image_size=128", f"data_root={data_root}",
                               f"out_dir={tmp_path / 'run'}"]))
    message = str(info.value)
    assert message.startswith("arch.config: attention_resolutions=16 at image_size=128: no level")
    assert "levels are 128, 64, 32 px" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
    with pytest.raises(UNetConfigError, match="no level of this network is 16 px"):
        check_attention(UNetConfig(image_size=48, channel_mult="1,2", attention_resolutions="16"))  # 48 / 16 = 3
    for path in sorted(ARCH.glob("*.yaml")):  # every shipped architecture has attention where it asks for it
        check_attention(UNetConfig.from_dict(yaml.safe_load(path.read_text())["config"]))


@pytest.mark.parametrize("pair", [("global_128", "local_mask_32"), ("global_256", "local_mask_64")])
def test_each_size_preset_loads_into_synthesis(tmp_path, pair):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (300, 280), 90).save(images / "frame.png")
    archs = [yaml.safe_load((ARCH / f"{name}.yaml").read_text()) for name in pair]
    paths = []
    for arch in archs:
        meta = {"dmgr.role": arch["role"], "dmgr.scale": "1.0"}
        if arch["role"] == "local":
            meta["dmgr.classes"] = json.dumps(arch["classes"])
        paths.append(save_checkpoint(build_unet(arch["config"]), tmp_path / f"{arch['name']}.safetensors", meta))
    size, window = (arch["config"]["image_size"] for arch in archs)
    spec = validate(config("synth", [
        "model=custom", f"model.global.checkpoint={paths[0]}", f"model.local.checkpoint={paths[1]}",
        f"dataset.images={images}", f"dataset.image_size={size}", f"dataset.window_size={window}",
        f"dataset.margin={window // 4}", f"dataset.classes=[{','.join(archs[1]['classes'])}]",
        f"out_dir={tmp_path / 'run'}", "screen.enabled=false"]))
    engine = load_engine(spec, torch.device("cpu"))
    t = torch.tensor([500])
    with torch.no_grad():
        out_global = engine.global_model(torch.zeros(1, 3, size, size), t)
        out_local = engine.local_model(torch.zeros(1, 4, window, window), t, torch.tensor([0]))
    assert out_global.shape == (1, 6, size, size) and out_local.shape == (1, 8, window, window)


@pytest.mark.slow
def test_training_keeps_a_held_out_slice_and_logs_its_loss(data_root, tmp_path):
    out = tmp_path / "local"
    train(config("train", ["arch=demo_local", f"arch.config={TINY_LOCAL}", f"data_root={data_root}",
                           f"out_dir={out}", "steps=3", "batch_size=8", "sample_every=1000", "sample_steps=2",
                           "progress=false", "held_out=1"]))
    held = json.loads((out / "held_out.json").read_text())
    classes = list(config("train", ["arch=demo_local"]).arch.classes)
    assert held["role"] == "local" and sorted(n.split("/")[0] for n in held["names"]) == sorted(classes)
    training = PatchDataset(data_root / "local", classes, exclude=held["names"])
    assert not {f"{classes[k]}/{p.name}" for p, k in training.items} & set(held["names"])
    assert len(training.items) == len(PatchDataset(data_root / "local", classes).items) - len(classes)
    rows = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3]
    assert all(math.isfinite(rows[0][k]) and rows[0][k] > 0 for k in ("held_out_mse", "train_mse"))
    # the global model holds out whole images (a quarter at most: 2 of 8)
    out = tmp_path / "global"
    train(config("train", ["arch=demo_global", f"arch.config={TINY_GLOBAL}", f"data_root={data_root}",
                           f"out_dir={out}", "steps=1", "batch_size=2", "sample_every=1000", "sample_steps=2",
                           "progress=false"]))
    assert len(json.loads((out / "held_out.json").read_text())["names"]) == 2
    assert "held_out_mse" in (out / "held_out.jsonl").read_text()


@pytest.mark.slow
def test_a_multirun_trains_every_point_in_its_own_folder(data_root, tmp_path):
    out = tmp_path / "sweep"
    cli("dmgr.train", "-m", "arch=demo_global", f"arch.config={TINY_GLOBAL}", f"data_root={data_root}",
        f"out_dir={out}", "steps=1", "batch_size=2", "sample_every=1000", "sample_steps=2", "progress=false",
        "lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 'hydra'}")  # Hydra's own record, out of the repository
    points = sorted(p.name for p in out.iterdir() if (p / "ema.safetensors").is_file())
    assert len(points) == 2 and all("lr=" in p for p in points), points
    records = [json.loads((out / p / "train.json").read_text()) for p in points]
    assert all(r["arch"]["name"] == "demo_global" for r in records)


@pytest.mark.slow
def test_clean_pretraining_reads_only_defect_free_images_then_a_defect_model_starts_from_it(data_root, tmp_path,
                                                                                            monkeypatch):
    """local_data=clean: patches of data_root/global with an empty mask and the null class (no defect patch is
    read), refused without a null class; a model of the defects then starts from its weights."""
    tiny = TINY_LOCAL[:-1] + ", in_channels: 4, null_class: true}"
    base = ["arch=demo_local_mask_guided", f"arch.config={tiny}", f"data_root={data_root}", "batch_size=4",
            "sample_every=1000", "sample_steps=2", "progress=false"]
    with pytest.raises(TrainConfigError, match=r"local_data=.?clean.?: pretrains the null class"):
        train(config("train", ["arch=demo_local_mask", f"arch.config={TINY_LOCAL[:-1]}, in_channels: 4}}",
                               f"data_root={data_root}", "local_data=clean", f"out_dir={tmp_path / 'refused'}"]))
    seen = []
    original = train_module.unwrap

    def recording(batch, device):
        x0, y = original(batch, device)
        seen.append((x0.clone(), None if y is None else y.clone()))
        return x0, y

    monkeypatch.setattr(train_module, "unwrap", recording)
    monkeypatch.setattr(train_module, "PatchDataset", None)  # reading a defect patch would fail
    pre = tmp_path / "pre"
    train(config("train", [*base, "local_data=clean", f"out_dir={pre}", "steps=2", "held_out=1"]))
    assert len(seen) == 2 and all(y is None and x.shape == (4, 3, 8, 8) for x, y in seen)  # tiles, no labels
    record = json.loads((pre / "train.json").read_text())
    assert record["local_data"] == "clean"
    assert json.loads((pre / "held_out.json").read_text())["names"][0].endswith(".png")  # a global image
    clean, labels = train_module.as_clean_patches(seen[0][0], 4, 6)
    assert clean.shape == (4, 4, 8, 8) and bool((clean[:, 3] == -1).all()) and labels.tolist() == [6] * 4
    monkeypatch.undo()
    fine = tmp_path / "fine"
    train(config("train", [*base, f"init_from={pre / 'ema.safetensors'}", f"out_dir={fine}", "steps=1"]))
    assert "local_data" not in json.loads((fine / "train.json").read_text())
    assert (fine / "ema.safetensors").is_file()
