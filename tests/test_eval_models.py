"""`python -m dmgr.eval models`: a local model returning its training patches is flagged, one that does not passes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from product_support import cli
from torch import nn

from dmgr.data.dataset import PatchDataset
from dmgr.diffusion.schedule import beta_schedule
from dmgr.eval.models import check_memorisation, verdict, write_report
from dmgr.models import build_unet, save_checkpoint

CLASSES = ["crack", "stain"]  # not the PCB domain's
SIZE = 8


class IdealDenoiser(nn.Module):
    """The exact epsilon of a data set of a few patches per class: DDIM from noise ends on one of them."""

    def __init__(self, patches: list[torch.Tensor]) -> None:
        super().__init__()
        self.patches = [p.double() for p in patches]
        self.in_channels = patches[0].shape[1]
        self.abar = torch.cumprod(1 - beta_schedule("linear", 1000).double(), 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = []
        for xi, ti, yi in zip(x.double(), t, y):
            abar, data = self.abar[ti], self.patches[int(yi)]
            d2 = ((xi - abar.sqrt() * data) ** 2).flatten(1).sum(1)
            x0 = (torch.softmax(-d2 / (2 * (1 - abar)), 0)[:, None, None, None] * data).sum(0)
            out.append((xi - abar.sqrt() * x0) / (1 - abar).sqrt())
        return torch.stack(out).float()


def patch(rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    colour = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    x, y, w, h = rng.integers(0, 4, 4)
    mask[y:y + h + 2, x:x + w + 2] = 255
    return colour, Image.fromarray(mask)


def data_root(root: Path, rng: np.random.Generator) -> Path:
    """4 training and 2 held-out patches per class; the held-out names in held_out.json beside the model."""
    held = []
    for name in CLASSES:
        folder = root / "local" / name
        folder.mkdir(parents=True)
        for i in range(6):
            image, mask = patch(rng)
            image.save(folder / f"p{i}.png")
            mask.save(folder / f"p{i}.mask.png")
            if i >= 4:
                held.append(f"{name}/p{i}.png")
    (root / "held_out.json").write_text(json.dumps({"role": "local", "names": held}))
    return root


def fresh_patches(rng: np.random.Generator, tmp: Path) -> list[torch.Tensor]:
    """4 new patches per class, drawn like the data's but never trained on (read back as the data are)."""
    for name in CLASSES:
        (tmp / name).mkdir(parents=True)
        for i in range(4):
            image, mask = patch(rng)
            image.save(tmp / name / f"n{i}.png")
            mask.save(tmp / name / f"n{i}.mask.png")
    fresh = PatchDataset(tmp, CLASSES, with_masks=True)
    return [fresh.patches[[k == c for k in fresh.labels]] for c in range(len(CLASSES))]


def test_a_model_that_returns_its_training_patches_is_flagged_and_one_that_does_not_passes(tmp_path):
    rng = np.random.default_rng(0)
    root = data_root(tmp_path / "data", rng)
    held = json.loads((root / "held_out.json").read_text())["names"]
    training = PatchDataset(root / "local", CLASSES, with_masks=True, exclude=held)
    memoriser = IdealDenoiser([training.patches[[k == c for k in training.labels]] for c in range(len(CLASSES))])
    copies = check_memorisation(memoriser, root, CLASSES, held, n=8, steps=20)
    assert all(c.flagged and c.copies == 8 for c in copies), [(c.name, c.distances, c.threshold) for c in copies]
    assert verdict(copies).startswith("memorisation: samples are copies of training defects in crack (8 of 8)")

    novel = IdealDenoiser(fresh_patches(rng, tmp_path / "fresh"))
    checks = check_memorisation(novel, root, CLASSES, held, n=8, steps=20)
    assert not any(c.flagged for c in checks), [(c.name, c.distances, c.threshold) for c in checks]
    assert verdict(checks).startswith("memorisation: none of 2 classes copies its training defects")
    report = write_report(checks, tmp_path / "report", "novel")
    assert report["classes"]["stain"]["samples"] == 8 and not report["classes"]["stain"]["flagged"]
    assert Image.open(tmp_path / "report" / "crack.png").size == (8 * 64, 2 * 64 + 14)


def test_the_command_checks_a_trained_checkpoint_with_its_held_out_slice(tmp_path):
    root = data_root(tmp_path / "data", np.random.default_rng(1))
    model = build_unet(dict(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                            attention_resolutions="4", num_heads=2, learn_sigma=True, num_classes=2, in_channels=4))
    run = tmp_path / "run"
    run.mkdir()
    (run / "held_out.json").write_text((root / "held_out.json").read_text())
    save_checkpoint(model, run / "ema.safetensors", {"dmgr.role": "local", "dmgr.classes": json.dumps(CLASSES)})
    result = cli("dmgr.eval", "models", "--local", str(run / "ema.safetensors"), "--data-root", str(root), "--n", "3",
                 "--steps", "3", "--quiet")
    assert result.stdout.strip().splitlines()[-1].startswith("memorisation: ")
    report = json.loads((run / "models-check" / "models.json").read_text())
    assert set(report["classes"]) == set(CLASSES) and len(report["classes"]["crack"]["distances"]) == 3
    assert (run / "models-check" / "stain.png").is_file()
