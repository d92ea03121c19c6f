"""The synthesis job's settings: one schema (the dataclasses below; types, allowed values, bounds and
defaults on one line each) and `validate`, which checks a composed Hydra config once, before any model is
loaded, and returns the typed `RunSpec`.

Names: a `*Settings` class is a section the user writes (conf/, overrides); a `*Spec` is what `validate`
resolves from the settings and the files they name (checkpoint headers, backgrounds) for the run.

Every problem is a `ConfigError` with one line: the key, the value, and what is allowed. The defaults seed
Hydra's ConfigStore (`synth_defaults`, `schedule/base`, `dataset/base`, `model/base`), so the
YAML files under conf/ hold only presets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import Field

from dmgr import DEMO_DATA, EVAL_CACHE, PROJECT_ROOT, SCREEN_CACHE
from dmgr.eval.classifier import ClassifierSettings
from dmgr.models.performance import PerformanceSettings
from dmgr.models.precision import PRECISIONS
from dmgr.models.unet import UNetConfig, UNetConfigError
from dmgr.sampler.masks import MASK_METHODS
from dmgr.sampler.noise import MAX_SEED
from dmgr.sampler.settings import DMGRSettings, has_mask_channel
from dmgr.schema import (
    STRICT_SECTION,
    ConfigError,
    Count,
    Flag,
    NonNegative,
    UserPath,
    build,
    defaults_of,
    fail,
    register_defaults,
)
from dmgr.synth.backgrounds import BackgroundError, Backgrounds, demo_backgrounds, demo_patches, scan_backgrounds
from dmgr.synth.screen_classifier import ScreenClassifierSettings

__all__ = ["ConfigError", "RunSpec", "validate", "parse_seeds", "schedule_settings"]

# Keys that change how a run is executed but not what it produces: left out of the run's identity.
EXECUTION_KEYS = ("out_dir", "device", "batch_size", "progress", "writer_queue", "array", "quality", "threads")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MASK_CHOICES = ("auto", *MASK_METHODS)
Fraction = Annotated[float, Field(ge=0, le=1)]
MAX_CANDIDATES = 64  # dataset.placement.candidates: windows scored per defect
MAX_NOISE_LEVELS = 10  # dataset.placement.noise_levels


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
    if (seeds[-1] if isinstance(seeds, range) else max(seeds)) > MAX_SEED:
        fail("seeds", value, f"seeds must be at most 2**63 - 1 = {MAX_SEED}")
    return seeds


@dataclass(frozen=True)
class PlacementSettings:
    """Where each defect goes on a real background, and what happens when its mask comes out empty
    (docs/configuration.md "Placement")."""

    __pydantic_config__ = STRICT_SECTION
    candidates: Count() = 4  # windows per defect, scored by the local model; 1: the first drawn, no scoring.
    #   Real images with uniform windows only: generated boards and a fixed window have one window to take
    noise_levels: Count() = 3  # respaced steps the candidates' class-conditional denoising error is taken at
    min_mask_area: Count(0) = 4  # per defect, mask pixels (image pixels); below: re-placed and made again
    size_quantile: Annotated[float, Field(ge=0, le=0.5)] = 0.05  # with data_root: per class, the minimum is
    #   at least this quantile of the class's real mask areas
    data_root: UserPath | None = None  # local/<class>/*.mask.png: the per-class size prior (null: none)
    max_attempts: Count() = 6  # attempts per seed in all against an empty mask (each a new placement); more
    #   than screen.max_attempts, so a last screened attempt that is empty is made again (dmgr.synth.policy.Rules)
    on_exhausted: Literal["flag", "skip"] = "flag"  # flag: write the last attempt marked | skip: drop the seed
    min_areas: tuple[float, ...] | None = None  # set by validate: per class, the minimum mask area

    def __post_init__(self) -> None:
        if self.candidates > MAX_CANDIDATES:
            fail("dataset.placement.candidates", self.candidates, f"at most {MAX_CANDIDATES} windows per defect "
                 "(each is scored in classes x noise_levels local-model passes, held in memory at once): give "
                 f"{MAX_CANDIDATES} or fewer (4 and 8 are measured in docs/evaluation.md)")
        if self.noise_levels > MAX_NOISE_LEVELS:
            fail("dataset.placement.noise_levels", self.noise_levels, f"at most {MAX_NOISE_LEVELS} (each multiplies "
                 f"the placement's passes and memory): give {MAX_NOISE_LEVELS} or fewer")


@dataclass(frozen=True)
class DatasetSettings:
    """conf/dataset/*.yaml."""

    __pydantic_config__ = STRICT_SECTION
    name: str
    image_size: Count(8)
    window_size: Count(4)
    margin: Count(0)  # window top-left drawn uniformly in [margin, image_size - window_size - margin)
    classes: tuple[str, ...]  # ids are positions
    class_choice: Literal["uniform", "fixed", "weighted"] = "uniform"
    fixed_class: str | None = None  # a class name, for class_choice=fixed
    class_weights: tuple[float, ...] | None = None  # one weight per class, for class_choice=weighted
    window_choice: Literal["uniform", "fixed"] = "uniform"
    fixed_window: tuple[int, int] | None = None  # [x, y] top-left, for window_choice=fixed
    source: Literal["images", "generate"] = "generate"  # images: defects into the user's real images
    images: Path | None = None  # source=images: a folder or a JSONL manifest
    defects_per_image: Count() = 1  # each with its own class, window and mask (source=images)
    scale: float = 1.0  # source=images: model pixels per image pixel; a context crop covers image_size / scale
    placement: PlacementSettings = PlacementSettings()

    def __post_init__(self) -> None:
        size, window, margin = self.image_size, self.window_size, self.margin
        if not self.scale > 0 or self.scale == float("inf"):
            fail("dataset.scale", self.scale, "model pixels per image pixel: a number > 0 (1.0: native pixels)")
        if window + 2 * margin >= size:
            fail("dataset.window_size", window, f"window plus 2 x margin ({margin}) must fit inside image_size {size}")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            fail("dataset.classes", list(self.classes), "give a non-empty list of distinct class names")
        if self.class_choice == "fixed" and self.fixed_class not in self.classes:
            fail("dataset.fixed_class", self.fixed_class, f"unknown class; allowed: {', '.join(self.classes)}")
        weights = self.class_weights or ()
        if self.class_choice == "weighted" and (len(weights) != len(self.classes) or min(weights) < 0
                                                or sum(weights) <= 0):
            fail("dataset.class_weights", self.class_weights,
                 f"give {len(self.classes)} non-negative weights, not all zero")
        if self.window_choice == "fixed":
            if self.fixed_window is None:
                fail("dataset.fixed_window", None, "give the window's top-left as [x, y]")
            if min(self.fixed_window) < 0 or (self.source == "generate" and max(self.fixed_window) + window > size):
                fail("dataset.fixed_window", list(self.fixed_window),
                     f"the {window} px window must lie inside the {size} px image")
        if self.source == "images" and str(self.images or "") in ("", "???"):
            fail("dataset.images", self.images, "source=images needs a folder of images or a .jsonl manifest")
        if self.defects_per_image > 1 and (self.source != "images" or self.window_choice == "fixed"):
            fail("dataset.defects_per_image", self.defects_per_image,
                 "several defects need source=images and window_choice=uniform")


def class_weights(dataset: DatasetSettings) -> list[float]:
    """The chance weight of each class by dataset.class_choice (uniform: equal; fixed: one class)."""
    if dataset.class_choice == "fixed":
        return [float(c == dataset.fixed_class) for c in dataset.classes]
    if dataset.class_choice == "weighted":
        return [float(w) for w in dataset.class_weights]
    return [1.0] * len(dataset.classes)


@dataclass(frozen=True)
class NetworkSettings:
    """model.global / model.local."""

    __pydantic_config__ = STRICT_SECTION
    checkpoint: str | None = None  # a .safetensors written by dmgr, or a guided-diffusion .pt with a config
    config: dict | None = None  # the UNet's architecture (null: the one a project checkpoint stores)


@dataclass(frozen=True)
class ModelSettings:
    """conf/model/*.yaml, except `global` and `local` (NetworkSettings each)."""

    __pydantic_config__ = STRICT_SECTION
    name: str
    random_init: Flag = False  # tiny random networks, no checkpoints (tests and smoke runs)
    diffusion_steps: Count(2) = 1000
    beta_schedule: Literal["linear", "cosine"] = "linear"


@dataclass(frozen=True)
class NetworkSpec:
    checkpoint: str | None
    config: dict | None
    digest: str | None = None  # sha256 of the checkpoint file
    classes: tuple[str, ...] | None = None  # the class names a project checkpoint stores
    scale: float | None = None  # the dataset.scale it was trained at (dmgr.scale); None: not recorded, unknown


@dataclass(frozen=True)
class ModelSpec:
    name: str
    random_init: bool
    diffusion_steps: int
    beta_schedule: str
    global_net: NetworkSpec
    local_net: NetworkSpec

    @property
    def local_has_mask(self) -> bool:
        """Whether the local model generates a defect mask channel (`mask.method=local`)."""
        return has_mask_channel((self.local_net.config or {}).get("in_channels", 3))


@dataclass(frozen=True)
class MaskSettings:
    """The defect masks (docs/masks.md)."""

    __pydantic_config__ = STRICT_SECTION
    method: Literal[MASK_CHOICES] = "auto"  # auto: local when the local model generates a mask channel, else
    #   diff on real images, gate on generated boards
    pixels: Literal["crop", "global"] = "crop"  # real images: inside the mask the crop's pixels or the global's
    sigma: NonNegative = 1.0  # diff: Gaussian smoothing of |image - twin|, pixels
    min_contrast: NonNegative = 0.1  # diff: smallest smoothed difference counted as defect ([-1, 1] scale)
    local_sigma: NonNegative = 0.0  # local: each mask pixel takes the majority of its Gaussian neighbourhood of
    #   this sigma, pixels (0: none; for a local model whose masks scatter: docs/masks.md)


@dataclass(frozen=True)
class Extras:
    """The optional members of each sample."""

    __pydantic_config__ = STRICT_SECTION
    input: Flag = False  # <key>.input.png: the background exactly as the model saw it (source=images)
    crop: Flag = False  # <key>.crop.png: the final local crop
    twin: Flag = False  # <key>.twin.png: the defect-free twin (source=generate)
    grid: Flag = False  # <key>.grid.png: x0 predictions every schedule.record_every indices
    masks: Flag = False  # <key>.mask_<method>.png for every mask method the run can make
    paste: Flag = False  # <key>.paste.png + paste_mask.png: the no-rectification baseline (source=generate)

    def members(self, mask_methods: Sequence[str]) -> tuple[str, ...]:
        """What every sample of the run holds: the one list the engine writes and the resume check expects."""
        extra = [f"{name}.png" for name in ("crop", "twin", "grid", "input") if getattr(self, name)]
        if self.masks:
            extra += [f"mask_{method}.png" for method in mask_methods]
        if self.paste:
            extra += ["paste.png", "paste_mask.png"]
        return ("png", "mask.png", "json", *extra)


@dataclass(frozen=True)
class QualitySettings:
    """End the run with the sample metrics (dmgr.eval): RUN/eval/ and the manifest's "quality"."""

    __pydantic_config__ = STRICT_SECTION
    enabled: Flag = False
    classifier_steps: Count() = ClassifierSettings.steps  # the patch classifier the metrics use (trained once)
    classifier_boards: Count() = ClassifierSettings.per_class  # real boards per class it trains on
    cache_dir: UserPath = EVAL_CACHE


@dataclass(frozen=True)
class NonfiniteSettings:
    """A sample whose image holds NaN/Inf never reaches a shard: make it again at the next attempt (noise from
    dmgr.synth.plan.retry_seed, a new placement: same background and class) up to `max_attempts` attempts in
    all, or stop the run."""

    __pydantic_config__ = STRICT_SECTION
    action: Literal["retry", "stop"] = "retry"
    max_attempts: Count() = 3  # attempts in all before the run stops, naming the seed


@dataclass(frozen=True)
class ScreenSettings:
    """Score every sample, regenerate the weak ones (docs/evaluation.md "Quality screen"; only for
    dataset.source=images)."""

    __pydantic_config__ = STRICT_SECTION
    enabled: Flag = True  # false: the shards are exactly those of a run without the screen (and the only
    #   choice for dataset.source=generate)
    data_root: UserPath = DEMO_DATA  # local/<class>/ training patches + masks: classifier, areas (the demo's:
    #   its patches are rendered on first use, as `make data` writes them)
    max_attempts: Count() = 4  # attempts per seed in all (each a new placement and derived noise seed)
    on_exhausted: Literal["best", "flag", "skip"] = "best"  # best: write the best-ranked attempt (fewest failed
    #   checks, then the highest class fidelity) marked flagged | flag: the last attempt, flagged | skip: drop
    min_fidelity: Fraction = 0.5  # per defect: the classifier's probability of the requested class
    fidelity_quantile: Fraction | None = 0.1  # the class check's threshold is at most this quantile of the
    #   classifier's probability of the right class on the user's held-out defects (with few defects per class it
    #   misreads real ones; docs/evaluation.md "Quality screen"); null: min_fidelity as given
    min_class_margin: Annotated[float, Field(ge=-1, le=1)] | None = 0.0  # per defect: the requested class's
    #   probability less the highest other defect class's (clean left out); 0: no other defect class may read
    #   higher, which the class check only adds once its threshold is below 0.5; null: not checked
    area_quantile: Annotated[float, Field(ge=0, le=0.5)] = ScreenClassifierSettings.area_quantile  # per defect:
    #   mask area within the [q, 1-q] quantiles of the class's training masks
    max_mask_outside: Count(0) = 0  # mask pixels outside the defect windows
    max_changed_outside: Count(0) = 0  # pixels changed outside the mask (the real-image path promises 0)
    max_seam: float = 4.0  # colour step across the mask border, z-score against the input's own steps
    classifier_steps: Count() = ScreenClassifierSettings.steps  # the screen classifier's training (cached)
    cache_dir: UserPath = SCREEN_CACHE
    data_digest: str | None = None  # set by validate: of the training patches and masks (part of the identity)
    classifier_key: str | None = None  # set by validate: the digest of every input of the screen's classifier
    #   (its cache name, part of the identity)

    def thresholds(self, held_out_fidelity: tuple[float, ...]) -> dict:
        """The checks' limits, the class check's calibrated by the classifier's held-out defects."""
        from dmgr.synth.screen import fidelity_threshold  # local import keeps config import light

        return {"min_fidelity": fidelity_threshold(self.min_fidelity, self.fidelity_quantile, held_out_fidelity),
                "min_class_margin": self.min_class_margin,
                "max_mask_outside": self.max_mask_outside, "max_changed_outside": self.max_changed_outside,
                "max_seam": self.max_seam}


@dataclass(frozen=True)
class ArraySettings:
    """The Slurm array split (set by the jobs/ scripts)."""

    __pydantic_config__ = STRICT_SECTION
    task_id: Count(0) = 0
    task_count: Count() = 1

    def __post_init__(self) -> None:
        if self.task_id >= self.task_count:
            fail("array.task_id", self.task_id, f"must be below array.task_count={self.task_count}")


@dataclass(frozen=True)
class SynthSettings:
    """conf/synth.yaml: every setting of the job. Override anything on the command line:
    `make synth ARGS="seeds=0-99 schedule=paper mask.method=gate"`."""

    __pydantic_config__ = STRICT_SECTION
    dataset: DatasetSettings  # config group conf/dataset/
    model: dict  # config group conf/model/: ModelSettings + global/local NetworkSettings
    schedule: dict  # config group conf/schedule/: name, respacing and the DMGRSettings
    seeds: Any = "0-15"  # a range "a-b" (inclusive), a single seed, or a list [3, 7, 11]
    samples_per_shard: Count() = 8  # shard k holds the k-th block of this many seeds
    batch_size: Count() = 4  # samples per sampler call (per worker); bit-identical shards need the same
    #   batch_size and threads (another batch_size: the same samples within rounding)
    out_dir: str | None = None  # null: outputs/<dataset>-<model>-<schedule>-<config hash> (reruns resume)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun each rank takes cuda:LOCAL_RANK)
    precision: Literal[PRECISIONS] = "fp32"  # autocast for the networks; the sampler maths stays fp32
    performance: PerformanceSettings = PerformanceSettings()  # how the networks run (docs/performance.md)
    shard_prefix: str = "dmgr"  # shard file names: <prefix>-000000.tar (letters, digits, . _ -)
    threads: Any = "auto"  # intra-op threads per worker; auto: OMP_NUM_THREADS if set, else the CPUs given
    #   (Slurm, affinity) / workers, lowered to the CPUs idle at the start (logged, and in each shard's record).
    #   Bit-identical shards need equal threads: give a number to redo shards on a machine under other load
    nonfinite: NonfiniteSettings = NonfiniteSettings()
    mask: MaskSettings = MaskSettings()
    extras: Extras = Extras()
    quality: QualitySettings = QualitySettings()
    screen: ScreenSettings = ScreenSettings()
    array: ArraySettings = ArraySettings()
    writer_queue: Count() = 16  # samples buffered between the sampler and the shard-writer thread
    progress: Flag = True

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.shard_prefix):
            fail("shard_prefix", self.shard_prefix, "a plain file-name prefix: letters, digits, '.', '_', '-' (no '/')")
        if self.threads != "auto" and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                       or self.threads < 1):
            fail("threads", self.threads, "intra-op threads per worker: an integer >= 1, or auto (from the CPUs given)")
        if self.screen.enabled and self.dataset.source != "images":
            fail("screen.enabled", True, "the quality screen needs dataset.source=images (real defect-free "
                 "images): with dataset.source=generate add screen.enabled=false")
        for name in ("twin", "paste") if self.dataset.source == "images" else ("input",):
            if getattr(self.extras, name):
                other = "generate" if name != "input" else "images"
                fail(f"extras.{name}", True,
                     f"needs dataset.source={other} (on real images extras.input writes the input)")


register_defaults("synth_defaults", SynthSettings)
register_defaults("base", DMGRSettings, group="schedule", name="???", respacing="???", gate_radius=None)
register_defaults("base", DatasetSettings, group="dataset")
nets = defaults_of(NetworkSettings)
register_defaults("base", ModelSettings, group="model", **{"global": nets, "local": nets})


@dataclass(frozen=True)
class Schedule:
    """conf/schedule/ validated: its name, the respacing, the sampler's settings (gate_radius resolved for the
    window when the config leaves it null), and every value as the config gave it (`given`: the sample json's
    `schedule`, which adoption compares with a shard's, so types stay as written, e.g. respacing 10 or "10")."""

    name: str
    respacing: str
    settings: DMGRSettings
    given: dict

@dataclass(frozen=True)
class RunSpec:
    seeds: Sequence[int]  # a range for "a-b", however long
    samples_per_shard: int
    batch_size: int
    out_dir: Path
    device: str
    precision: str
    shard_prefix: str
    mask: MaskSettings  # its method resolved (never auto)
    extras: Extras
    array: ArraySettings
    writer_queue: int
    progress: bool
    quality: QualitySettings
    dataset: DatasetSettings
    model: ModelSpec
    schedule: Schedule
    resolved: dict  # the whole resolved config: the run's identity, run.json and the manifest
    identity: str  # hash of what determines the samples
    backgrounds: Backgrounds | None = None  # source=images: the usable input list
    threads: int | None = None  # intra-op threads per worker; None: from the CPUs the worker was given
    nonfinite: NonfiniteSettings = NonfiniteSettings()
    screen: ScreenSettings = ScreenSettings()
    performance: PerformanceSettings = PerformanceSettings()
    identity_inputs: dict | None = None  # what the identity hashes (run.json keeps it, to name a change)

    @property
    def available_masks(self) -> tuple[str, ...]:
        """The mask methods this run can compute (`local` needs a local model with a mask channel)."""
        return tuple(m for m in MASK_METHODS if m != "local" or self.model.local_has_mask)


def schedule_settings(cfg: DictConfig, window_size: int) -> DMGRSettings:
    """The validated DMGRSettings of `cfg.schedule` for a window of `window_size` px."""
    values = {k: v for k, v in OmegaConf.to_container(cfg.schedule, resolve=True).items()
              if k not in ("name", "respacing")}
    if values.get("gate_radius") is None:
        values["gate_radius"] = 9.0 * window_size / 64.0
    settings = build(DMGRSettings, values, "schedule")
    if settings.T_e >= settings.T_s:
        fail("schedule.T_e", settings.T_e, f"must be smaller than schedule.T_s={settings.T_s}")
    if settings.multiscale_loss and window_size % (2**settings.pyramid_levels):
        fail("schedule.pyramid_levels", settings.pyramid_levels, f"window {window_size} px must divide by 2^levels")
    return settings


def _find_path(value: str, kind: str = "any") -> Path | None:
    """A path as given (relative to the working directory), else relative to the project root."""
    exists = Path.is_file if kind == "file" else Path.exists
    path = Path(value).expanduser()
    if exists(path):
        return path.resolve()
    if not path.is_absolute() and exists(PROJECT_ROOT / path):
        return PROJECT_ROOT / path
    return None


def _model(raw: dict) -> tuple[ModelSettings, NetworkSettings, NetworkSettings]:
    model = build(ModelSettings, {k: v for k, v in raw.items() if k not in ("global", "local")}, "model")
    nets = [build(NetworkSettings, raw.get(which) or {}, f"model.{which}") for which in ("global", "local")]
    return model, *nets


def _network(which: str, net: NetworkSettings, random_init: bool) -> NetworkSpec:
    """Reads the checkpoint's header: its stored architecture, class names and sha256."""
    from dmgr.models import CheckpointError, file_digest, stored_metadata
    from dmgr.models.checkpoints import recorded_scale

    if random_init:
        if net.config is None:
            fail(f"model.{which}.config", None, "random_init needs an architecture config")
        try:
            UNetConfig.from_dict(net.config)
        except UNetConfigError as exc:
            fail(f"model.{which}.config", dict(net.config), str(exc))
        return NetworkSpec(None, net.config)
    if net.checkpoint in (None, "???", ""):
        fail(f"model.{which}.checkpoint", net.checkpoint, "give the path of a checkpoint file")
    path = _find_path(net.checkpoint, "file")
    if path is None:
        fail(f"model.{which}.checkpoint", net.checkpoint,
             "file not found: fix the path or train one (docs/own-product.md)")
    try:
        stored, meta = stored_metadata(path)
    except CheckpointError as exc:
        fail(f"model.{which}.checkpoint", net.checkpoint, str(exc))
    config = net.config
    if config is None:
        if stored is None:
            fail(f"model.{which}.config", None, f"{path.name} stores no architecture: give model.{which}.config")
        config = stored.to_dict()
    classes = tuple(json.loads(meta["dmgr.classes"])) if "dmgr.classes" in meta else None
    try:
        scale = recorded_scale(meta, path)
    except CheckpointError as exc:
        fail(f"model.{which}.checkpoint", net.checkpoint, str(exc))
    return NetworkSpec(str(path), config, file_digest(path), classes, scale)


def _check_model(model: ModelSpec, dataset: DatasetSettings) -> None:
    for which, spec, size in (
        ("global", model.global_net, dataset.image_size),
        ("local", model.local_net, dataset.window_size),
    ):
        if spec.config and spec.config.get("image_size") not in (None, size):
            fail(f"model.{which}.config.image_size", spec.config["image_size"], f"must equal {size} (dataset)")
    local_classes = (model.local_net.config or {}).get("num_classes")
    if model.local_net.config is not None and (local_classes or 0) < len(dataset.classes):
        fail("model.local.config.num_classes", local_classes,
             f"the local model must know all {len(dataset.classes)} dataset classes")
    stored_classes = model.local_net.classes
    if stored_classes is not None and tuple(dataset.classes) != stored_classes:
        fail("dataset.classes", list(dataset.classes), f"the local checkpoint was trained on {list(stored_classes)} "
             "(class ids are positions): give the same names in the same order")
    other = [(which, spec.scale) for which, spec in (("global", model.global_net), ("local", model.local_net))
             if spec.scale is not None and not math.isclose(spec.scale, dataset.scale, rel_tol=1e-6)]
    if other and dataset.source == "images":  # a scale no checkpoint records is unknown: no warning
        trained = ", ".join(f"model.{which} was trained at scale={scale:g}" for which, scale in other)
        logging.getLogger("dmgr.synth").warning(
            "%s, this run has dataset.scale=%g: defects come out at another pixel size than trained; set "
            "dataset.scale=%g (or retrain at %g)", trained, dataset.scale, other[0][1], dataset.scale)


def _respaced_steps(diffusion_steps: int, respacing: str) -> int:
    from dmgr.diffusion import space_timesteps  # local import keeps config import light

    try:
        return len(space_timesteps(diffusion_steps, respacing))
    except ValueError as exc:
        detail = str(exc) if "invalid literal" not in str(exc) else "not a step count"
        fail("schedule.respacing", respacing,
             f"{detail}: use a step count like 50, section counts like 10,10,5, or ddimN")


def identity_inputs(resolved: dict, model: ModelSpec, images_digest: str | None) -> dict:
    """What determines the samples: the settings, the checkpoints' contents (not their paths), the background
    list's digest (not its path) and, with the screen, its classifier's key; the run's identity is its hash."""
    kept = {k: v for k, v in resolved.items() if k not in EXECUTION_KEYS}
    screen = kept.pop("screen", None)
    if screen and screen.get("enabled"):  # off, the screen's settings stay out of the identity
        kept["screen"] = {k: v for k, v in screen.items() if k not in ("data_root", "cache_dir")}
        for key in ("fidelity_quantile", "min_class_margin"):  # null: runs made before the setting resume
            if kept["screen"].get(key) is None:
                kept["screen"].pop(key, None)
    performance = kept.pop("performance", None)
    if performance and performance != dataclasses.asdict(PerformanceSettings()):
        kept["performance"] = performance  # at its defaults left out: shards made without it still resume
    if not kept.get("schedule", {}).get("guidance", 1):  # off, left out: shards made without it still resume
        kept["schedule"] = {k: v for k, v in kept["schedule"].items() if k != "guidance"}
    if not kept.get("mask", {}).get("local_sigma"):  # 0, left out: shards made without it still resume
        kept["mask"] = {k: v for k, v in kept["mask"].items() if k != "local_sigma"}
    kept["model"] = {**kept["model"]}
    for which, net in (("global", model.global_net), ("local", model.local_net)):
        kept["model"][which] = {**kept["model"][which], "checkpoint": net.digest}
    if images_digest is not None:
        kept["dataset"] = {**kept["dataset"], "images": images_digest}
    return json.loads(json.dumps(kept, default=str))


def identity_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:10]


def changed_settings(before: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: before -> now' for every dotted key whose value differs between two nested dicts."""
    changes = []
    for key in sorted(set(before) | set(now), key=str):
        a, b, name = before.get(key), now.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_settings(a, b, f"{name}.")
        elif a != b:
            changes.append(f"{name}: {json.dumps(a, default=str)[:60]} -> {json.dumps(b, default=str)[:60]}")
    return changes


def _mask_method(method: str, dataset: DatasetSettings, model: ModelSpec) -> str:
    """`auto`: the local model's own mask when it generates one, else `diff` (real images) or `gate`."""
    has_mask = model.local_has_mask
    if method == "auto":
        return "local" if has_mask else ("diff" if dataset.source == "images" else "gate")
    if method == "local" and not has_mask:
        fail("mask.method", method, "the local model generates no mask channel (in_channels 3): use diff or gate, "
             "or train a mask-generating local model (arch=demo_local_mask, docs/training.md)")
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


def _device(value: str) -> str:
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


def screen_classifier_settings(screen: ScreenSettings, dataset: DatasetSettings) -> ScreenClassifierSettings:
    """The training settings of the run's screen classifier."""
    return ScreenClassifierSettings(window=dataset.window_size, steps=screen.classifier_steps,
                                    area_quantile=screen.area_quantile)


def _screen_data(screen: ScreenSettings, dataset: DatasetSettings, backgrounds: Backgrounds) -> ScreenSettings:
    """The enabled screen with its training data found and digested, and its classifier's key (both join the
    run's identity)."""
    root = _find_path(str(screen.data_root))
    if root is None or not (root / "local").is_dir():
        root = demo_patches(str(screen.data_root), dataset.classes)
    if root is None or not (root / "local").is_dir():
        fail("screen.data_root", str(screen.data_root), "a data root with local/<class>/ training patches and their "
             "masks (your local model's training data), or screen.enabled=false")
    from dmgr.synth.screen_classifier import classifier_key, data_digest  # local import keeps config import light

    try:
        digest = data_digest(root, dataset.classes)
    except FileNotFoundError as exc:
        fail("screen.data_root", str(root), str(exc))
    key = classifier_key(digest, backgrounds, dataset.classes, screen_classifier_settings(screen, dataset))
    return dataclasses.replace(screen, data_root=root, data_digest=digest, classifier_key=key)


def _check_fixed_window(window: tuple[int, int], backgrounds: Backgrounds) -> None:
    """A fixed window (top-left in image pixels) must lie inside every usable image."""
    side = backgrounds.geometry.window
    for item in backgrounds.items:
        if window[0] + side > item.size[0] or window[1] + side > item.size[1]:
            fail("dataset.fixed_window", list(window), f"the {side} px window leaves {item.name} "
                 f"({item.size[0]}x{item.size[1]}): give a top-left inside every image")


def _check_class_rois(dataset: DatasetSettings, backgrounds: Backgrounds) -> None:
    """Every per-class ROI names a class of the run, and every class that can be drawn fits somewhere."""
    for item in backgrounds.items:
        for own in item.class_rois:
            if own.class_name not in dataset.classes:
                fail("dataset.images", str(dataset.images), f'the "roi" of {item.name} names class '
                     f"{own.class_name!r}, not one of dataset.classes ({', '.join(dataset.classes)}): fix the name")
    for name, weight in zip(dataset.classes, class_weights(dataset)):
        if weight > 0 and not any(backgrounds.has_room(i, name) for i in range(len(backgrounds))):
            fail("dataset.images", str(dataset.images), f"class {name!r} fits on no image: its per-class ROIs "
                 f"leave no room for a {backgrounds.geometry.window} px window; widen them, or leave the class out")


def _size_prior(dataset: DatasetSettings) -> DatasetSettings:
    """The dataset with placement.min_areas: per class, min_mask_area raised to the size_quantile of the real
    masks under placement.data_root (image pixels at dataset.scale), or min_mask_area alone."""
    placement = dataset.placement
    floor = [float(placement.min_mask_area)] * len(dataset.classes)
    if placement.data_root is not None:
        root = _find_path(str(placement.data_root))
        if root is None or not (root / "local").is_dir():
            fail("dataset.placement.data_root", str(placement.data_root), "a data root with local/<class>/ "
                 "patches and their masks (the demo's: `make data` writes outputs/pcb-data), or null for no prior")
        from dmgr.synth.screen_classifier import area_ranges

        try:
            ranges = area_ranges(root, dataset.classes, dataset.window_size, placement.size_quantile)
        except (FileNotFoundError, ValueError) as exc:
            fail("dataset.placement.data_root", str(root), str(exc).splitlines()[0])
        floor = [max(f, round(ranges[c][0] / dataset.scale**2, 2)) for f, c in zip(floor, dataset.classes)]
    return dataclasses.replace(dataset, placement=dataclasses.replace(placement, min_areas=tuple(floor)))


def read_inputs(settings: SynthSettings, model: ModelSettings, nets: Sequence[NetworkSettings]):
    """The checks that read the disk, all in one step (nothing is written): each checkpoint's header, the
    background images (source=images; the demo's default folder is rendered on first use, the one write) and
    the screen's training data (when it is on). The weights load later,
    in `load_engine`, still before out_dir is created. Returns (model spec, dataset, backgrounds, screen)."""
    spec = ModelSpec(model.name, model.random_init, model.diffusion_steps, model.beta_schedule,
                     *(_network(which, net, model.random_init) for which, net in zip(("global", "local"), nets)))
    dataset, backgrounds, screen = settings.dataset, None, settings.screen
    if dataset.source == "images":
        images = _find_path(str(dataset.images)) or demo_backgrounds(str(dataset.images))
        if images is None:
            fail("dataset.images", str(dataset.images), "no such folder or .jsonl manifest: your images "
                 "(`python -m dmgr.data.prepare` makes a data root), or the demo's boards (`make backgrounds`)")
        dataset = dataclasses.replace(dataset, images=images)
        try:
            backgrounds = scan_backgrounds(images, dataset.image_size, dataset.window_size, dataset.margin,
                                           dataset.scale)
        except BackgroundError as exc:
            fail("dataset.images", str(images), str(exc))
        if dataset.window_choice == "fixed":
            _check_fixed_window(dataset.fixed_window, backgrounds)
        _check_class_rois(dataset, backgrounds)
    dataset = _size_prior(dataset)
    if screen.enabled:
        screen = _screen_data(screen, dataset, backgrounds)
    return spec, dataset, backgrounds, screen


def validate(cfg: DictConfig) -> RunSpec:
    """Check every setting and return the typed run spec: first the schema (types, allowed values, bounds,
    rules between fields), then `read_inputs` (the disk, read only), then whether out_dir (or its nearest
    existing parent) is writable, without creating it."""
    for key in ("dataset", "model", "schedule"):
        if key not in cfg:
            fail(key, None, f"missing config group: add {key}=<name> (see conf/{key}/)")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    settings: SynthSettings = build(SynthSettings, resolved)
    seeds = parse_seeds(settings.seeds)
    device = _device(settings.device)
    model_settings, *nets = _model(settings.model)
    respacing = str(settings.schedule.get("respacing"))
    steps = _respaced_steps(model_settings.diffusion_steps, respacing)
    schedule = Schedule(str(settings.schedule.get("name")), respacing,
                        schedule_settings(cfg, settings.dataset.window_size), dict(settings.schedule))
    if schedule.settings.T_s >= steps:
        fail("schedule.T_s", schedule.settings.T_s, f"must be below the number of respaced steps ({steps})")
    model, dataset, backgrounds, screen = read_inputs(settings, model_settings, nets)
    _check_model(model, dataset)
    if schedule.settings.guidance > 0 and not (model.local_net.config or {}).get("null_class"):
        fail("schedule.guidance", schedule.settings.guidance, "the local model has no null class: train one with "
             "label_dropout > 0 (arch=demo_local_mask_guided, docs/training.md), or 0 for no guidance")
    mask_method = _mask_method(settings.mask.method, dataset, model)
    resolved["mask"]["method"] = mask_method
    resolved["dataset"]["placement"]["min_areas"] = list(dataset.placement.min_areas)
    if backgrounds is not None:
        resolved["dataset"]["images"] = str(dataset.images)
        resolved["dataset"]["images_digest"] = backgrounds.digest
    if screen.enabled:
        resolved["screen"]["data_root"] = str(screen.data_root)
        resolved["screen"]["data_digest"] = screen.data_digest
        resolved["screen"]["classifier_key"] = screen.classifier_key
    resolved["performance"] = dataclasses.asdict(settings.performance)
    inputs = identity_inputs(resolved, model, backgrounds.digest if backgrounds is not None else None)
    identity = identity_of(inputs)
    if settings.out_dir:
        out_dir = Path(settings.out_dir).expanduser()
    else:
        out_dir = Path("outputs") / f"{dataset.name}-{model.name}-{settings.schedule.get('name')}-{identity}"
    check_writable(out_dir)
    return RunSpec(
        seeds=seeds,
        samples_per_shard=settings.samples_per_shard,
        batch_size=settings.batch_size,
        out_dir=out_dir.resolve(),
        device=device,
        precision=settings.precision,
        shard_prefix=settings.shard_prefix,
        mask=dataclasses.replace(settings.mask, method=mask_method),
        extras=settings.extras,
        array=settings.array,
        writer_queue=settings.writer_queue,
        progress=settings.progress and os.environ.get("DMGR_NO_PROGRESS") is None,
        quality=settings.quality,
        dataset=dataset,
        model=model,
        schedule=schedule,
        resolved=resolved,
        identity=identity,
        identity_inputs=inputs,
        backgrounds=backgrounds,
        threads=None if settings.threads == "auto" else settings.threads,
        nonfinite=settings.nonfinite,
        screen=screen,
        performance=settings.performance,
    )
