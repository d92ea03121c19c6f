"""Where a sample is made: the models loaded for the job, and a batch of seed plans sampled into typed
`Attempt`s (the image, its masks, each defect's result). Deciding about an attempt is dmgr.synth.policy's
job, writing it dmgr.synth.record's."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from dmgr.diffusion import Diffusion, make_diffusion
from dmgr.images import bounding_box, from_uint8, to_uint8
from dmgr.models import UNetModel, build_unet, file_digest, load_unet
from dmgr.models.performance import accelerate
from dmgr.sampler import RGB, DMGRResult, PerSampleNoise, ddim_sample, dmgr_sample, initial_noise, make_generators
from dmgr.sampler.masks import diff_mask, gate_mask, local_mask
from dmgr.sampler.settings import DMGRSettings
from dmgr.synth.backgrounds import Backgrounds
from dmgr.synth.config import (
    DatasetSettings,
    Extras,
    MaskSettings,
    NetworkSpec,
    RunSpec,
    screen_classifier_settings,
)
from dmgr.synth.geometry import image_window_box, mask_to_image, square, to_image, to_model
from dmgr.synth.paste import paste_baseline
from dmgr.synth.placement import Placement, choose_placement
from dmgr.synth.plan import Defect, SamplePlan, model_window, stream_seed
from dmgr.synth.screen_classifier import load_screen_classifier

__all__ = ["Attempt", "DefectResult", "Engine", "MakeSettings", "load_engine", "make_attempts", "make_settings",
           "mask_to_image", "to_image", "to_model"]

log = logging.getLogger(__name__)


@dataclass
class Engine:
    global_model: UNetModel
    local_model: UNetModel
    diffusion: Diffusion
    digests: dict[str, str]
    device: torch.device
    screen: object | None = None  # dmgr.synth.screen_classifier.ScreenClassifier when screen.enabled


@dataclass(frozen=True)
class DefectResult:
    """One defect of an attempt as made: its plan at the window it was made in, that window and its own mask's
    box in image pixels (None: empty), the mask's area, the sampler's final loss, and the placement choice."""

    defect: Defect
    window_box: list[int]
    mask_box: list[int] | None
    mask_area: int
    final_loss: float
    placement: Placement | None = None


@dataclass
class Attempt:
    """One making of one seed's plan. Images are uint8 (H, W, 3), or (H, W) for a grey input; masks (H, W)
    bool. `mask` is the run's (mask.method); `masks` every method made, by method; `pictures` the optional
    images the run writes ("crop", "twin", "grid", "paste"); `given` the decoded input frame (real images)."""

    plan: SamplePlan
    image: np.ndarray
    mask: np.ndarray
    defects: list[DefectResult]
    finite: bool  # no NaN/Inf in the sample's image or crop
    given: np.ndarray | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    pictures: dict[str, np.ndarray] = field(default_factory=dict)
    paste_mask: np.ndarray | None = None


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
    diffusion = make_diffusion(spec.model.diffusion_steps, spec.model.beta_schedule, spec.schedule.respacing)
    digests = {"global": global_digest, "local": local_digest}
    return Engine(global_model, local_model, diffusion, digests, device, load_screen(spec))


def load_screen(spec: RunSpec) -> object | None:
    """The screen classifier (trained on first use, then from screen.cache_dir), or None without the screen."""
    if not spec.screen.enabled:
        return None
    settings = screen_classifier_settings(spec.screen, spec.dataset)
    screen = load_screen_classifier(spec.screen.data_root, spec.dataset.classes, spec.backgrounds, settings,
                                    spec.screen.cache_dir, spec.screen.data_digest, progress=spec.progress)
    held = screen.held_out_fidelity
    threshold = spec.screen.thresholds(held)["min_fidelity"]
    if threshold < spec.screen.min_fidelity:
        log.warning("screen: its classifier reads the user's %d held-out defects at a median %.3f of their class, so "
                    "the class check rejects below %.4f, not screen.min_fidelity=%g (the %g quantile of those; "
                    "more real defects per class make the check stricter; screen.fidelity_quantile=null keeps %g)",
                    len(held), statistics.median(held), threshold, spec.screen.min_fidelity,
                    spec.screen.fidelity_quantile, spec.screen.min_fidelity)
    return screen


@dataclass(frozen=True)
class MakeSettings:
    """The sections of the run that making a batch reads, and nothing else."""

    dataset: DatasetSettings  # sizes, classes, source, the placement's noise levels
    schedule: DMGRSettings  # the sampler's numbers (the gate radius too)
    mask: MaskSettings  # the run's mask (mask.method) and how its pixels go back
    methods: tuple[str, ...]  # the mask methods made: the run's, or every available one with extras.masks
    extras: Extras
    precision: str
    backgrounds: Backgrounds | None  # source=images: the frames


def make_settings(spec: RunSpec) -> MakeSettings:
    methods = spec.available_masks if spec.extras.masks else (spec.mask.method,)
    return MakeSettings(spec.dataset, spec.schedule.settings, spec.mask, methods, spec.extras, spec.precision,
                        spec.backgrounds)


def make_attempts(engine: Engine, how: MakeSettings, plans: list[SamplePlan]) -> list[Attempt]:
    """One batch of plans sampled together, one `Attempt` per plan in order."""
    if how.dataset.source == "images":
        return sample_into_backgrounds(engine, how, plans)
    return sample_boards(engine, how, plans)


def _sample(engine: Engine, how: MakeSettings, x_T: torch.Tensor, windows: torch.Tensor, classes: list[int],
            generators: list[torch.Generator], record_process: bool, known: torch.Tensor | None = None
            ) -> DMGRResult:
    """The DMGR sampler with the run's models and schedule: windows (B, 2) model pixels, noise per sample."""
    return dmgr_sample(engine.global_model, engine.local_model, engine.diffusion, x_T, windows,
                       torch.tensor(classes, device=engine.device), how.dataset.window_size, how.schedule,
                       noise=PerSampleNoise(generators), precision=how.precision, record_process=record_process,
                       known=known)


