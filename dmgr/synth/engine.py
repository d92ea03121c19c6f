"""Models and samplers composed for the job: seed plans in, finished samples (arrays + metadata) out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dmgr import __version__
from dmgr.diffusion import Diffusion, make_diffusion
from dmgr.images import bounding_box, from_uint8, to_uint8
from dmgr.models import UNetModel, build_unet, file_digest, load_unet
from dmgr.models.acceleration import accelerate
from dmgr.sampler import DMGRResult, PerSampleNoise, ddim_sample, dmgr_sample, initial_noise, make_generators
from dmgr.sampler.masks import diff_mask, gate_mask, local_mask
from dmgr.synth.config import NetworkSpec, RunSpec
from dmgr.synth.plan import SamplePlan, stream_seed

log = logging.getLogger(__name__)


@dataclass
class Engine:
    global_model: UNetModel
    local_model: UNetModel
    diffusion: Diffusion
    digests: dict[str, str]
    device: torch.device
    gate: object | None = None  # dmgr.eval.user_classifier.GateClassifier when gate.enabled


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
    return load_unet(spec.checkpoint, spec.config, device), spec.digest or file_digest(spec.checkpoint)


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
    global_model = accelerate(global_model, spec.acceleration)
    local_model = accelerate(local_model, spec.acceleration)
    diffusion = make_diffusion(spec.model.diffusion_steps, spec.model.beta_schedule, spec.respacing)
    digests = {"global": global_digest, "local": local_digest}
    return Engine(global_model, local_model, diffusion, digests, device, load_gate(spec))


def load_gate(spec: RunSpec) -> object | None:
    """The gate classifier (trained on first use, then from gate.cache_dir), or None without the gate."""
    if not spec.gate.enabled:
        return None
    from dmgr.eval.user_classifier import UserClassifierSettings, load_or_train_user

    settings = UserClassifierSettings(window=spec.dataset.window_size, steps=spec.gate.classifier_steps,
                                      area_quantile=spec.gate.area_quantile)
    return load_or_train_user(spec.gate.data_root, spec.dataset.classes, spec.backgrounds, settings,
                              spec.gate.cache_dir, spec.gate.data_digest, progress=spec.progress)


def _mask_image(mask: torch.Tensor | np.ndarray) -> Image.Image:
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask
    return Image.fromarray(mask.astype(np.uint8) * 255)


def paste_local_sample(
    engine: Engine, spec: RunSpec, plans: list[SamplePlan], twin: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """The no-rectification baseline: a plain local-model DDIM sample of each plan's class pasted into
    the defect-free twin at the window (the local noise comes from its own per-seed generator)."""
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


def defect_masks(
    spec: RunSpec, methods: tuple[str, ...], result: DMGRResult, reference: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """(B, 1, H, W) bool masks of a sampler result by method; `reference` is what `diff` compares with
    (the defect-free twin, or the real background)."""
    size, w = spec.dataset.image_size, spec.dataset.window_size
    masks = {}
    for method in methods:
        if method == "local":
            masks[method] = local_mask(result.crop, result.windows, size, size)
        elif method == "diff":
            masks[method] = diff_mask(
                result.image, reference, result.windows, w, spec.mask_sigma, spec.mask_min_contrast
            )
        else:
            masks[method] = gate_mask(size, size, result.windows, w, spec.sampler.gate_radius, result.gate_falloff)
    return masks


def _common_meta(spec: RunSpec, engine: Engine, plan: SamplePlan) -> dict:
    return {
        "seed": plan.seed,
        **({"attempt": plan.attempt} if plan.attempt else {}),
        "class_name": plan.class_name,
        "class_id": plan.class_id,
        "mask_method": spec.mask_method,
        "image_size": spec.dataset.image_size,
        "dataset": spec.dataset.name,
        "source": spec.dataset.source,
        "schedule": dict(spec.resolved["schedule"]),
        "respacing": spec.respacing,
        "checkpoints": {"model": spec.model.name, **engine.digests},
        "precision": spec.precision,
        "run_identity": spec.identity,
        "dmgr_version": __version__,
    }


def _finite(*tensors: torch.Tensor) -> list[bool]:
    """Per sample: every value of every tensor is finite (NaN/Inf never reach a shard)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t).flatten(1).all(1)
    return ok.tolist()


def _box(x: int, y: int, w: int) -> list[int]:
    return [x, y, x + w, y + w]


