"""python -m dmgr.data.prepare: a user's folders -> the data root training reads + a dataset config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from product_support import CLASSES, make_product

from dmgr.data.dataset import PatchDataset, TileDataset
from dmgr.data.prepare import main

ROOT_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    return make_product(tmp_path_factory.mktemp("product"))


def run(product, tmp_path, *extra: str) -> list[str]:
    return ["--name", "cells", "--good", str(product / "good"), "--defects", str(product / "defects"),
            "--masks", str(product / "masks"), "--out", str(tmp_path / "data"), "--image-size", "32",
            "--window-size", "8", "--conf-dir", str(tmp_path / "conf"), *extra]


def test_prepare_writes_the_layout_training_reads_and_a_dataset_config(product, tmp_path, capsys, caplog):
    with caplog.at_level("INFO"):
        main(run(product, tmp_path))
    out = capsys.readouterr().out
    data = tmp_path / "data"
    assert "12 defect-free images" in out and "python -m dmgr.train" in out
    config = yaml.safe_load((tmp_path / "conf" / "dataset" / "cells.yaml").read_text())
    assert config["classes"] == sorted(CLASSES) and config["image_size"] == 32 and config["window_size"] == 8
    assert config["source"] == "images" and config["images"] == str((data / "global").resolve())
    assert config["margin"] == 2
    # training's own datasets read it: 32 px RGB tiles of the 48x40 boards, 8 px patches with their masks
    boards = TileDataset(data / "global", 32)
    assert len(boards) == 12 and boards[(0, 0.5, 0.5, False)].shape == (3, 32, 32)
    assert Image.open(data / "global" / "cell-000.png").size == (48, 40)  # at its own size
    assert config["scale"] == 1.0 and "scale=1.0" in summary_next(data)["train_global"]
    patches = PatchDataset(data / "local", config["classes"], size=8, with_masks=True)
    assert len(patches) == 12 and patches[0][0].shape == (4, 8, 8)
    assert {label for _, label in patches.items} == {0, 1}
    summary = json.loads((data / "prepare.json").read_text())
    assert summary["grey_converted"] == 4 and summary["local"]["patches"] == 12
    assert summary["conversions"] == {"grey to RGB": 4}
    assert len([r for r in caplog.records if "4 grey to RGB" in r.getMessage()]) == 1  # once for the run
    assert Image.open(data / "global" / "cell-000.png").mode == "RGB"
    # every patch mask holds its defect: the mask pixels of the source, at the patch
    for path, _ in patches.items:
        assert (np.asarray(Image.open(path.with_name(path.stem + ".mask.png"))) > 0).any(), path
    assert "'hydra.searchpath=[file://" in summary["next"]["synth"]  # the config lives outside conf/


def summary_next(data: Path) -> dict:
    return json.loads((data / "prepare.json").read_text())["next"]


def test_prepare_refuses_bad_input_with_one_line(product, tmp_path):
    def refuse(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dmgr.data.prepare", *args], cwd=ROOT_DIR,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]

    args = run(product, tmp_path)
    assert "--window-size=30" in refuse(*args, "--window-size", "30")
    no_masks = [a if a != str(product / "masks") else str(tmp_path / "nowhere") for a in args]
    assert "--masks=" in refuse(*no_masks) and "no such folder" in refuse(*no_masks)
    sub = [a if a != str(tmp_path / "data") else str(tmp_path / "data" / "global") for a in args]
    assert "give the data root itself" in refuse(*sub)
    assert not (tmp_path / "data").exists()
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "cells.yaml").write_text("name: someone-elses\n")
    assert "exists for other data" in refuse(*args)


def known_defects(root: Path, sides: list[int]) -> Path:
    """Grey 640x560 frames and, per class, 300x300 defect images each with one square defect of a known side."""
    rng = np.random.default_rng(0)
    (root / "good").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(80, 120, (560, 640), dtype=np.uint8)).save(root / "good" / f"f{i}.png")
    for k, side in enumerate(sides):
        cls = ("scratch", "dent")[k % 2]
        for folder in ("defects", "masks"):
            (root / folder / cls).mkdir(parents=True, exist_ok=True)
        image = rng.integers(80, 120, (300, 300), dtype=np.uint8)
        mask = np.zeros((300, 300), dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(90, 210 - side, 2))
        image[y:y + side, x:x + side] = 220
        mask[y:y + side, x:x + side] = 255
        Image.fromarray(image).save(root / "defects" / cls / f"d{k}.png")
        Image.fromarray(mask).save(root / "masks" / cls / f"d{k}.png")
    return root


def test_the_size_recipe_proposes_sizes_that_contain_the_defects(tmp_path, monkeypatch, capsys, caplog):
    sides = [20, 27, 33, 40, 47, 53, 60, 67, 73, 80]  # 20-80 px defects, as in docs/own-product.md
    product = known_defects(tmp_path / "product", sides)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        main(["--name", "plates", "--good", str(product / "good"), "--defects", str(product / "defects"),
              "--masks", str(product / "masks"), "--out", "data"])  # no sizes, no --conf-dir
    summary = json.loads((tmp_path / "data" / "prepare.json").read_text())
    window, size, scale = summary["window_size"], summary["image_size"], summary["scale"]
    assert (window, size, scale) == (32, 128, 0.3)  # 16 px would need scale 0.15: a 50 px defect spans 7.5 px
    assert max(sides) * scale <= 0.75 * window  # the largest defect fits the window with margin
    assert size >= 4 * window and size / scale <= 560  # context around the window, inside the smallest frame
    why = [r.getMessage() for r in caplog.records if r.getMessage().startswith("size recipe: ")]
    assert any("window_size 32" in line for line in why) and any("scale 0.3" in line for line in why)
    # every patch holds its whole defect, off the patch's border
    for path, _ in PatchDataset(tmp_path / "data" / "local", ["dent", "scratch"], with_masks=True).items:
        ys, xs = np.nonzero(np.asarray(Image.open(path.with_name(path.stem + ".mask.png"))) > 0)
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < window - 1 and xs.max() < window - 1, path
    # the config lies next to the data, with the data's path as the commands give it; presets for the sizes
    config_text = (tmp_path / "data" / "conf" / "dataset" / "plates.yaml").read_text()
    config = yaml.safe_load(config_text)
    assert config["images"] == "data/global" and config["scale"] == 0.3 and config["window_size"] == 32
    assert "global steps=6000" in config_text and "window_size 32:" in config_text
    steps = summary["next"]
    assert "arch=global_128 " in steps["train_global"] and "steps=6000" in steps["train_global"]
    assert "arch=local_mask_32 " in steps["train_local"] and "steps=5500" in steps["train_local"]
    assert "'hydra.searchpath=[file://data/conf]'" in steps["synth"]
    assert not (ROOT_DIR / "conf" / "dataset" / "plates.yaml").exists()
    composed = subprocess.run([sys.executable, "-m", "dmgr.synth", "--cfg", "job", "hydra.searchpath=[file://data/conf]",
                               "dataset=plates"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert composed.returncode == 0, composed.stderr
    assert yaml.safe_load(composed.stdout)["dataset"]["images"] == "data/global"
