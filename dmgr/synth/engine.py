"""Models and samplers composed for the job: seed plans in, sampled tensors and masks (a `Batch`), then the
samples' shard members out (`shard_members`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dmgr import __version__
from dmgr.diffusion import Diffusion, make_diffusion
from dmgr.images import bounding_box, from_uint8, to_uint8
from dmgr.models import UNetModel, build_unet, file_digest, load_unet
from dmgr.models.performance import accelerate
from dmgr.sampler import RGB, DMGRResult, PerSampleNoise, ddim_sample, dmgr_sample, initial_noise, make_generators
from dmgr.sampler.dmgr import model_eps
from dmgr.sampler.masks import diff_mask, gate_mask, local_mask
from dmgr.sampler.noise import generator
from dmgr.synth.config import NetworkSpec, RunSpec
from dmgr.synth.plan import Defect, SamplePlan, model_window, stream_seed

log = logging.getLogger(__name__)
GIVEN = "_given"  # a real-image sample's decoded input frame, dropped before the sample is written


@dataclass
class Engine:
    global_model: UNetModel
    local_model: UNetModel
    diffusion: Diffusion
    digests: dict[str, str]
    device: torch.device
    screen: object | None = None  # dmgr.synth.screen_classifier.ScreenClassifier when screen.enabled


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
    global_model = accelerate(global_model, spec.performance)
    local_model = accelerate(local_model, spec.performance)
    diffusion = make_diffusion(spec.model.diffusion_steps, spec.model.beta_schedule, spec.respacing)
    digests = {"global": global_digest, "local": local_digest}
    return Engine(global_model, local_model, diffusion, digests, device, load_screen(spec))


def load_screen(spec: RunSpec) -> object | None:
    """The screen classifier (trained on first use, then from screen.cache_dir), or None without the screen."""
    if not spec.screen.enabled:
        return None
    from dmgr.synth.config import screen_classifier_settings
    from dmgr.synth.screen_classifier import load_screen_classifier

    settings = screen_classifier_settings(spec.screen, spec.dataset)
    return load_screen_classifier(spec.screen.data_root, spec.dataset.classes, spec.backgrounds, settings,
                                  spec.screen.cache_dir, spec.screen.data_digest, progress=spec.progress)


@dataclass
class Batch:
    """One batch sampled, before it becomes shard members. Masks are (B, H, W) bool, by method (the run's
    `spec.mask.method` is the sample's mask); `defects` holds per sample, per defect, at least window_box
    and final_loss. The extra images are None when the run does not write them."""

    image: torch.Tensor | list[np.ndarray]  # (B, 3, H, W) in [-1, 1], or real images: B (H_i, W_i, 3) uint8
    masks: dict[str, torch.Tensor | list[np.ndarray]]
    defects: list[list[dict]]
    finite: list[bool]  # no NaN/Inf in the sample's image or crop
    crop: torch.Tensor | None = None
    grid: torch.Tensor | None = None
    twin: torch.Tensor | None = None
    input: list[np.ndarray] | None = None
    paste: torch.Tensor | None = None
    paste_mask: torch.Tensor | None = None


def generate(engine: Engine, spec: RunSpec, plans: list[SamplePlan]) -> list[dict]:
    """One batch of plans -> webdataset samples (seed, finite: no NaN/Inf in the image, + members): sampled
    with their masks into a `Batch`, then turned into members by `shard_members`."""
    methods = spec.available_masks if spec.extras.masks else (spec.mask.method,)
    sampler = sample_into_backgrounds if spec.dataset.source == "images" else sample_boards
    return shard_members(spec, engine.digests, plans, sampler(engine, spec, plans, methods))


def defect_masks(
    spec: RunSpec, methods: tuple[str, ...], result: DMGRResult, reference: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """(B, H, W) bool masks of a sampler result by method; `reference` is what `diff` compares with
    (the defect-free twin, or the real background)."""
    size, w = spec.dataset.image_size, spec.dataset.window_size

    def mask(method: str) -> torch.Tensor:
        if method == "local":
            return local_mask(result.crop, result.windows, size, size)
        if method == "diff":
            return diff_mask(result.image, reference, result.windows, w, spec.mask.sigma, spec.mask.min_contrast)
        return gate_mask(size, size, result.windows, w, spec.sampler.gate_radius, result.gate_falloff)

    return {method: mask(method)[:, 0] for method in methods}


def _finite(*tensors: torch.Tensor) -> list[bool]:
    """Per sample: every value of every tensor is finite (NaN/Inf never reach a shard)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t).flatten(1).all(1)
    return ok.tolist()


