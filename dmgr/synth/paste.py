"""The no-rectification baseline the evaluation compares DMGR with (extras.paste, dataset.source=generate):
a plain local-model sample of each plan's class pasted into the defect-free twin, no rectification."""

from __future__ import annotations

import torch

from dmgr.diffusion import Diffusion
from dmgr.sampler import ddim_sample, initial_noise, make_generators
from dmgr.sampler.masks import diff_mask
from dmgr.synth.config import MaskSettings
from dmgr.synth.plan import SamplePlan, stream_seed


def paste_local_sample(local_model: torch.nn.Module, diffusion: Diffusion, plans: list[SamplePlan],
                       twin: torch.Tensor, window_size: int, precision: str) -> torch.Tensor:
    """(B, 3, H, W): the twin with a plain local-model DDIM sample at each plan's window (the local noise
    comes from its own per-seed generator, stream "paste")."""
    w = window_size
    generators = make_generators([stream_seed(p.noise_seed, "paste") for p in plans])
    patches = ddim_sample(
        local_model,
        diffusion,
        initial_noise(generators, (local_model.in_channels, w, w), twin.device),
        y=torch.tensor([p.class_id for p in plans], device=twin.device),
        precision=precision,
    )
    pasted = twin.clone()
    for i, (x, y) in enumerate(p.window for p in plans):
        pasted[i, :, y : y + w, x : x + w] = patches[i, :3]
    return pasted


def paste_baseline(local_model: torch.nn.Module, diffusion: Diffusion, plans: list[SamplePlan], twin: torch.Tensor,
                   windows: torch.Tensor, window_size: int, mask: MaskSettings, precision: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pasted images (B, 3, H, W), their (B, H, W) bool diff masks against the twin)."""
    pasted = paste_local_sample(local_model, diffusion, plans, twin, window_size, precision)
    masks = diff_mask(pasted, twin, windows, window_size, mask.sigma, mask.min_contrast)
    return pasted, masks[:, 0]
