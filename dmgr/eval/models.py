"""Judge a trained local model before synthesis: does it make new defects, or copies of its training defects?

    python -m dmgr.eval models --local outputs/train-solar-local/ema.safetensors --data-root data/solar

Per class, `n` samples of the local model (DDIM from fixed noise) are compared with every training patch of
that class (and its mirror image, as training saw it): the RMS distance over all channels in [-1, 1] units
to the nearest one. The yardstick is the same distance for real defects the model never saw: the held-out
slice that training kept out (out_dir/held_out.json beside the checkpoint), else each training patch against
the others. A sample nearer than COPY x that yardstick's median is a copy; a class is flagged when at least
half of its samples are. Written to OUT: one grid per class (samples over their nearest training patches, the
distance under each pair) and models.json. Works for any product's classes and patch size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dmgr.data.dataset import PatchDataset
from dmgr.diffusion import make_diffusion
from dmgr.images import to_uint8
from dmgr.models.checkpoints import load_unet, stored_metadata
from dmgr.sampler import ddim_sample
from dmgr.sampler.noise import generator, stream_seed
from dmgr.sampler.settings import RGB, has_mask_channel

log = logging.getLogger("dmgr.eval.models")
COPY = 0.5  # a sample this much nearer to a training patch than real unseen defects are is a copy
FLAG_SHARE = 0.5  # a class with at least this share of copies is flagged


@dataclass(frozen=True)
class ClassCheck:
    name: str
    distances: list[float]  # each sample's distance to its nearest training patch
    nearest: list[int]  # that patch's index in the class's training patches (mirrors: index + count)
    reference: list[float]  # real unseen defects' distances to the nearest training patch
    threshold: float
    samples: torch.Tensor = field(repr=False)  # (n, C, H, W) in [-1, 1]
    matches: torch.Tensor = field(repr=False)  # their nearest training patches

    @property
    def copies(self) -> int:
        return sum(d < self.threshold for d in self.distances)

    @property
    def flagged(self) -> bool:
        return self.copies >= FLAG_SHARE * len(self.distances)


def nearest(samples: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each sample's nearest patch: RMS over all channels and pixels."""
    d = torch.cdist(samples.flatten(1).double(), patches.flatten(1).double()) / samples[0].numel() ** 0.5
    best = d.min(1)
    return best.values.float(), best.indices


def leave_one_out(patches: torch.Tensor) -> torch.Tensor:
    """Each patch's distance to the nearest other patch (or mirror of another)."""
    count = patches.shape[0]
    both = torch.cat([patches, patches.flip(-1)])
    d = torch.cdist(patches.flatten(1).double(), both.flatten(1).double()) / patches[0].numel() ** 0.5
    own = torch.arange(count)
    d[own, own] = float("inf")
    if count > 1:  # one patch alone is measured against its mirror image
        d[own, own + count] = float("inf")
    return d.min(1).values.float()


def check_memorisation(model: torch.nn.Module, data_root: Path, classes: list[str], held_out: Collection[str] = (),
                       n: int = 16, steps: int = 25, seed: int = 0, diffusion_steps: int = 1000,
                       beta_schedule: str = "linear", device: str = "cpu") -> list[ClassCheck]:
    """Per class: `n` samples of `model` against the training patches under data_root/local (without the
    held-out names, `<class>/NAME.png`), with the held-out patches (else leave-one-out) as the yardstick."""
    size = int(model.config.image_size) if hasattr(model, "config") else None
    masks = has_mask_channel(int(getattr(model, "in_channels", 3)))
    root = Path(data_root) / "local"
    training = PatchDataset(root, classes, size=size, with_masks=masks, exclude=held_out)
    unseen = PatchDataset(root, classes, size=size, with_masks=masks, only=held_out) if held_out else None
    diffusion = make_diffusion(diffusion_steps, beta_schedule, f"ddim{steps}")
    checks = []
    for k, name in enumerate(classes):
        mine = torch.stack([x for x, label in zip(training.patches, training.labels) if label == k])
        pool = torch.cat([mine, mine.flip(-1)])
        g = generator(stream_seed(seed, "models_check", k))
        x_T = torch.randn(n, *mine.shape[1:], generator=g)
        y = torch.full((n,), k, dtype=torch.long)
        with torch.no_grad():
            samples = ddim_sample(model, diffusion, x_T.to(device), y=y.to(device)).cpu().clamp(-1, 1)
        distances, index = nearest(samples, pool)
        real = [x for x, label in zip(unseen.patches, unseen.labels) if label == k] if unseen is not None else []
        reference = nearest(torch.stack(real), pool)[0] if real else leave_one_out(mine)
        threshold = COPY * float(reference.median())
        checks.append(ClassCheck(name, distances.tolist(), index.tolist(), reference.tolist(), threshold, samples,
                                 pool[index]))
    return checks