def _box(x: int, y: int, w: int) -> list[int]:
    return [x, y, x + w, y + w]


def _grid(result: DMGRResult) -> torch.Tensor | None:
    """The recorded x0 predictions side by side, or None when none were recorded."""
    return torch.cat([x0 for _, x0 in result.x0_process], dim=3) if result.x0_process else None


def sample_boards(engine: Engine, spec: RunSpec, plans: list[SamplePlan], methods: tuple[str, ...]) -> Batch:
    """The whole-board walk (dataset.source=generate): the global model makes the board, DMGR the defect;
    the defect-free twin (plain DDIM from the same x_T) when a diff mask, the twin or the paste needs it."""
    size, w = spec.dataset.image_size, spec.dataset.window_size
    generators = make_generators([p.noise_seed for p in plans])
    x_T = initial_noise(generators, (3, size, size), engine.device)
    windows = torch.tensor([p.window for p in plans], device=engine.device)
    result = dmgr_sample(
        engine.global_model,
        engine.local_model,
        engine.diffusion,
        x_T,
        windows,
        torch.tensor([p.class_id for p in plans], device=engine.device),
        w,
        spec.sampler,
        noise=PerSampleNoise(generators),
        precision=spec.precision,
        record_process=spec.extras.grid,
    )
    twin = None
    if "diff" in methods or spec.extras.twin or spec.extras.paste:
        twin = ddim_sample(engine.global_model, engine.diffusion, x_T, precision=spec.precision)
    defects = [[{"window_box": _box(*p.window, w), "final_loss": float(result.final_loss[i])}]
               for i, p in enumerate(plans)]
    batch = Batch(result.image, defect_masks(spec, methods, result, twin), defects,
                  _finite(result.image, result.crop), crop=result.crop[:, RGB], grid=_grid(result), twin=twin)
    if spec.extras.paste:  # evaluation only
        from dmgr.synth.paste import paste_baseline

        batch.paste, batch.paste_mask = paste_baseline(engine, spec, plans, twin, windows)
    return batch


