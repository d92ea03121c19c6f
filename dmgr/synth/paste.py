"""The no-rectification baseline the evaluation compares DMGR with (extras.paste, dataset.source=generate):
a plain local-model sample of each plan's class pasted into the defect-free twin, no rectification."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dmgr.sampler import ddim_sample, initial_noise, make_generators
from dmgr.sampler.masks import diff_mask
from dmgr.synth.plan import SamplePlan, stream_seed

if TYPE_CHECKING:
    from dmgr.synth.config import RunSpec
    from dmgr.synth.engine import Engine


def paste_local_sample(engine: Engine, spec: RunSpec, plans: list[SamplePlan], twin: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W): the twin with a plain local-model DDIM sample at each plan's window (the local noise
    comes from its own per-seed generator, stream "paste")."""
    w = spec.dataset.window_size
    generators = make_generators([stream_seed(p.noise_seed, "paste") for p in plans])
    patches = ddim_sample(
        engine.local_model,
        engine.diffusion,
        initial_noise(generators, (engine.local_model.in_channels, w, w), engine.device),
        y=torch.tensor([p.class_id for p in plans], device=engine.device),
        precision=spec.precision,
    )
    pasted = twin.clone()
    for i, (x, y) in enumerate(p.window for p in plans):
        pasted[i, :, y : y + w, x : x + w] = patches[i, :3]
    return pasted


def paste_baseline(
    engine: Engine, spec: RunSpec, plans: list[SamplePlan], twin: torch.Tensor, windows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pasted images (B, 3, H, W), their (B, H, W) bool diff masks against the twin)."""
    pasted = paste_local_sample(engine, spec, plans, twin)
    mask = diff_mask(pasted, twin, windows, spec.dataset.window_size, spec.mask.sigma, spec.mask.min_contrast)
    return pasted, mask[:, 0]