def verdict(checks: list[ClassCheck]) -> str:
    """The one line: which classes' samples are copies of training defects, or none."""
    flagged = [c for c in checks if c.flagged]
    if not flagged:
        return (f"memorisation: none of {len(checks)} classes copies its training defects (at most "
                f"{max(c.copies for c in checks)} of {len(checks[0].distances)} samples nearer than {COPY} x the "
                "distance of unseen real defects)")
    return ("memorisation: samples are copies of training defects in " + ", ".join(
        f"{c.name} ({c.copies} of {len(c.distances)})" for c in flagged)
        + ": train fewer steps, a smaller local model (conf/arch/) or with more defects per class")


def grid(check: ClassCheck, path: Path, cell: int = 64) -> None:
    """Samples (top) over their nearest training patches (bottom), RGB, the distance under each pair."""
    def tiles(x: torch.Tensor) -> np.ndarray:
        return to_uint8(x[:, RGB])

    top, bottom = tiles(check.samples), tiles(check.matches)
    n, size = top.shape[0], top.shape[1]
    canvas = Image.new("RGB", (n * cell, 2 * cell + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        for row, images in enumerate((top, bottom)):
            tile = Image.fromarray(images[i]).resize((cell, cell), Image.NEAREST if size < cell else Image.BILINEAR)
            canvas.paste(tile, (i * cell, row * cell))
        colour = "red" if check.distances[i] < check.threshold else "black"
        draw.text((i * cell + 2, 2 * cell + 1), f"{check.distances[i]:.3f}", fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def write_report(checks: list[ClassCheck], out: Path, checkpoint: str) -> dict:
    """OUT/<class>.png grids and OUT/models.json; returns the report."""
    report = {"checkpoint": checkpoint, "copy_factor": COPY, "verdict": verdict(checks), "classes": {
        c.name: {"samples": len(c.distances), "copies": c.copies, "flagged": c.flagged, "threshold": c.threshold,
                 "median_distance": float(np.median(c.distances)), "unseen_median": float(np.median(c.reference)),
                 "distances": c.distances} for c in checks}}
    out.mkdir(parents=True, exist_ok=True)
    for c in checks:
        grid(c, out / f"{c.name}.png")
    (out / "models.json").write_text(json.dumps(report, indent=1))
    return report


def run(checkpoint: Path, data_root: Path, out: Path | None = None, n: int = 16, steps: int = 25,
        seed: int = 0, device: str = "cpu") -> dict:
    """The command: load the local checkpoint, its classes and the held-out slice beside it; check; report."""
    _, meta = stored_metadata(checkpoint)
    if "dmgr.classes" not in meta:
        raise ValueError(f"--local={checkpoint}: no class names in the checkpoint: give a local model trained by "
                         "`python -m dmgr.train`")
    classes = json.loads(meta["dmgr.classes"])
    record = Path(checkpoint).parent / "held_out.json"
    held = json.loads(record.read_text()).get("names", []) if record.is_file() else []
    model = load_unet(checkpoint, device=device).eval()
    checks = check_memorisation(model, data_root, classes, held, n, steps, seed, device=device)
    report = write_report(checks, out or Path(checkpoint).parent / "models-check", str(checkpoint))
    for c in checks:
        log.info("%s: %d of %d samples copies (nearest training patch < %.3f); median distance %.3f, unseen "
                 "real defects %.3f", c.name, c.copies, len(c.distances), c.threshold, np.median(c.distances),
                 np.median(c.reference))
    return report