def to_model(crops: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, c, c) context crops -> (B, 3, size, size): bilinear with antialiasing (an area-like filter when
    shrinking); unchanged when c == size."""
    if crops.shape[-1] == size:
        return crops
    return F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_image(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """Model-pixel results (B, 3, S, S) back to a context crop of `side` image pixels (bilinear, antialiased);
    unchanged when S == side."""
    if pixels.shape[-1] == side:
        return pixels
    return F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def mask_to_image(masks: torch.Tensor, side: int) -> np.ndarray:
    """(B, S, S) bool model-pixel masks -> (B, side, side) bool numpy, nearest neighbour."""
    if masks.shape[-1] != side:
        masks = F.interpolate(masks[:, None].float(), size=(side, side), mode="nearest")[:, 0] > 0.5
    return masks.cpu().numpy()


def image_window_box(defect, geometry) -> list[int]:
    """The image pixels [x0, y0, x1, y1] that the defect's model window covers once resized back (the
    nearest-neighbour masks fall inside it)."""
    ratio = geometry.crop / geometry.image_size
    (mx, my), (cx, cy) = model_window(defect, geometry), defect.context
    w = geometry.window_size
    return [cx + math.ceil(mx * ratio), cy + math.ceil(my * ratio),
            cx + math.ceil((mx + w) * ratio), cy + math.ceil((my + w) * ratio)]


def planned_defect(defect, geometry) -> dict:
    """The json fields of one defect on a real background that its plan gives (boxes in image pixels): with
    candidates, their window boxes (the engine chooses the window)."""
    if defect.candidates:
        return {"class_name": defect.class_name, "class_id": defect.class_id,
                "candidate_boxes": [image_window_box(defect.placed(j, geometry), geometry)
                                    for j in range(len(defect.candidates))]}
    cx, cy = defect.context
    return {
        "class_name": defect.class_name,
        "class_id": defect.class_id,
        "window_box": image_window_box(defect, geometry),
        "context_box": [cx, cy, cx + geometry.crop, cy + geometry.crop],
    }


def placement_levels(num_steps: int, count: int) -> list[int]:
    """`count` indices of the respaced grid, evenly from 10 % to 50 % of it (low and middle noise: where the
    local model's error still sees the window's texture)."""
    if count == 1:
        return [max(0, round(0.3 * (num_steps - 1)))]
    return [round((0.1 + 0.4 * i / (count - 1)) * (num_steps - 1)) for i in range(count)]


PLACEMENT_ROWS = 512  # windows x classes x levels per forward of the placement score (the default's 72: one)


@torch.no_grad()
def placement_scores(model: torch.nn.Module, diffusion: Diffusion, windows: torch.Tensor, class_id: int,
                     num_classes: int, levels: list[int], g: torch.Generator, precision: str = "fp32") -> torch.Tensor:
    """(K,) how much better class `class_id` explains each clean window (K, 3, w, w) than the classes on
    average: the local model's class-conditional denoising error (epsilon MSE on the colour channels) under
    the class minus its mean over all classes, averaged over the noise `levels`; lower is more plausible.
    The noise comes from `g` (per level, (K, C_in, w, w)); a mask channel is given pure noise (its clean value
    is unknown). One forward over levels x classes x windows."""
    k, w = windows.shape[0], windows.shape[-1]
    channels = getattr(model, "in_channels", 3)
    inputs, noises, steps = [], [], []
    for index in levels:
        eps = torch.randn((k, channels, w, w), generator=g).to(windows.device)
        abar = diffusion.abar(index)
        x_t = eps.clone()
        x_t[:, :3] = abar**0.5 * windows + (1 - abar) ** 0.5 * eps[:, :3]
        inputs.append(x_t.repeat(num_classes, 1, 1, 1))
        noises.append(eps[:, :3].repeat(num_classes, 1, 1, 1))
        steps.append(diffusion.model_timesteps(index, k * num_classes, windows.device))
    labels = torch.arange(num_classes, device=windows.device).repeat_interleave(k).repeat(len(levels))
    inputs, steps = torch.cat(inputs), torch.cat(steps)
    predicted = torch.cat([model_eps(model, inputs[i : i + PLACEMENT_ROWS], steps[i : i + PLACEMENT_ROWS],
                                     labels[i : i + PLACEMENT_ROWS], precision)[:, :3]
                           for i in range(0, len(labels), PLACEMENT_ROWS)])
    error = (predicted - torch.cat(noises)).pow(2).flatten(1).mean(1).view(len(levels), num_classes, k)
    return (error[:, class_id] - error.mean(1)).mean(0).cpu()


def _clean_window(frame: np.ndarray, defect: Defect, spec: RunSpec) -> torch.Tensor:
    """(1, 3, w, w) the defect's window as the sampler sees it: its context crop resized to image_size."""
    geometry, side, w = spec.backgrounds.geometry, spec.backgrounds.geometry.crop, spec.dataset.window_size
    cx, cy = defect.context
    crop = to_model(from_uint8(np.ascontiguousarray(frame[None, cy : cy + side, cx : cx + side])),
                    spec.dataset.image_size)
    mx, my = model_window(defect, geometry)
    return crop[:, :, my : my + w, mx : mx + w]


def choose_placement(engine: Engine, spec: RunSpec, frame: np.ndarray, plan: SamplePlan, k: int,
                     defect: Defect) -> tuple[Defect, dict | None]:
    """(the defect at its most plausible candidate window, the json's record of the choice), scored on `frame`
    in a batch of this defect's candidates only (so the choice never depends on batch-mates); ties go to the
    lower index. A defect without candidates is returned as planned, with None."""
    if len(defect.candidates) < 2:
        return defect, None
    geometry = spec.backgrounds.geometry
    placed = [defect.placed(j, geometry) for j in range(len(defect.candidates))]
    windows = torch.cat([_clean_window(frame, d, spec) for d in placed]).to(engine.device)
    key = stream_seed(plan.seed, "placement", k, *((plan.attempt,) if plan.attempt else ()))
    levels = placement_levels(engine.diffusion.num_steps, spec.dataset.placement.noise_levels)
    scores = placement_scores(engine.local_model, engine.diffusion, windows, defect.class_id,
                              len(spec.dataset.classes), levels, generator(key), spec.precision).tolist()
    chosen = min(range(len(scores)), key=lambda j: (scores[j], j))
    return placed[chosen], {"candidates": len(scores), "chosen": chosen, "score": diagnostic(scores[chosen])}