def defect_masks(mask: MaskSettings, gate_radius: float, methods: tuple[str, ...], result: DMGRResult,
                 reference: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """(B, H, W) bool masks of a sampler result by method; `reference` is what `diff` compares with
    (the defect-free twin, or the real background)."""
    size, w = result.image.shape[-1], result.crop.shape[-1]

    def made(method: str) -> torch.Tensor:
        if method == "local":
            return local_mask(result.crop, result.windows, size, size, mask.local_sigma)
        if method == "diff":
            return diff_mask(result.image, reference, result.windows, w, mask.sigma, mask.min_contrast)
        return gate_mask(size, size, result.windows, w, gate_radius, result.gate_falloff)

    return {method: made(method)[:, 0] for method in methods}


def _finite(*tensors: torch.Tensor) -> list[bool]:
    """Per sample: every value of every tensor is finite (NaN/Inf never reach a shard)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t).flatten(1).all(1)
    return ok.tolist()


def _grid(result: DMGRResult) -> torch.Tensor | None:
    """The recorded x0 predictions side by side, or None when none were recorded."""
    return torch.cat([x0 for _, x0 in result.x0_process], dim=3) if result.x0_process else None


def sample_boards(engine: Engine, how: MakeSettings, plans: list[SamplePlan]) -> list[Attempt]:
    """The whole-board path (dataset.source=generate): the global model makes the board, DMGR the defect;
    the defect-free twin (plain DDIM from the same x_T) when a diff mask, the twin or the paste needs it."""
    size, w, extras = how.dataset.image_size, how.dataset.window_size, how.extras
    generators = make_generators([p.noise_seed for p in plans])
    x_T = initial_noise(generators, (3, size, size), engine.device)
    windows = torch.tensor([p.window for p in plans], device=engine.device)
    result = _sample(engine, how, x_T, windows, [p.class_id for p in plans], generators, extras.grid)
    twin = None
    if "diff" in how.methods or extras.twin or extras.paste:
        twin = ddim_sample(engine.global_model, engine.diffusion, x_T, precision=how.precision)
    made = defect_masks(how.mask, how.schedule.gate_radius, how.methods, result, twin)
    masks = {m: v.cpu().numpy() for m, v in made.items()}
    tensors = {"crop": result.crop[:, RGB] if extras.crop else None, "twin": twin if extras.twin else None,
               "grid": _grid(result) if extras.grid else None}
    paste_mask = None
    if extras.paste:  # evaluation only
        tensors["paste"], paste = paste_baseline(engine.local_model, engine.diffusion, plans, twin, windows, w,
                                                 how.mask, how.precision)
        paste_mask = paste.cpu().numpy()
    pictures = {name: to_uint8(t) for name, t in tensors.items() if t is not None}
    images, finite = to_uint8(result.image), _finite(result.image, result.crop)
    attempts = []
    for i, plan in enumerate(plans):
        mask = masks[how.mask.method][i]
        defect = DefectResult(plan.defects[0], square(*plan.window, w), bounding_box(mask), int(mask.sum()),
                              float(result.final_loss[i]))
        attempts.append(Attempt(plan, images[i], mask, [defect], finite[i],
                                masks={m: v[i] for m, v in masks.items()},
                                pictures={name: p[i] for name, p in pictures.items()},
                                paste_mask=None if paste_mask is None else paste_mask[i]))
    return attempts


def sample_into_backgrounds(engine: Engine, how: MakeSettings, plans: list[SamplePlan]) -> list[Attempt]:
    """DMGR into real backgrounds at their own size: each frame is decoded once; defect k of every plan is
    made in one sampler call on its context crop (resized to image_size when scale != 1; defect k > 0 draws
    its noise from stream_seed(seed, "defect", k)) with the crop known outside the window, into the result
    of defects < k. Only the pixels inside the defect mask go back into the frame, so everything outside
    the masks is the input, byte for byte. The masks are the union over the defects; crop and grid are
    defect 0's."""
    size, w = how.dataset.image_size, how.dataset.window_size
    geometry, side = how.backgrounds.geometry, how.backgrounds.geometry.crop
    inputs = [how.backgrounds.image(p.background) for p in plans]
    canvas = [frame.copy() for frame in inputs]
    unions = {m: [np.zeros(frame.shape[:2], dtype=bool) for frame in inputs] for m in how.methods}
    defects: list[list[DefectResult]] = [[] for _ in plans]
    finite = [True] * len(plans)
    pictures: dict[str, np.ndarray] = {}
    for k in range(max(len(p.defects) for p in plans)):
        rows = [i for i, p in enumerate(plans) if len(p.defects) > k]
        choices = [choose_placement(engine.local_model, engine.diffusion, geometry, len(how.dataset.classes),
                                    how.dataset.placement.noise_levels, how.precision, canvas[i], plans[i], k,
                                    plans[i].defects[k], engine.device) for i in rows]
        chosen_defects = [d for d, _ in choices]
        generators = make_generators([plans[i].noise_seed if k == 0 else stream_seed(plans[i].noise_seed, "defect", k)
                                      for i in rows])
        crops = np.stack([canvas[i][d.context[1] : d.context[1] + side, d.context[0] : d.context[0] + side]
                          for i, d in zip(rows, chosen_defects)])
        known = to_model(from_uint8(crops), size).to(engine.device)
        result = _sample(engine, how, initial_noise(generators, (3, size, size), engine.device),
                         torch.tensor([model_window(d, geometry) for d in chosen_defects], device=engine.device),
                         [d.class_id for d in chosen_defects], generators, how.extras.grid and k == 0, known)
        if k == 0:
            tensors = {"crop": result.crop[:, RGB] if how.extras.crop else None,
                       "grid": _grid(result) if how.extras.grid else None}
            pictures = {name: to_uint8(t) for name, t in tensors.items() if t is not None}
        for j, ok in enumerate(_finite(result.image, result.crop)):
            finite[rows[j]] &= ok
        pixels = result.image.clone()
        if how.mask.pixels == "crop":
            for j, (x, y) in enumerate(result.windows.tolist()):
                pixels[j, :, y : y + w, x : x + w] = result.crop[j, :3]
        made = defect_masks(how.mask, how.schedule.gate_radius, how.methods, result, known)
        masks = {m: mask_to_image(v, side) for m, v in made.items()}
        pixels = to_uint8(to_image(pixels.float(), side))
        for j, (i, d) in enumerate(zip(rows, chosen_defects)):
            (cx, cy), chosen = d.context, masks[how.mask.method][j]
            region = canvas[i][cy : cy + side, cx : cx + side]
            region[chosen] = pixels[j][chosen]
            for m in how.methods:
                unions[m][i][cy : cy + side, cx : cx + side] |= masks[m][j]
            box = bounding_box(chosen)
            defects[i].append(DefectResult(
                d, image_window_box(d, geometry),
                None if box is None else [box[0] + cx, box[1] + cy, box[2] + cx, box[3] + cy],
                int(chosen.sum()), float(result.final_loss[j]), choices[j][1]))
    attempts = []
    for i, plan in enumerate(plans):
        grey = how.backgrounds.items[plan.background].grey
        given = as_input_mode(inputs[i], grey)
        attempts.append(Attempt(plan, as_input_mode(canvas[i], grey), unions[how.mask.method][i], defects[i],
                                finite[i], given=given, masks={m: v[i] for m, v in unions.items()},
                                pictures={name: p[i] for name, p in pictures.items()}))
    return attempts


def as_input_mode(frame: np.ndarray, grey: bool) -> np.ndarray:
    """An (H, W, 3) uint8 frame in its input's mode: as is, or for a grey input (H, W) by Pillow's luma
    (integer weights summing to 1: a pixel with three equal channels keeps its value, so outside the masks the
    frame is the decoded input exactly; inside, the generated colour becomes grey)."""
    return np.asarray(Image.fromarray(frame).convert("L")) if grey else frame
