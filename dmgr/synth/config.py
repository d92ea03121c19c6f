"""Validate the composed Hydra config once, before any model is loaded.

Every problem is a `ConfigError` with one line: the key, the value, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dmgr import EVAL_CACHE, GATE_CACHE, PROJECT_ROOT
from dmgr.models.acceleration import COMPILE_MODES, Acceleration
from dmgr.models.precision import PRECISIONS
from dmgr.models.unet import ATTENTION_KERNELS
from dmgr.sampler.masks import MASK_METHODS
from dmgr.sampler.settings import DMGRSettings
from dmgr.synth.backgrounds import BackgroundError, Backgrounds, scan_backgrounds

CLASS_CHOICES = ("uniform", "fixed", "weighted")
SOURCES = ("images", "generate")
PIXEL_SOURCES = ("crop", "global")
WINDOW_CHOICES = ("uniform", "fixed")
NONFINITE_ACTIONS = ("retry", "stop")
EXHAUSTED_ACTIONS = ("flag", "skip")
# Keys that change how a run is executed but not what it produces: left out of the run's identity.
EXECUTION_KEYS = ("out_dir", "device", "batch_size", "progress", "writer_queue", "array", "quality", "threads")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The settings the job knows, by section; anything else (a typo, a `+key=value`) is refused.
TOP_LEVEL_KEYS = {
    "dataset", "model", "schedule", "seeds", "samples_per_shard", "batch_size", "out_dir", "device", "precision",
    "shard_prefix", "mask", "extras", "quality", "array", "writer_queue", "progress", "threads", "nonfinite",
    "gate", "performance",
}
SECTION_KEYS = {
    "mask": {"method", "pixels", "sigma", "min_contrast"},
    "extras": {"input", "crop", "twin", "grid", "masks", "paste"},
    "quality": {"enabled", "classifier_steps", "classifier_boards", "cache_dir"},
    "array": {"task_id", "task_count"},
    "nonfinite": {"action", "max_attempts"},
    "gate": {"enabled", "data_root", "max_attempts", "on_exhausted", "min_fidelity", "area_quantile",
             "max_mask_outside", "max_changed_outside", "max_seam", "classifier_steps", "cache_dir"},
    "performance": {"compile", "channels_last", "attention"},
    "model": {"name", "random_init", "diffusion_steps", "beta_schedule", "global", "local"},
    "model.global": {"checkpoint", "config"},
    "model.local": {"checkpoint", "config"},
}


class ConfigError(ValueError):
    pass


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r}: {allowed}")


def parse_seeds(value: Any) -> Sequence[int]:
    """`"0-9999"` (inclusive; kept as a `range`, however long), a single int, or a list of ints; never
    empty, never negative, never repeated."""
    usage = 'use a range like "0-9999", one seed, or a list [1, 2, 3]'
    if isinstance(value, int) and not isinstance(value, bool):
        seeds: Sequence[int] = range(value, value + 1)
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "-" in text[1:]:
                first, last = (int(part) for part in text.split("-", 1))
                seeds = range(first, last + 1)
            else:
                seeds = range(int(text), int(text) + 1)
        except ValueError:
            fail("seeds", value, usage)
    elif isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        try:
            seeds = [int(v) for v in value]
        except (TypeError, ValueError):
            fail("seeds", value, "a list must hold integers")
        if len(set(seeds)) != len(seeds):
            fail("seeds", value, "seeds must not repeat")
    else:
        fail("seeds", value, usage)
    if not seeds:
        fail("seeds", value, "the seed range is empty: the last seed must not be below the first")
    if (seeds.start if isinstance(seeds, range) else min(seeds)) < 0:  # min() would walk a range
        fail("seeds", value, "seeds must be >= 0")
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
    digest: str | None = None  # sha256 of the checkpoint file
    classes: tuple[str, ...] | None = None  # the class names a project checkpoint stores


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
    cache_dir: Path = EVAL_CACHE


@dataclass(frozen=True)
class NonfiniteSpec:
    """A sample whose image holds NaN/Inf never reaches a shard: retry its noise from a derived seed
    (dmgr.synth.plan.retry_seed) up to `max_attempts` times, or stop the run naming the seed."""

    action: str = "retry"
    max_attempts: int = 3


@dataclass(frozen=True)
class GateSpec:
    """Score every sample, regenerate the rejected ones from the next attempt's derived noise (README
    "Quality gate"). Only for dataset.source=images."""

    enabled: bool = False
    data_root: Path | None = None  # DATA_ROOT/local/<class>/ holds the local model's training patches + masks
    max_attempts: int = 4
    on_exhausted: str = "flag"  # flag: write the last attempt marked as rejected | skip: leave the seed out
    min_fidelity: float = 0.5
    area_quantile: float = 0.01
    max_mask_outside: int = 0
    max_changed_outside: int = 0
    max_seam: float = 4.0
    classifier_steps: int = 800
    cache_dir: Path = GATE_CACHE
    data_digest: str | None = None  # of the training patches and masks (part of the run's identity)

    def thresholds(self) -> dict:
        return {"min_fidelity": self.min_fidelity, "max_mask_outside": self.max_mask_outside,
                "max_changed_outside": self.max_changed_outside, "max_seam": self.max_seam}


@dataclass(frozen=True)
class Extras:
    """The optional members of each sample (conf/synth.yaml `extras`)."""

    input: bool = False  # <key>.input.png: the background exactly as the model saw it (source=images)
    crop: bool = False  # <key>.crop.png: the final local crop
    twin: bool = False  # <key>.twin.png: the defect-free twin (source=generate)
    grid: bool = False  # <key>.grid.png: x0 predictions every schedule.record_every indices
    masks: bool = False  # <key>.mask_<method>.png for every mask method the run can make
    paste: bool = False  # <key>.paste.png + paste_mask.png: the no-rectification baseline (source=generate)

    def members(self, mask_methods: Sequence[str]) -> tuple[str, ...]:
        """What every sample of the run holds: the one list the engine writes and the resume check expects."""
        extra = [f"{name}.png" for name in ("crop", "twin", "grid", "input") if getattr(self, name)]
        if self.masks:
            extra += [f"mask_{method}.png" for method in mask_methods]
        if self.paste:
            extra += ["paste.png", "paste_mask.png"]
        return ("png", "mask.png", "json", *extra)


@dataclass(frozen=True)
class RunSpec:
    seeds: Sequence[int]  # a range for "a-b", however long
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
    extras: Extras
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
    threads: int | None = None  # intra-op threads per worker; None: from the CPUs the worker was given
    nonfinite: NonfiniteSpec = NonfiniteSpec()
    checkpoint_digests: dict | None = None  # sha256 of each checkpoint file (part of the identity)
    gate: GateSpec = GateSpec()
    acceleration: Acceleration = Acceleration()

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
    from dmgr.models import CheckpointError, file_digest, stored_metadata

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
    try:
        stored, meta = stored_metadata(path)
    except CheckpointError as exc:
        fail(f"model.{which}.checkpoint", str(checkpoint), str(exc))
    if config is None:
        if stored is None:
            fail(f"model.{which}.config", None, f"{path.name} stores no architecture: give model.{which}.config")
        config = stored.to_dict()
    classes = tuple(json.loads(meta["dmgr.classes"])) if "dmgr.classes" in meta else None
    return NetworkSpec(str(path), config, file_digest(path), classes)


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


def _identity(resolved: dict, model: ModelSpec, images_digest: str | None) -> str:
    """A hash of what determines the samples: the settings, the checkpoints' contents (not their paths)
    and the background list's digest (not its path)."""
    kept = {k: v for k, v in resolved.items() if k not in EXECUTION_KEYS}
    gate = kept.pop("gate", None)
    if gate and gate.get("enabled"):  # a run without the gate keeps the identity it had before the gate existed
        kept["gate"] = {k: v for k, v in gate.items() if k not in ("data_root", "cache_dir")}
    performance = kept.pop("performance", None)
    if performance and performance != dataclasses.asdict(Acceleration()):
        kept["performance"] = performance  # the defaults keep the identity runs had before the setting existed
    kept["model"] = {**kept["model"]}
    for which, net in (("global", model.global_net), ("local", model.local_net)):
        kept["model"][which] = {**kept["model"][which], "checkpoint": net.digest}
    if images_digest is not None:
        kept["dataset"] = {**kept["dataset"], "images": images_digest}
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
        Path(str(q.get("cache_dir", EVAL_CACHE))).expanduser(),
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
    """Fail unless `directory` could be created and written, without creating it: nothing is claimed on
    disk before every check has passed."""
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        fail("out_dir", str(directory), f"{existing} is a file: choose a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".dmgr-write-test-"):
            pass
    except OSError as exc:
        fail("out_dir", str(directory), f"cannot write there ({exc.strerror or exc}): choose a writable directory")


def _unknown_keys(cfg: DictConfig) -> None:
    for key in cfg:
        if key not in TOP_LEVEL_KEYS and key != "hydra":
            fail(str(key), cfg[key], f"unknown setting (a typo?); known: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    for section, known in SECTION_KEYS.items():
        node = OmegaConf.select(cfg, section)
        for key in node or {}:
            if key not in known:
                fail(f"{section}.{key}", node[key], f"unknown setting; known: {', '.join(sorted(known))}")
    dataset_keys = {f.name for f in fields(DatasetSpec)}
    for key in cfg.get("dataset") or {}:
        if key not in dataset_keys:
            fail(f"dataset.{key}", cfg.dataset[key], f"unknown setting; known: {', '.join(sorted(dataset_keys))}")


def _device(value: Any) -> str:
    import torch

    device = str(value)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        fail("device", device, "allowed: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            fail("device", device, "no CUDA device is visible here: use device=cpu or device=auto")
        if device.startswith("cuda:") and int(device[5:]) >= count:
            fail("device", device, f"this machine shows {count} CUDA device(s): use cuda:0..cuda:{count - 1}")
    return device


def _threads(cfg: DictConfig) -> int | None:
    value = cfg.get("threads")
    if value in (None, "auto"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail("threads", value, "intra-op threads per worker: an integer >= 1, or auto (from the CPUs given)")
    return value


def _nonfinite(cfg: DictConfig) -> NonfiniteSpec:
    n = cfg.get("nonfinite")
    if n is None:
        return NonfiniteSpec()
    action = str(n.get("action", "retry"))
    if action not in NONFINITE_ACTIONS:
        fail("nonfinite.action", action, f"allowed: {', '.join(NONFINITE_ACTIONS)}")
    return NonfiniteSpec(action, _positive_int(cfg, "nonfinite.max_attempts") if "max_attempts" in n else 3)


def _acceleration(cfg: DictConfig) -> Acceleration:
    p = cfg.get("performance") or {}
    compile_mode = "off" if p.get("compile") in (None, False) else str(p.get("compile"))
    if compile_mode not in COMPILE_MODES:
        fail("performance.compile", p.get("compile"), f"allowed: {', '.join(COMPILE_MODES)}")
    channels_last = p.get("channels_last", False)
    if not isinstance(channels_last, bool):
        fail("performance.channels_last", channels_last, "true or false")
    attention = str(p.get("attention", "auto"))
    if attention not in ATTENTION_KERNELS:
        fail("performance.attention", attention, f"allowed: {', '.join(ATTENTION_KERNELS)}")
    return Acceleration(compile_mode, channels_last, attention)


def _number(cfg: DictConfig, key: str, low: float, high: float) -> float:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        fail(key, value, f"a number in [{low}, {high}]")
    return float(value)


def _gate(cfg: DictConfig, dataset: DatasetSpec) -> GateSpec:
    """The gate's settings; when enabled, the training data is found and digested here (the digest joins the
    run's identity, written to resolved gate.data_digest)."""
    g = cfg.get("gate")
    if g is None or not g.get("enabled", False):
        if g is not None and not isinstance(g.get("enabled", False), bool):
            fail("gate.enabled", g.enabled, "must be true or false")
        return GateSpec()
    if not isinstance(g.enabled, bool):
        fail("gate.enabled", g.enabled, "must be true or false")
    if dataset.source != "images":
        fail("gate.enabled", True, "the quality gate needs dataset.source=images (real defect-free images)")
    on_exhausted = str(g.get("on_exhausted", "flag"))
    if on_exhausted not in EXHAUSTED_ACTIONS:
        fail("gate.on_exhausted", on_exhausted, f"allowed: {', '.join(EXHAUSTED_ACTIONS)}")
    root = _find_path(str(g.get("data_root"))) if g.get("data_root") not in (None, "") else None
    if root is None or not (root / "local").is_dir():
        fail("gate.data_root", g.get("data_root"), "a data root with local/<class>/ training patches and their "
             "masks (the demo's: `make data` writes outputs/pcb-data)")
    from dmgr.eval.user_classifier import data_digest  # local import keeps config import light

    try:
        digest = data_digest(root, dataset.classes)
    except FileNotFoundError as exc:
        fail("gate.data_root", str(root), str(exc))
    return GateSpec(
        True,
        root,
        _positive_int(cfg, "gate.max_attempts"),
        on_exhausted,
        _number(cfg, "gate.min_fidelity", 0, 1),
        _number(cfg, "gate.area_quantile", 0, 0.5),
        _positive_int(cfg, "gate.max_mask_outside", 0),
        _positive_int(cfg, "gate.max_changed_outside", 0),
        _number(cfg, "gate.max_seam", -1e9, 1e9),
        _positive_int(cfg, "gate.classifier_steps"),
        Path(str(g.get("cache_dir", GATE_CACHE))).expanduser(),
        digest,
    )


def validate(cfg: DictConfig) -> RunSpec:
    """Check every setting and return the typed run spec. Reads the disk (and writes nothing): the
    checkpoints' stored architecture, class names and sha256, the background images (source=images), the
    gate's data when it is on, and whether out_dir (or its nearest existing parent) is writable. The
    checkpoints' weights load later, in `load_engine`, still before out_dir is created."""
    for key in ("dataset", "model", "schedule"):
        if key not in cfg:
            fail(key, None, f"missing config group: add {key}=<name> (see conf/{key}/)")
    _unknown_keys(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    seeds = parse_seeds(cfg.seeds)
    samples_per_shard = _positive_int(cfg, "samples_per_shard")
    batch_size = _positive_int(cfg, "batch_size")
    dataset = _dataset(cfg)
    if cfg.precision not in PRECISIONS:
        fail("precision", cfg.precision, f"allowed: {', '.join(PRECISIONS)}")
    device = _device(cfg.device)
    shard_prefix = str(cfg.shard_prefix)
    if not NAME_PATTERN.fullmatch(shard_prefix):
        fail("shard_prefix", shard_prefix, "a plain file-name prefix: letters, digits, '.', '_', '-' (no '/')")
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
    stored_classes = model.local_net.classes
    if stored_classes is not None and tuple(dataset.classes) != stored_classes:
        fail(
            "dataset.classes",
            list(dataset.classes),
            f"the local checkpoint was trained on {list(stored_classes)} (class ids are positions): "
            "give the same names in the same order",
        )
    from dmgr.diffusion import space_timesteps  # local import keeps config import light

    respacing = str(cfg.schedule.respacing)
    try:
        steps = len(space_timesteps(diffusion_steps, respacing))
    except ValueError as exc:
        detail = str(exc) if "invalid literal" not in str(exc) else "not a step count"
        fail(
            "schedule.respacing",
            respacing,
            f"{detail}: use a step count like 50, section counts like 10,10,5, or ddimN",
        )
    sampler = sampler_settings(cfg, dataset.window_size)
    if sampler.T_s >= steps:
        fail("schedule.T_s", sampler.T_s, f"must be below the number of respaced steps ({steps})")
    mask_method = _mask_method(str(cfg.mask.method), dataset, model)
    given = dict(resolved.get("extras", {}))
    for name, value in given.items():
        if not isinstance(value, bool):
            fail(f"extras.{name}", value, "true or false")
    extras = Extras(**given)
    for name in ("twin", "paste") if dataset.source == "images" else ("input",):
        if getattr(extras, name):
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
    gate = _gate(cfg, dataset)
    if gate.enabled:
        resolved["gate"]["data_root"] = str(gate.data_root)
        resolved["gate"]["data_digest"] = gate.data_digest
    acceleration = _acceleration(cfg)
    resolved["performance"] = dataclasses.asdict(acceleration)
    identity = _identity(resolved, model, backgrounds.digest if backgrounds is not None else None)
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
        shard_prefix=shard_prefix,
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
        threads=_threads(cfg),
        nonfinite=_nonfinite(cfg),
        gate=gate,
        acceleration=acceleration,
    )