def sample_into_backgrounds(
    engine: Engine, spec: RunSpec, plans: list[SamplePlan], methods: tuple[str, ...]
) -> Batch:
    """DMGR into real backgrounds at their own size: each frame is decoded once; defect k of every plan is
    made in one sampler call on its context crop (resized to image_size when scale != 1; defect k > 0 draws
    its noise from stream_seed(seed, "defect", k)) with the crop known outside the window, into the result
    of defects < k. Only the pixels inside the defect mask go back into the frame, so everything outside
    the masks is the input, byte for byte. The masks are the union over the defects; crop and grid are
    defect 0's."""
    size, w = spec.dataset.image_size, spec.dataset.window_size
    geometry, side = spec.backgrounds.geometry, spec.backgrounds.geometry.crop
    inputs = [spec.backgrounds.image(p.background) for p in plans]
    canvas = [frame.copy() for frame in inputs]
    unions = {m: [np.zeros(frame.shape[:2], dtype=bool) for frame in inputs] for m in methods}
    defects: list[list[dict]] = [[] for _ in plans]
    finite = [True] * len(plans)
    for k in range(max(len(p.defects) for p in plans)):
        rows = [i for i, p in enumerate(plans) if len(p.defects) > k]
        choices = [choose_placement(engine, spec, canvas[i], plans[i], k, plans[i].defects[k]) for i in rows]
        chosen_defects = [d for d, _ in choices]
        generators = make_generators([plans[i].noise_seed if k == 0 else stream_seed(plans[i].noise_seed, "defect", k)
                                      for i in rows])
        crops = np.stack([canvas[i][d.context[1] : d.context[1] + side, d.context[0] : d.context[0] + side]
                          for i, d in zip(rows, chosen_defects)])
        known = to_model(from_uint8(crops), size).to(engine.device)
        result = dmgr_sample(
            engine.global_model,
            engine.local_model,
            engine.diffusion,
            initial_noise(generators, (3, size, size), engine.device),
            torch.tensor([model_window(d, geometry) for d in chosen_defects], device=engine.device),
            torch.tensor([d.class_id for d in chosen_defects], device=engine.device),
            w,
            spec.sampler,
            noise=PerSampleNoise(generators),
            precision=spec.precision,
            record_process=spec.extras.grid and k == 0,
            known=known,
        )
        if k == 0:
            crop, grid = result.crop[:, RGB], _grid(result)
        for j, ok in enumerate(_finite(result.image, result.crop)):
            finite[rows[j]] &= ok
        pixels = result.image.clone()
        if spec.mask.pixels == "crop":
            for j, (x, y) in enumerate(result.windows.tolist()):
                pixels[j, :, y : y + w, x : x + w] = result.crop[j, :3]
        masks = {m: mask_to_image(v, side) for m, v in defect_masks(spec, methods, result, known).items()}
        pixels = to_uint8(to_image(pixels.float(), side))
        for j, (i, d) in enumerate(zip(rows, chosen_defects)):
            (cx, cy), chosen = d.context, masks[spec.mask.method][j]
            region = canvas[i][cy : cy + side, cx : cx + side]
            region[chosen] = pixels[j][chosen]
            for m in methods:
                unions[m][i][cy : cy + side, cx : cx + side] |= masks[m][j]
            box, planned = bounding_box(chosen), planned_defect(d, geometry)
            if d.candidates:
                planned = {**planned, **planned_defect(d.settled(), geometry)}
            defects[i].append({
                **planned,
                "mask_box": None if box is None else [box[0] + cx, box[1] + cy, box[2] + cx, box[3] + cy],
                "mask_area": int(chosen.sum()),
                "final_loss": float(result.final_loss[j]),
                **({"placement": choices[j][1]} if choices[j][1] else {}),
            })
    grey = [spec.backgrounds.items[p.background].grey for p in plans]
    return Batch([as_input_mode(c, g) for c, g in zip(canvas, grey)], unions, defects, finite, crop=crop, grid=grid,
                 input=[as_input_mode(f, g) for f, g in zip(inputs, grey)])


def as_input_mode(frame: np.ndarray, grey: bool) -> np.ndarray:
    """An (H, W, 3) uint8 frame in its input's mode: as is, or for a grey input (H, W) by Pillow's luma
    (integer weights summing to 1: a pixel with three equal channels keeps its value, so outside the masks the
    frame is the decoded input exactly; inside, the generated colour becomes grey)."""
    return np.asarray(Image.fromarray(frame).convert("L")) if grey else frame


def _mask_image(mask: torch.Tensor | np.ndarray) -> Image.Image:
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask
    return Image.fromarray(mask.astype(np.uint8) * 255)