def generate(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[dict]:
    """One batch of plans -> webdataset samples (seed, finite: no NaN/Inf in the image, + members)."""
    if spec.dataset.source == "images":
        return generate_into_backgrounds(engine, spec, plans)
    return generate_boards(engine, spec, plans)


def generate_into_backgrounds(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[dict]:
    """DMGR into real backgrounds: defect k of every plan in one sampler call (defect k > 0 draws its noise
    from stream_seed(seed, "defect", k)), the background known outside the window; the result takes the
    generated pixels only inside the defect mask, so everything outside the masks is the input, byte for byte."""
    size, w = spec.dataset.image_size, spec.dataset.window_size
    inputs = np.stack([spec.backgrounds.image(p.background) for p in plans])
    canvas = inputs.copy()
    methods = spec.available_masks if spec.extras.masks else (spec.mask_method,)
    unions = {m: np.zeros(inputs.shape[:3], dtype=bool) for m in methods}
    defects: list[list[dict]] = [[] for _ in plans]
    crops, grids = [None] * len(plans), [None] * len(plans)
    finite = [True] * len(plans)
    for k in range(max(len(p.defects) for p in plans)):
        rows = [i for i, p in enumerate(plans) if len(p.defects) > k]
        generators = make_generators([plans[i].noise_seed if k == 0 else stream_seed(plans[i].noise_seed, "defect", k)
                                      for i in rows])
        known = from_uint8(canvas[rows]).to(engine.device)
        result = dmgr_sample(
            engine.global_model,
            engine.local_model,
            engine.diffusion,
            initial_noise(generators, (3, size, size), engine.device),
            torch.tensor([plans[i].defects[k].window for i in rows], device=engine.device),
            torch.tensor([plans[i].defects[k].class_id for i in rows], device=engine.device),
            w,
            spec.sampler,
            noise=PerSampleNoise(generators),
            precision=spec.precision,
            record_process=spec.extras.grid and k == 0,
            known=known,
        )
        for j, ok in enumerate(_finite(result.image, result.crop)):
            finite[rows[j]] &= ok
        masks = {m: v[:, 0].cpu().numpy() for m, v in defect_masks(spec, methods, result, known).items()}
        pixels = result.image.clone()
        if spec.mask_pixels == "crop":
            for j, (x, y) in enumerate(result.windows.tolist()):
                pixels[j, :, y : y + w, x : x + w] = result.crop[j, :3]
        generated = to_uint8(pixels)
        chosen = masks[spec.mask_method]
        canvas[rows] = np.where(chosen[..., None], generated, canvas[rows])
        for m in methods:
            unions[m][rows] |= masks[m]
        for j, i in enumerate(rows):
            d = plans[i].defects[k]
            mask = torch.from_numpy(chosen[j])
            defects[i].append({
                "class_name": d.class_name,
                "class_id": d.class_id,
                "window_box": _box(*d.window, w),
                "mask_box": bounding_box(mask),
                "mask_area": int(mask.sum()),
                "final_loss": float(result.final_loss[j]),
            })
        if k == 0:
            crop_images = to_uint8(result.crop[:, :3])
            grid = None
            if result.x0_process:
                grid = to_uint8(torch.cat([x0 for _, x0 in result.x0_process], dim=3))
            for j, i in enumerate(rows):
                crops[i], grids[i] = crop_images[j], None if grid is None else grid[j]
    samples = []
    for i, plan in enumerate(plans):
        union = unions[spec.mask_method][i]
        background = spec.backgrounds.items[plan.background]
        meta = {
            **_common_meta(spec, engine, plan),
            "window_box": defects[i][0]["window_box"],
            "mask_box": bounding_box(torch.from_numpy(union)),
            "mask_area": int(union.sum()),
            "mask_pixels": spec.mask_pixels,
            "final_loss": defects[i][0]["final_loss"],
            "defects": defects[i],
            "defects_requested": spec.dataset.defects_per_image,
            "background": {"image": background.name, "sha256": background.sha256, "index": plan.background},
        }
        sample = {"seed": plan.seed, "finite": finite[i], "png": Image.fromarray(canvas[i]),
                  "mask.png": _mask_image(union), "json": meta}
        if spec.extras.input:
            sample["input.png"] = Image.fromarray(inputs[i])
        if spec.extras.crop:
            sample["crop.png"] = Image.fromarray(crops[i])
        if grids[i] is not None:
            sample["grid.png"] = Image.fromarray(grids[i])
        if spec.extras.masks:
            for method in methods:
                sample[f"mask_{method}.png"] = _mask_image(unions[method][i])
        samples.append(sample)
    return samples


def generate_boards(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[dict]:
    """The whole-board walk (dataset.source=generate): the global model makes the board, DMGR the defect."""
    size, w = spec.dataset.image_size, spec.dataset.window_size
    generators = make_generators([p.noise_seed for p in plans])
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
        record_process=spec.extras.grid,
    )
    all_masks, paste = spec.extras.masks, spec.extras.paste
    twin = None
    if spec.mask_method == "diff" or all_masks or paste or spec.extras.twin:
        twin = ddim_sample(engine.global_model, engine.diffusion, x_T, precision=spec.precision)
    methods = spec.available_masks if all_masks else (spec.mask_method,)
    masks_by_method = defect_masks(spec, methods, result, twin)
    masks = masks_by_method[spec.mask_method]
    pasted = paste_masks = None
    if paste:
        pasted = paste_local_sample(engine, spec, plans, twin, windows)
        paste_masks = diff_mask(pasted, twin, windows, w, spec.mask_sigma, spec.mask_min_contrast)
        pasted = to_uint8(pasted)
    images = to_uint8(result.image)
    crops = to_uint8(result.crop[:, :3])
    twins = to_uint8(twin) if twin is not None else None
    grids = None
    if spec.extras.grid and result.x0_process:
        grids = to_uint8(torch.cat([x0 for _, x0 in result.x0_process], dim=3))
    finite = _finite(result.image, result.crop)
    samples = []
    for i, plan in enumerate(plans):
        x, y = plan.window
        mask = masks[i, 0].cpu()
        meta = {
            **_common_meta(spec, engine, plan),
            "window_box": _box(x, y, w),
            "mask_box": bounding_box(mask),
            "mask_area": int(mask.sum()),
            "final_loss": float(result.final_loss[i]),
        }
        sample = {
            "seed": plan.seed,
            "finite": finite[i],
            "png": Image.fromarray(images[i]),
            "mask.png": _mask_image(mask),
            "json": meta,
        }
        if spec.extras.crop:
            sample["crop.png"] = Image.fromarray(crops[i])
        if twins is not None and spec.extras.twin:
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
