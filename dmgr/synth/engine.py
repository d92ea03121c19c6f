"""Models and samplers composed for the job: seed plans in, finished samples (arrays + metadata) out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dmgr import __version__
from dmgr.diffusion import Diffusion, make_diffusion
from dmgr.images import to_uint8
from dmgr.models import UNetModel, build_unet, file_digest, load_unet
from dmgr.sampler import PerSampleNoise, ddim_sample, dmgr_sample, initial_noise, make_generators
from dmgr.sampler.masks import MASK_METHODS, bounding_box, diff_mask, gate_mask
from dmgr.synth.config import NetworkSpec, RunSpec
from dmgr.synth.plan import PASTE_STREAM, SamplePlan

log = logging.getLogger(__name__)


@dataclass
class Engine:
    global_model: UNetModel
    local_model: UNetModel
    diffusion: Diffusion
    digests: dict[str, str]
    device: torch.device


def randomised_unet(config: dict, seed: int) -> UNetModel:
    """A UNet with PyTorch's default initialisation from its own generator, and the layers that
    guided-diffusion zero-initialises (a fresh one outputs zeros) filled with small noise."""
    g = torch.Generator().manual_seed(seed)
    model = build_unet(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                bound = 1 / max(1, p[0].numel()) ** 0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif not torch.all(p == 1):
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    return model.eval()


def _load(spec: NetworkSpec, random_seed: int, device: torch.device) -> tuple[UNetModel, str]:
    if spec.checkpoint is None:
        return randomised_unet(spec.config, random_seed).to(device), f"random-init-{random_seed}"
    return load_unet(spec.checkpoint, spec.config, device), file_digest(spec.checkpoint)


def load_engine(spec: RunSpec, device: torch.device) -> Engine:
    if spec.model.random_init:
        log.warning(
            "!!! model=%s: RANDOMLY INITIALISED networks, the images are meaningless noise patterns. "
            "Use model=demo (trained demo checkpoints) or model=custom for real work !!!",
            spec.model.name,
        )
    global_model, global_digest = _load(spec.model.global_net, 0, device)
    local_model, local_digest = _load(spec.model.local_net, 1, device)
    for model in (global_model, local_model):
        model.requires_grad_(False)
    diffusion = make_diffusion(spec.model.diffusion_steps, spec.model.beta_schedule, spec.respacing)
    return Engine(global_model, local_model, diffusion, {"global": global_digest, "local": local_digest}, device)


def _mask_image(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255)


def paste_local_sample(
    engine: Engine, spec: RunSpec, plans: list[SamplePlan], twin: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """The no-rectification baseline: a plain local-model DDIM sample of each plan's class pasted into
    the defect-free twin at the window (the local noise comes from its own per-seed generator)."""
    w = spec.dataset.window_size
    generators = make_generators([p.seed + PASTE_STREAM for p in plans])
    patches = ddim_sample(
        engine.local_model,
        engine.diffusion,
        initial_noise(generators, (3, w, w), engine.device),
        y=torch.tensor([p.class_id for p in plans], device=engine.device),
        precision=spec.precision,
    )
    pasted = twin.clone()
    for i, (x, y) in enumerate(p.window for p in plans):
        pasted[i, :, y : y + w, x : x + w] = patches[i]
    return pasted


def generate(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[dict]:
    """One sampler call for a batch of plans; returns webdataset samples (seed + members)."""
    d, size, w = spec.dataset, spec.dataset.image_size, spec.dataset.window_size
    generators = make_generators([p.seed for p in plans])
    x_T = initial_noise(generators, (3, size, size), engine.device)
    windows = torch.tensor([p.window for p in plans], device=engine.device)
    classes = torch.tensor([p.class_id for p in plans], device=engine.device)
    result = dmgr_sample(
        engine.global_model,
        engine.local_model,
        engine.diffusion,
        x_T,
        windows,
        classes,
        w,
        spec.sampler,
        noise=PerSampleNoise(generators),
        precision=spec.precision,
        record_process=spec.extras.get("grid", False),
    )
    all_masks, paste = spec.extras.get("masks", False), spec.extras.get("paste", False)
    twin = None
    if spec.mask_method == "diff" or all_masks or paste or spec.extras.get("twin", False):
        twin = ddim_sample(engine.global_model, engine.diffusion, x_T, precision=spec.precision)
    methods = MASK_METHODS if all_masks else (spec.mask_method,)
    masks_by_method = {}
    for method in methods:
        if method == "diff":
            masks_by_method[method] = diff_mask(result.image, twin, windows, w, spec.mask_sigma, spec.mask_min_contrast)
        else:
            masks_by_method[method] = gate_mask(size, size, windows, w, spec.sampler.gate_radius, result.gate_falloff)
    masks = masks_by_method[spec.mask_method]
    pasted = paste_masks = None
    if paste:
        pasted = paste_local_sample(engine, spec, plans, twin, windows)
        paste_masks = diff_mask(pasted, twin, windows, w, spec.mask_sigma, spec.mask_min_contrast)
        pasted = to_uint8(pasted)
    images = to_uint8(result.image)
    crops = to_uint8(result.crop)
    twins = to_uint8(twin) if twin is not None else None
    grids = None
    if spec.extras.get("grid", False) and result.x0_process:
        grids = to_uint8(torch.cat([x0 for _, x0 in result.x0_process], dim=3))
    schedule = {k: v for k, v in spec.resolved["schedule"].items()}
    samples = []
    for i, plan in enumerate(plans):
        x, y = plan.window
        mask = masks[i, 0].cpu()
        meta = {
            "seed": plan.seed,
            "class_name": plan.class_name,
            "class_id": plan.class_id,
            "window_box": [x, y, x + w, y + w],
            "mask_box": bounding_box(mask),
            "mask_area": int(mask.sum()),
            "mask_method": spec.mask_method,
            "final_loss": float(result.final_loss[i]),
            "image_size": size,
            "dataset": d.name,
            "schedule": schedule,
            "respacing": spec.respacing,
            "checkpoints": {"model": spec.model.name, **engine.digests},
            "precision": spec.precision,
            "run_identity": spec.identity,
            "dmgr_version": __version__,
        }
        sample = {
            "seed": plan.seed,
            "png": Image.fromarray(images[i]),
            "mask.png": _mask_image(mask),
            "json": meta,
        }
        if spec.extras.get("crop", False):
            sample["crop.png"] = Image.fromarray(crops[i])
        if twins is not None and spec.extras.get("twin", False):
            sample["twin.png"] = Image.fromarray(twins[i])
        if grids is not None:
            sample["grid.png"] = Image.fromarray(grids[i])
        if all_masks:
            for method, method_masks in masks_by_method.items():
                sample[f"mask_{method}.png"] = _mask_image(method_masks[i, 0])
        if pasted is not None:
            sample["paste.png"] = Image.fromarray(pasted[i])
            sample["paste_mask.png"] = _mask_image(paste_masks[i, 0])
        samples.append(sample)
    return samples