DIAGNOSTIC_DIGITS = 4


def diagnostic(value: float) -> float:
    """A float diagnostic (a sampler loss) to DIAGNOSTIC_DIGITS significant digits: its last digits depend on
    the sample's batch-mates (kernel blocking), and the json must not, so that a shard redone with another
    batch_size reproduces its record."""
    return float(f"{value:.{DIAGNOSTIC_DIGITS}g}")


def config_fields(spec: RunSpec, digests: dict[str, str], plan: SamplePlan) -> dict:
    """The json fields a sample takes from the run's config and its seed's plan, none from sampling: what a
    shard found without a record is checked against before it is adopted. On a real background "defects"
    lists the planned part of each defect; the sample's entries add what sampling gives (mask box, area, loss)."""
    fields = {
        "seed": plan.seed,
        "class_name": plan.class_name,
        "class_id": plan.class_id,
        "mask_method": spec.mask.method,
        "image_size": spec.dataset.image_size,
        "dataset": spec.dataset.name,
        "source": spec.dataset.source,
        "schedule": dict(spec.resolved["schedule"]),
        "respacing": spec.respacing,
        "checkpoints": {"model": spec.model.name, **digests},
        "precision": spec.precision,
        "run_identity": spec.identity,
        "window_box": _box(*plan.window, spec.dataset.window_size),
    }
    if spec.dataset.source != "images":
        return fields
    background, geometry = spec.backgrounds.items[plan.background], spec.backgrounds.geometry
    if plan.defects[0].candidates:
        fields.pop("window_box")  # the engine chooses it
    else:
        fields["window_box"] = image_window_box(plan.defects[0], geometry)
    return {
        **fields,
        "width": background.size[0],
        "height": background.size[1],
        "scale": spec.backgrounds.scale,
        "mask_pixels": spec.mask.pixels,
        "defects": [planned_defect(d, geometry) for d in plan.defects],
        "defects_requested": spec.dataset.defects_per_image,
        "background": {"image": background.name, "sha256": background.sha256, "index": plan.background},
    }


def _metadata(spec: RunSpec, digests: dict[str, str], plan: SamplePlan, defects: list[dict],
              mask: torch.Tensor | np.ndarray) -> dict:
    """The sample's json: the run, the plan, and the mask's box and area (a real image's also lists its
    defects and background)."""
    meta = {
        "seed": plan.seed,
        **({"attempt": plan.attempt} if plan.attempt else {}),
        **config_fields(spec, digests, plan),
        "dmgr_version": __version__,
        "window_box": defects[0]["window_box"],  # as sampled (config_fields gives the plan's, the same)
        "mask_box": bounding_box(mask),
        "mask_area": int(mask.sum()),
        "final_loss": diagnostic(defects[0]["final_loss"]),
    }
    if spec.dataset.source == "images":
        meta["defects"] = [{**d, "final_loss": diagnostic(d["final_loss"])} for d in defects]
    return meta


def shard_members(spec: RunSpec, digests: dict[str, str], plans: list[SamplePlan], batch: Batch) -> list[dict]:
    """Per plan: {"seed", "finite", + every member of `spec.extras.members(spec.available_masks)`}, the
    images as PIL images (uint8, guided-diffusion's conversion), the masks as 0/255 L images, json a dict."""
    names = spec.extras.members(spec.available_masks)
    masks = {"mask.png": batch.masks[spec.mask.method], "paste_mask.png": batch.paste_mask,
             **{f"mask_{method}.png": mask for method, mask in batch.masks.items()}}
    pictures = {"png": batch.image, "crop.png": batch.crop, "twin.png": batch.twin, "grid.png": batch.grid,
                "input.png": batch.input, "paste.png": batch.paste}
    pictures = {name: x if isinstance(x, (np.ndarray, list)) else to_uint8(x)
                for name, x in pictures.items() if name in names}
    samples = []
    for i, plan in enumerate(plans):
        sample = {"seed": plan.seed, "finite": batch.finite[i]}
        if batch.input is not None:
            sample[GIVEN] = batch.input[i]  # the decoded input frame, for the screen; never written
        for name in names:
            if name == "json":
                sample[name] = _metadata(spec, digests, plan, batch.defects[i], masks["mask.png"][i])
            elif name in pictures:
                sample[name] = Image.fromarray(pictures[name][i])
            else:
                sample[name] = _mask_image(masks[name][i])
        samples.append(sample)
    return samples
