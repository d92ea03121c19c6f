"""Validate the composed Hydra config once, before any model is loaded.

Every problem is a `ConfigError` with one line: the key, the value, and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dmgr.sampler.masks import MASK_METHODS
from dmgr.sampler.settings import DMGRSettings
from dmgr.synth.backgrounds import BackgroundError, Backgrounds, scan_backgrounds

PRECISIONS = ("fp32", "bf16", "fp16")
CLASS_CHOICES = ("uniform", "fixed", "weighted")
SOURCES = ("images", "generate")
PIXEL_SOURCES = ("crop", "global")
WINDOW_CHOICES = ("uniform", "fixed")
# Keys that change how a run is executed but not what it produces: left out of the run's identity.
EXECUTION_KEYS = ("out_dir", "device", "batch_size", "progress", "writer_queue", "array", "quality")


class ConfigError(ValueError):
    pass


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r}: {allowed}")


def parse_seeds(value: Any) -> list[int]:
    """`"0-9999"` (inclusive), a single int, or a list of ints; never empty, never negative."""
    if isinstance(value, int) and not isinstance(value, bool):
        seeds = [value]
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "-" in text[1:]:
                first, last = (int(part) for part in text.split("-", 1))
                seeds = list(range(first, last + 1))
            else:
                seeds = [int(text)]
        except ValueError:
            fail("seeds", value, 'use a range like "0-9999", one seed, or a list [1, 2, 3]')
    elif isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        try:
            seeds = [int(v) for v in value]
        except (TypeError, ValueError):
            fail("seeds", value, "a list must hold integers")
    else:
        fail("seeds", value, 'use a range like "0-9999", one seed, or a list [1, 2, 3]')
    if not seeds:
        fail("seeds", value, "the seed range is empty: the last seed must not be below the first")
    if min(seeds) < 0:
        fail("seeds", value, "seeds must be >= 0")
    if len(set(seeds)) != len(seeds):
        fail("seeds", value, "seeds must not repeat")
    return seeds


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    image_size: int
    window_size: int
    margin: int
    classes: tuple[str, ...]
    class_choice: str
    fixed_class: str | None
    class_weights: tuple[float, ...] | None
    window_choice: str
    fixed_window: tuple[int, int] | None
    source: str = "generate"  # images: defects into the user's real images; generate: whole boards
    images: Path | None = None  # source=images: a folder or a JSONL manifest
    defects_per_image: int = 1


@dataclass(frozen=True)
class NetworkSpec:
    checkpoint: str | None
    config: dict | None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    random_init: bool
    diffusion_steps: int
    beta_schedule: str
    global_net: NetworkSpec
    local_net: NetworkSpec


@dataclass(frozen=True)
class QualitySpec:
    """End the run with the sample metrics (dmgr.eval) and record them in the manifest."""

    enabled: bool = False
    classifier_steps: int = 1500
    classifier_boards: int = 600
    cache_dir: Path = Path("outputs/eval-cache")


@dataclass(frozen=True)
class RunSpec:
    seeds: list[int]
    samples_per_shard: int
    batch_size: int
    out_dir: Path
    device: str
    precision: str
    shard_prefix: str
    mask_method: str
    mask_pixels: str  # source=images: where the pixels inside the mask come from (crop | global)
    mask_sigma: float
    mask_min_contrast: float
    extras: dict
    task_id: int
    task_count: int
    writer_queue: int
    progress: bool
    quality: QualitySpec
    dataset: DatasetSpec
    model: ModelSpec
    schedule_name: str
    respacing: str
    sampler: DMGRSettings
    resolved: dict  # the whole resolved config, for metadata and the manifest
    identity: str  # hash of what determines the samples
    backgrounds: Backgrounds | None = None  # source=images: the usable input list

    @property
    def available_masks(self) -> tuple[str, ...]:
        """The mask methods this run can compute (`local` needs a local model with a mask channel)."""
        has_mask = (self.model.local_net.config or {}).get("in_channels", 3) == 4
        return tuple(m for m in MASK_METHODS if m != "local" or has_mask)


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(key, value, f"must be an integer >= {minimum}")
    return value


def _dataset(cfg: DictConfig) -> DatasetSpec:
    d = cfg.dataset
    size = _positive_int(cfg, "dataset.image_size", 8)
    window = _positive_int(cfg, "dataset.window_size", 4)
    margin = _positive_int(cfg, "dataset.margin", 0)
    if window + 2 * margin >= size:
        fail("dataset.window_size", window, f"window plus 2 x margin ({margin}) must fit inside image_size {size}")
    classes = tuple(str(c) for c in d.classes)
    if not classes or len(set(classes)) != len(classes):
        fail("dataset.classes", list(classes), "give a non-empty list of distinct class names")
    if d.class_choice not in CLASS_CHOICES:
        fail("dataset.class_choice", d.class_choice, f"allowed: {', '.join(CLASS_CHOICES)}")
    if d.class_choice == "fixed" and d.fixed_class not in classes:
        fail("dataset.fixed_class", d.fixed_class, f"unknown class; allowed: {', '.join(classes)}")
    weights = None
    if d.class_choice == "weighted":
        weights = tuple(float(w) for w in (d.class_weights or []))
        if len(weights) != len(classes) or min(weights) < 0 or sum(weights) <= 0:
            fail("dataset.class_weights", d.class_weights, f"give {len(classes)} non-negative weights, not all zero")
    if d.window_choice not in WINDOW_CHOICES:
        fail("dataset.window_choice", d.window_choice, f"allowed: {', '.join(WINDOW_CHOICES)}")
    fixed_window = None
    if d.window_choice == "fixed":
        fw = d.fixed_window
        if fw is None or len(fw) != 2 or not all(isinstance(v, int) for v in fw):
            fail("dataset.fixed_window", fw, "give the window's top-left as [x, y]")
        if min(fw) < 0 or max(fw) + window > size:
            fail("dataset.fixed_window", list(fw), f"the {window} px window must lie inside the {size} px image")
        fixed_window = (int(fw[0]), int(fw[1]))
    source = str(d.get("source", "generate"))
    if source not in SOURCES:
        fail("dataset.source", source, f"allowed: {', '.join(SOURCES)}")
    images = None
    if source == "images":
        if d.get("images") in (None, "", "???"):
            fail("dataset.images", d.get("images"), "source=images needs a folder of images or a .jsonl manifest")
        images = _find_path(str(d.images))
        if images is None:
            fail(
                "dataset.images",
                str(d.images),
                "no such folder or .jsonl manifest (the demo's boards: `make backgrounds`)",
            )
    defects = _positive_int(cfg, "dataset.defects_per_image") if "defects_per_image" in d else 1
    if defects > 1 and (source != "images" or d.window_choice == "fixed"):
        fail("dataset.defects_per_image", defects, "several defects need source=images and window_choice=uniform")
    return DatasetSpec(
        str(d.name),
        size,
        window,
        margin,
        classes,
        str(d.class_choice),
        None if d.fixed_class is None else str(d.fixed_class),
        weights,
        str(d.window_choice),
        fixed_window,
        source,
        images,
        defects,
    )


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _find_path(value: str, kind: str = "any") -> Path | None:
    """A path as given (relative to the working directory), else relative to the project root."""
    exists = Path.is_file if kind == "file" else Path.exists
    path = Path(value).expanduser()
    if exists(path):
        return path.resolve()
    if not path.is_absolute() and exists(PROJECT_ROOT / path):
        return PROJECT_ROOT / path
    return None


def _find_checkpoint(value: str) -> Path | None:
    return _find_path(value, "file")


def _network(cfg: DictConfig, which: str, random_init: bool) -> NetworkSpec:
    from dmgr.models import CheckpointError, stored_config

    net = cfg.model[which]
    checkpoint = net.get("checkpoint")
    config = OmegaConf.to_container(net.config, resolve=True) if net.get("config") is not None else None
    if random_init:
        if config is None:
            fail(f"model.{which}.config", None, "random_init needs an architecture config")
        return NetworkSpec(None, config)
    if checkpoint in (None, "???", ""):
        fail(f"model.{which}.checkpoint", checkpoint, "give the path of a checkpoint file")
    path = _find_checkpoint(str(checkpoint))
    if path is None:
        fail(f"model.{which}.checkpoint", str(checkpoint), "file not found: fix the path or train one (README)")
    if config is None:
        try:
            stored = stored_config(path)
        except CheckpointError as exc:
            fail(f"model.{which}.checkpoint", str(checkpoint), str(exc))
        if stored is None:
            fail(f"model.{which}.config", None, f"{path.name} stores no architecture: give model.{which}.config")
        config = stored.to_dict()
    return NetworkSpec(str(path), config)


def sampler_settings(cfg: DictConfig, window_size: int) -> DMGRSettings:
    """The validated DMGRSettings of `cfg.schedule` for a window of `window_size` px."""
    s = OmegaConf.to_container(cfg.schedule, resolve=True)
    known = {f.name for f in fields(DMGRSettings)}
    unknown = sorted(set(s) - known - {"name", "respacing"})
    if unknown:
        fail(f"schedule.{unknown[0]}", s[unknown[0]], f"unknown schedule setting; known: {', '.join(sorted(known))}")
    values = {k: v for k, v in s.items() if k in known}
    if values.get("gate_radius") is None:
        values["gate_radius"] = 9.0 * window_size / 64.0
    settings = DMGRSettings(**values)
    if settings.T_e >= settings.T_s:
        fail("schedule.T_e", settings.T_e, f"must be smaller than schedule.T_s={settings.T_s}")
    if settings.T_e < 0:
        fail("schedule.T_e", settings.T_e, "must be >= 0")
    for key in ("iterations", "gate_every", "jump_length", "jump_n_sample", "record_every", "pyramid_levels"):
        if getattr(settings, key) < 1:
            fail(f"schedule.{key}", getattr(settings, key), "must be >= 1")
    for key in ("lr_xt", "reg", "eta", "max_backtracks"):
        if getattr(settings, key) < 0:
            fail(f"schedule.{key}", getattr(settings, key), "must be >= 0")
    if not 0 < settings.backtrack < 1:
        fail("schedule.backtrack", settings.backtrack, "must lie strictly between 0 and 1")
    if settings.multiscale_loss and window_size % (2**settings.pyramid_levels):
        fail("schedule.pyramid_levels", settings.pyramid_levels, f"window {window_size} px must divide by 2^levels")
    return settings


def _identity(resolved: dict) -> str:
    kept = {k: v for k, v in resolved.items() if k not in EXECUTION_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _quality(cfg: DictConfig) -> QualitySpec:
    q = cfg.get("quality")
    if q is None:
        return QualitySpec()
    if not isinstance(q.get("enabled", False), bool):
        fail("quality.enabled", q.enabled, "must be true or false")
    return QualitySpec(
        bool(q.get("enabled", False)),
        _positive_int(cfg, "quality.classifier_steps"),
        _positive_int(cfg, "quality.classifier_boards"),
        Path(str(q.get("cache_dir", "outputs/eval-cache"))).expanduser(),
    )


def _mask_method(method: str, dataset: DatasetSpec, model: ModelSpec) -> str:
    """`auto`: the local model's own mask when it generates one, else `diff` (real images) or `gate`."""
    has_mask = (model.local_net.config or {}).get("in_channels", 3) == 4
    if method == "auto":
        return "local" if has_mask else ("diff" if dataset.source == "images" else "gate")
    if method == "local" and not has_mask:
        fail("mask.method", method, "the local model generates no mask channel (in_channels 3): use diff or gate, "
             "or train a mask-generating local model (README: arch=demo_local_mask)")
    return method


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        fail("out_dir", str(directory), f"cannot write there ({exc.strerror or exc}): choose a writable directory")


def validate(cfg: DictConfig) -> RunSpec:
    """Check every setting and return the typed run spec. Reads the disk for the checkpoints' stored
    architecture, to check the background images (source=images) and to test that out_dir is writable."""
    for key in ("dataset", "model", "schedule"):
        if key not in cfg:
            fail(key, None, f"missing config group: add {key}=<name> (see conf/{key}/)")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    seeds = parse_seeds(cfg.seeds)
    samples_per_shard = _positive_int(cfg, "samples_per_shard")
    batch_size = _positive_int(cfg, "batch_size")
    dataset = _dataset(cfg)
    if cfg.precision not in PRECISIONS:
        fail("precision", cfg.precision, f"allowed: {', '.join(PRECISIONS)}")
    device = str(cfg.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        fail("device", device, "allowed: auto, cpu, cuda, cuda:N")
    if cfg.mask.method not in ("auto", *MASK_METHODS):
        fail("mask.method", cfg.mask.method, f"allowed: auto, {', '.join(MASK_METHODS)}")
    mask_pixels = str(cfg.mask.get("pixels", "crop"))
    if mask_pixels not in PIXEL_SOURCES:
        fail("mask.pixels", mask_pixels, f"allowed: {', '.join(PIXEL_SOURCES)}")
    if float(cfg.mask.sigma) < 0 or float(cfg.mask.min_contrast) < 0:
        fail("mask.sigma", cfg.mask.sigma, "mask.sigma and mask.min_contrast must be >= 0")
    task_count = _positive_int(cfg, "array.task_count")
    task_id = _positive_int(cfg, "array.task_id", 0)
    if task_id >= task_count:
        fail("array.task_id", task_id, f"must be below array.task_count={task_count}")
    m = cfg.model
    if m.beta_schedule not in ("linear", "cosine"):
        fail("model.beta_schedule", m.beta_schedule, "allowed: linear, cosine")
    diffusion_steps = _positive_int(cfg, "model.diffusion_steps", 2)
    random_init = bool(m.get("random_init", False))
    model = ModelSpec(
        str(m.name),
        random_init,
        diffusion_steps,
        str(m.beta_schedule),
        _network(cfg, "global", random_init),
        _network(cfg, "local", random_init),
    )
    for which, spec, size in (
        ("global", model.global_net, dataset.image_size),
        ("local", model.local_net, dataset.window_size),
    ):
        if spec.config and spec.config.get("image_size") not in (None, size):
            fail(f"model.{which}.config.image_size", spec.config["image_size"], f"must equal {size} (dataset)")
    local_classes = (model.local_net.config or {}).get("num_classes")
    if model.local_net.config is not None and (local_classes or 0) < len(dataset.classes):
        fail(
            "model.local.config.num_classes",
            local_classes,
            f"the local model must know all {len(dataset.classes)} dataset classes",
        )
    from dmgr.diffusion import space_timesteps  # local import keeps config import light

    respacing = str(cfg.schedule.respacing)
    try:
        steps = len(space_timesteps(diffusion_steps, respacing))
    except ValueError as exc:
        fail("schedule.respacing", respacing, str(exc))
    sampler = sampler_settings(cfg, dataset.window_size)
    if sampler.T_s >= steps:
        fail("schedule.T_s", sampler.T_s, f"must be below the number of respaced steps ({steps})")
    mask_method = _mask_method(str(cfg.mask.method), dataset, model)
    extras = dict(resolved.get("extras", {}))
    for name in ("twin", "paste") if dataset.source == "images" else ("input",):
        if extras.get(name, False):
            other = "generate" if name != "input" else "images"
            fail(f"extras.{name}", True, f"needs dataset.source={other} (on real images extras.input writes the input)")
    resolved.setdefault("mask", {})["method"] = mask_method
    backgrounds = None
    if dataset.source == "images":
        try:
            backgrounds = scan_backgrounds(dataset.images, dataset.image_size, dataset.window_size, dataset.margin)
        except BackgroundError as exc:
            fail("dataset.images", str(dataset.images), str(exc))
        resolved["dataset"]["images"] = str(dataset.images)
        resolved["dataset"]["images_digest"] = backgrounds.digest
    quality = _quality(cfg)
    identity = _identity(resolved)
    if cfg.out_dir:
        out_dir = Path(str(cfg.out_dir)).expanduser()
    else:
        out_dir = Path("outputs") / f"{dataset.name}-{model.name}-{cfg.schedule.name}-{identity}"
    check_writable(out_dir)
    return RunSpec(
        seeds=seeds,
        samples_per_shard=samples_per_shard,
        batch_size=batch_size,
        out_dir=out_dir.resolve(),
        device=device,
        precision=str(cfg.precision),
        shard_prefix=str(cfg.shard_prefix),
        mask_method=mask_method,
        mask_pixels=mask_pixels,
        mask_sigma=float(cfg.mask.sigma),
        mask_min_contrast=float(cfg.mask.min_contrast),
        extras=extras,
        task_id=task_id,
        task_count=task_count,
        writer_queue=_positive_int(cfg, "writer_queue"),
        progress=bool(cfg.progress) and os.environ.get("DMGR_NO_PROGRESS") is None,
        quality=quality,
        dataset=dataset,
        model=model,
        schedule_name=str(cfg.schedule.name),
        respacing=respacing,
        sampler=sampler,
        resolved=resolved,
        identity=identity,
        backgrounds=backgrounds,
    )
