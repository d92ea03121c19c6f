"""Train the global or the local model, guided-diffusion style: `python -m dmgr.train arch=demo_global`.

Epsilon prediction (plus the improved-DDPM hybrid loss with learned sigma), uniform timesteps, AdamW,
EMA weights, gradient clipping, optional autocast, DDP under torchrun, resumable from out_dir/state.pt.
A checkpoint is saved every `save_every` steps, at least every `save_every_minutes`, at the end, and on
SIGTERM/SIGINT (then the job exits non-zero; rerunning the same command resumes). out_dir/train.json
records the run's data_root and architecture: resuming there with another one is refused.
The global model learns from random image_size tiles of DATA_ROOT/global resized by `scale` (model pixels
per image pixel, synthesis's dataset.scale), the local model from the patches `dmgr.data.prepare` cut at that
scale; each checkpoint records its scale (metadata dmgr.scale).
Checkpoints are written in the project format (safetensors + architecture config): `ema.safetensors`
loads into the synthesis job as it is.
A held-out slice (`held_out` patches per class, or frames of the global model's images) is kept out of
training; its loss and the same loss on as many training items, at fixed timesteps and noise, are logged to
out_dir/held_out.jsonl (a gap that grows is memorisation), the slice itself to out_dir/held_out.json.
In a multirun (`python -m dmgr.train -m lr=1e-4,2e-4`) every point trains in its own folder:
OUT_DIR/<its overrides> (out_dir default: outputs/train-sweep-<arch name>).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pydantic import Field
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dmgr import CONF_DIR, DEMO_DATA
from dmgr.cli import stop_on_interrupt
from dmgr.data.dataset import PatchDataset, TileDataset, TileError, TileSampler, cpus_given, to_model_range
from dmgr.diffusion import make_diffusion
from dmgr.diffusion.training import diffusion_loss
from dmgr.distributed import WorkerContext, init_workers, shutdown
from dmgr.images import list_images, to_uint8
from dmgr.models import UNetModel, build_unet, save_checkpoint
from dmgr.models.checkpoints import SCALE_KEY, check_fit, read_checkpoint
from dmgr.models.precision import PRECISIONS, autocast
from dmgr.models.unet import UNetConfig, UNetConfigError, check_attention, null_label
from dmgr.progress import progress_bar
from dmgr.sampler import ddim_sample
from dmgr.sampler.noise import generator, stream_seed
from dmgr.sampler.settings import MASK_CHANNEL, RGB, has_mask_channel
from dmgr.schema import STRICT_SECTION, ConfigError, Count, Flag, NonNegative, build, fail, register_defaults

log = logging.getLogger("dmgr.train")


class TrainConfigError(ConfigError):
    pass


@dataclass(frozen=True)
class ArchSettings:
    """conf/arch/*.yaml: one network to train."""

    __pydantic_config__ = STRICT_SECTION
    name: str
    role: Literal["global", "local"]
    config: dict  # the UNet's architecture (guided-diffusion create_model names)
    classes: tuple[str, ...] | None = None  # local: the class names, ids are positions


@dataclass(frozen=True)
class TrainSettings:
    """conf/train.yaml: every training setting, its type, allowed values and default."""

    __pydantic_config__ = STRICT_SECTION
    arch: ArchSettings  # config group conf/arch/
    data_root: str = str(DEMO_DATA)  # folders written by `python -m dmgr.data.export` (global/, local/)
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # model pixels per image pixel
    #   (synthesis's dataset.scale): global tiles of the images resized by it; null: the scale data_root's
    #   prepare.json records, else 1.0
    steps: Count() = 2000
    batch_size: Count() = 16
    lr: Annotated[float, Field(gt=0)] = 2.0e-4
    weight_decay: NonNegative = 0.0
    ema_rate: Annotated[float, Field(ge=0, lt=1)] = 0.999  # with the usual warm-up min(rate, (1 + step) / (10 + step))
    grad_clip: float = 1.0
    precision: Literal[PRECISIONS] = "fp32"  # autocast (bf16 on a GPU: docs/performance.md "Training cost")
    channels_last: Flag = False  # NHWC weights and batches: faster convolutions on a GPU's tensor cores
    diffusion_steps: Count(2) = 1000
    beta_schedule: Literal["linear", "cosine"] = "linear"
    seed: int = 0
    device: str = "auto"
    out_dir: str | None = None  # null: outputs/train-<arch name>
    init_from: str | None = None  # a checkpoint to start from (fine-tuning; 3 -> 4 channels is allowed)
    resume: Flag = True  # continue from out_dir/state.pt when it exists (same data_root and arch only)
    log_every: Count() = 50
    sample_every: Count() = 500  # a DDIM sample grid from the EMA weights, into out_dir/samples/
    sample_steps: Count() = 25
    sample_guidance: NonNegative = 0.0  # classifier-free guidance of the sample grid (needs null_class)
    label_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # local: the probability that a training label is
    #   replaced by the null class (arch.config.null_class: true), for guidance at synthesis; 0: off
    save_every: Count() = 500  # a checkpoint every this many steps, and at the end
    save_every_minutes: Annotated[float, Field(gt=0)] | None = 10  # ... and at least this often (null: by
    #   steps only); SIGTERM/SIGINT also save
    num_workers: Count(0) | Literal["auto"] = "auto"  # DataLoader workers; auto: none for the local model's
    #   patches (held as tensors), else up to 8 of the CPUs given (per process under torchrun), leaving one
    held_out: Count(0) = 2  # kept out of training: patches per class (local), images (global), at most a
    #   quarter of each; 0: none
    local_data: Literal["defects", "clean"] = "defects"  # local: the labelled defect patches of data_root/local,
    #   or clean: patches cut from the defect-free images of data_root/global with an empty mask and the null
    #   class (needs arch.config.null_class): pretraining without defects, then init_from it on the defects
    progress: Flag = True

    def __post_init__(self) -> None:
        arch = self.arch
        if arch.role == "local" and arch.config.get("num_classes") != len(arch.classes or ()):
            fail("arch.config.num_classes", arch.config.get("num_classes"),
                 f"must equal the number of arch.classes ({len(arch.classes or ())})")
        null = arch.role == "local" and bool(arch.config.get("null_class"))
        if self.local_data == "clean" and not null:
            fail("local_data", self.local_data, "pretrains the null class: needs a local model with one "
                 "(`+arch.config.null_class=true`), or local_data=defects")
        for key, value in (("label_dropout", self.label_dropout), ("sample_guidance", self.sample_guidance)):
            if value > 0 and not null:
                fail(key, value, "needs a local model with a null class: set arch.config.null_class=true "
                     "(`+arch.config.null_class=true`, or arch=demo_local_mask_guided), or 0")


register_defaults("train_defaults", TrainSettings)


class TrainInterrupted(RuntimeError):
    """Stopped by a signal after saving a checkpoint; rerunning the same command resumes."""

    def __init__(self, signum: int, step: int, out: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {out / 'state.pt'}: "
                         "rerun the same command to resume")
        self.signum = signum


def check_config(cfg: DictConfig) -> TrainSettings:
    """The schema's checks, then the one that reads the disk: data_root holds the role's folder."""
    try:
        settings = build(TrainSettings, {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                                         if k != "hydra"})
    except ConfigError as exc:
        raise TrainConfigError(str(exc)) from None
    try:
        check_attention(UNetConfig.from_dict(settings.arch.config))
    except UNetConfigError as exc:
        raise TrainConfigError(f"arch.config: {exc}") from None
    subdir = Path(settings.data_root) / data_folder(settings)
    if not subdir.is_dir():
        raise TrainConfigError(
            f"data_root={settings.data_root!r}: no {subdir}: prepare your images with `python -m dmgr.data.prepare "
            f"... --out {settings.data_root}` (docs/own-product.md), or the demo's with "
            f"`python -m dmgr.data.export --out {settings.data_root}`"
        )
    return settings


def data_folder(cfg: TrainSettings | DictConfig) -> str:
    """The folder of data_root a run reads: its role's, except clean local pretraining: the defect-free images."""
    return "global" if cfg.arch.role == "local" and getattr(cfg, "local_data", "defects") == "clean" else cfg.arch.role


def data_scale(settings: TrainSettings) -> float:
    """The run's scale: `scale`, else the one data_root's prepare.json records, else 1.0. A scale other than
    the one the data root was prepared at is refused (its local patches were cut at that one)."""
    record = Path(settings.data_root) / "prepare.json"
    try:
        prepared = float(json.loads(record.read_text()).get("scale", 1.0)) if record.is_file() else None
    except (OSError, ValueError, AttributeError, TypeError):
        prepared = None
    if settings.scale is None:
        return prepared if prepared is not None else 1.0
    if prepared is not None and not math.isclose(settings.scale, prepared, rel_tol=1e-6):
        raise TrainConfigError(
            f"scale={settings.scale:g}: data_root={settings.data_root} was prepared at scale {prepared:g} ({record}): "
            f"give scale={prepared:g} (or leave it out), or rerun `python -m dmgr.data.prepare ... --scale "
            f"{settings.scale:g}` into another data root"
        )
    return settings.scale


def run_record(cfg: DictConfig, scale: float = 1.0) -> dict:
    """What makes a training run: its data, its scale and its architecture (out_dir/train.json)."""
    record = {"data_root": str(Path(cfg.data_root).resolve()), "arch": OmegaConf.to_container(cfg.arch, resolve=True)}
    if data_folder(cfg) != cfg.arch.role:  # only where it differs: records of defect runs stay as they were
        record["local_data"] = cfg.local_data
    if scale != 1.0:  # 1.0 keeps the record of runs made before the setting existed
        record["scale"] = scale
    return record


def check_resume(cfg: DictConfig, out: Path, scale: float = 1.0) -> None:
    """Refuse to resume, in out_dir, a run made on other data, at another scale or with another architecture."""
    record = out / "train.json"
    if not (cfg.resume and (out / "state.pt").exists() and record.exists()):
        return
    old, new = json.loads(record.read_text()), run_record(cfg, scale)
    if old == new:
        return
    changes = "; ".join(f"{key}: {a} in the saved run, {b} in this one" for key, a, b in differences(old, new))
    raise TrainConfigError(
        f"out_dir={out} holds another run ({changes}): choose another out_dir, or resume=false to start over"
    )


def differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs ("absent" where one lacks the key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(old.keys() | new.keys(), key=str)
                for d in differences(old.get(key, "absent"), new.get(key, "absent"), f"{prefix}{key}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def load_state(path: Path, device: torch.device, steps: int) -> dict:
    """The training state to resume from; one TrainConfigError for a file that cannot be read or holds more
    steps than `steps` (the total to reach: a run that already went further would silently do nothing)."""
    fix = "delete it to start over, or give another out_dir"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an empty, truncated or foreign file: one line, no traceback
        raise TrainConfigError(f"cannot read the training state {path} ({type(exc).__name__}): {fix}") from None
    if not isinstance(state, dict) or not {"model", "ema", "opt", "step"} <= state.keys():
        raise TrainConfigError(f"{path} is not a dmgr training state: {fix}")
    if int(state["step"]) > steps:
        raise TrainConfigError(
            f"steps={steps}: out_dir={path.parent} is already at step {state['step']} (steps is the total to "
            f"reach): give steps > {state['step']} to train further, or resume=false or another out_dir to start over"
        )
    return state


class StopSignals:
    """SIGTERM/SIGINT set a flag the training loop checks after each step (the step in flight finishes)."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: no handlers, as before
            pass
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum

    def requested(self, ctx: WorkerContext) -> int:
        """The signal number when any worker was signalled (all workers agree under DDP), else 0."""
        if not ctx.distributed:
            return self.signum
        flag = torch.tensor([self.signum], device=ctx.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def held_out_names(root: Path, role: str, classes: list[str], count: int, seed: int) -> list[str]:
    """The held-out slice: per class `count` patches (`<class>/NAME.png`), or `count` images of the global
    folder (names), at most a quarter of each, drawn by a generator of (seed, "held_out")."""
    groups = [[f"{c}/{p.name}" for p in list_images(root / c, recursive=False)] for c in classes] \
        if role == "local" else [[p.name for p in list_images(root)]]
    names = []
    for k, group in enumerate(groups):
        order = torch.randperm(len(group), generator=generator(stream_seed(seed, "held_out", k))).tolist()
        names += sorted(group[i] for i in order[:min(count, len(group) // 4)])
    return names


def make_dataset(cfg: DictConfig, scale: float = 1.0, exclude: Collection[str] = (),
                 only: Collection[str] | None = None):
    """The global model's tiles at `scale` (a TrainConfigError when no image holds one), or the local patches;
    without the names in `exclude`, or only those in `only`."""
    root = Path(cfg.data_root) / data_folder(cfg)
    size = int(cfg.arch.config.image_size)
    if data_folder(cfg) == "global":
        try:
            if only is not None:
                exclude = {p.name for p in list_images(root)} - set(only)
            return TileDataset(root, size, scale, exclude=exclude, raw=True)
        except (TileError, FileNotFoundError) as exc:
            raise TrainConfigError(f"data_root={cfg.data_root}: {exc}") from None
    with_masks = has_mask_channel(int(cfg.arch.config.get("in_channels", 3)))
    return PatchDataset(root, list(cfg.arch.classes), size=size, flip=True, with_masks=with_masks, exclude=exclude,
                        only=only)


def probe_batch(dataset, count: int, seed: int, stream: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`count` fixed items of a dataset, drawn from (seed, stream): tiles, or patches with their labels."""
    if isinstance(dataset, TileDataset):
        keys = TileSampler(len(dataset), count, stream_seed(seed, stream), 0, 0, 1).batch(0)
        return to_model_range(torch.stack([dataset[k] for k in keys])), None
    index = torch.randperm(len(dataset.items), generator=generator(stream_seed(seed, stream)))[:count].tolist()
    return torch.stack([dataset[i][0] for i in index]), torch.tensor([dataset[i][1] for i in index])


@torch.no_grad()
def fixed_loss(model: torch.nn.Module, diffusion, x0: torch.Tensor, y: torch.Tensor | None, seed: int,
               device: torch.device, batch_size: int) -> float:
    """The mean epsilon MSE of `x0` at 4 fixed timesteps each (quantiles of the schedule) and fixed noise:
    comparable between steps, runs and datasets of the same size."""
    n = x0.shape[0]
    quantiles = torch.tensor([0.1, 0.35, 0.6, 0.85])
    t = (quantiles * diffusion.num_steps).long().repeat_interleave(n)
    x = x0.repeat(4, 1, 1, 1)
    labels = y.repeat(4) if y is not None else None
    noise = torch.randn(x.shape, generator=generator(stream_seed(seed, "held_out_noise")))
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        part = slice(start, start + batch_size)
        terms = diffusion_loss(model, diffusion, x[part].to(device), t[part].to(device), noise[part].to(device),
                               None if labels is None else labels[part].to(device))
        total += float(terms["mse"].sum())
    return total / x.shape[0]


def workers_for(setting: int | str, dataset, world_size: int) -> int:
    """DataLoader workers: the setting, or for auto none for patches held as tensors, else up to 8 of this
    process's share of the CPUs given, one left for the training loop."""
    if setting != "auto":
        return int(setting)
    if not isinstance(dataset, TileDataset):
        return 0
    return max(0, min(8, cpus_given() // max(1, world_size) - 1))


def output_folder(cfg: DictConfig) -> Path:
    """out_dir (default outputs/train-<arch name>); in a multirun OUT_DIR/<the point's overrides> (default
    outputs/train-sweep-<arch name>): every point of a sweep its own folder."""
    try:
        hydra = HydraConfig.get()
    except ValueError:  # called as a function, not through the Hydra app
        hydra = None
    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        return Path(cfg.out_dir or f"outputs/train-{cfg.arch.name}")
    point = hydra.job.override_dirname.replace("/", "_") or str(hydra.job.num)
    return Path(cfg.out_dir or f"outputs/train-sweep-{cfg.arch.name}") / point


@torch.no_grad()
def init_from(model: UNetModel, path: str) -> None:
    """Start from another checkpoint's weights (fine-tuning). A 3-channel checkpoint also starts a model with
    more channels (the mask-generating local model): the extra input channels get zero weights, the extra
    output channels (epsilon and, with learned sigma, variance) start from zero / the mean of the RGB ones.
    A checkpoint without a null class also starts a model with one (null_class: true)."""
    state, _, _ = read_checkpoint(path)
    own = model.state_dict()
    first, last = "input_blocks.0.0.weight", "out.2"
    if first in state and state[first].shape[1] < own[first].shape[1]:
        extra = own[first].shape[1] - state[first].shape[1]
        state[first] = torch.cat([state[first], state[first].new_zeros(state[first].shape[0], extra, 3, 3)], 1)
    groups = 2 if model.config.learn_sigma else 1  # [epsilon, variance] blocks of the output layer
    for key in (f"{last}.weight", f"{last}.bias"):
        old, new = state.get(key), own[key]
        if old is not None and old.shape[0] < new.shape[0]:
            old_c, new_c = old.shape[0] // groups, new.shape[0] // groups
            blocks = old.split(old_c)
            grown = [torch.cat([b, b.mean(0, keepdim=True).expand(new_c - old_c, *b.shape[1:]) * (k > 0)])
                     for k, b in enumerate(blocks)]
            state[key] = torch.cat(grown)
    labels = state.get("label_emb.weight")
    if labels is not None and null_label(model) is not None and labels.shape[0] == model.num_classes:
        state["label_emb.weight"] = torch.cat([labels, labels.mean(0, keepdim=True)])  # the null class starts
        #   as the mean of the class embeddings
    check_fit(model, state, path)
    model.load_state_dict(state, strict=True)


def drop_labels(y: torch.Tensor, rate: float, null: int, g: torch.Generator) -> torch.Tensor:
    """`y` with each label replaced by `null` with probability `rate`, drawn from the (CPU) generator `g`."""
    drop = torch.rand(y.shape[0], generator=g) < rate
    return torch.where(drop.to(y.device), torch.full_like(y, null), y)


def as_clean_patches(x: torch.Tensor, in_channels: int, null: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Defect-free tiles as local training items: an empty mask (-1) where the model has a mask channel, and
    the null class for every one."""
    if has_mask_channel(in_channels):
        x = torch.cat([x, torch.full_like(x[:, :1], -1.0)], 1)
    return x, torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)


def unwrap(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (list, tuple)):
        return batch[0].to(device), batch[1].to(device).long()
    return to_model_range(batch.to(device, non_blocking=True)), None  # tiles come as uint8


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(rate).add_(p.detach(), alpha=1 - rate)


@torch.no_grad()
def sample_grid(ema: UNetModel, cfg: DictConfig, device: torch.device, path: Path) -> None:
    """A grid of EMA samples: 8 boards, or one row of 8 per class for the local model."""
    diffusion = make_diffusion(cfg.diffusion_steps, cfg.beta_schedule, f"ddim{cfg.sample_steps}")
    size = int(cfg.arch.config.image_size)
    classes = len(cfg.arch.classes) if cfg.arch.role == "local" else 1
    g = torch.Generator().manual_seed(1234)
    x_T = torch.randn(8 * classes, ema.in_channels, size, size, generator=g).to(device)
    y = torch.arange(classes, device=device).repeat_interleave(8) if cfg.arch.role == "local" else None
    out = ddim_sample(ema, diffusion, x_T, y=y, guidance=cfg.get("sample_guidance", 0.0))
    if has_mask_channel(ema.in_channels):  # every class row followed by its generated masks
        out = torch.stack([out[:, RGB], out[:, MASK_CHANNEL:].expand(-1, 3, -1, -1)], 1).reshape(-1, 3, size, size)
        out = out.reshape(classes, 8, 2, 3, size, size).transpose(1, 2).reshape(-1, 3, size, size)
        classes *= 2
    images = to_uint8(out)
    rows = images.reshape(classes, 8, size, size, 3).transpose(0, 2, 1, 3, 4).reshape(classes * size, 8 * size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rows).resize((8 * max(size, 64), classes * max(size, 64)), Image.NEAREST).save(path)


def log_held_out(ema: UNetModel, diffusion, probes: dict, cfg: DictConfig, device: torch.device, step: int,
                 path: Path) -> None:
    """One line of out_dir/held_out.jsonl: the EMA model's fixed loss on the held-out slice and on as many
    training items."""
    row = {"step": step}
    for name, (x0, y) in probes.items():
        row[f"{name}_mse"] = fixed_loss(ema, diffusion, x0, y, cfg.seed, device, cfg.batch_size)
    log.info("step %d: held-out mse %.4f, training items %.4f", step, row["held_out_mse"], row["train_mse"])
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def save_all(cfg, out: Path, model, ema, opt, step: int, ctx: WorkerContext, scale: float = 1.0) -> None:
    if ctx.rank != 0:
        return
    meta = {"dmgr.step": str(step), "dmgr.role": cfg.arch.role, SCALE_KEY: repr(float(scale))}
    if cfg.arch.role == "local":
        meta["dmgr.classes"] = json.dumps(list(cfg.arch.classes))
    save_checkpoint(ema, out / "ema.safetensors", meta)
    save_checkpoint(model, out / "model.safetensors", meta)
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step}
    torch.save(state, out / "state.pt.tmp")
    (out / "state.pt.tmp").replace(out / "state.pt")


def train(cfg: DictConfig) -> Path:
    scale = data_scale(check_config(cfg))
    out = output_folder(cfg)
    check_resume(cfg, out, scale)
    root = Path(cfg.data_root) / data_folder(cfg)
    held = held_out_names(root, data_folder(cfg), list(cfg.arch.get("classes") or []), cfg.held_out, cfg.seed)
    dataset = make_dataset(cfg, scale, exclude=held)
    clean = data_folder(cfg) != cfg.arch.role
    in_channels, null = int(cfg.arch.config.get("in_channels", 3)), int(cfg.arch.config.get("num_classes") or 0)
    probes = None
    if held:
        held_out = make_dataset(cfg, scale, only=held)
        count = min(32, 8 * len(held) if isinstance(held_out, TileDataset) else len(held_out.items))
        probes = {"held_out": probe_batch(held_out, count, cfg.seed, "held_out"),
                  "train": probe_batch(dataset, count, cfg.seed, "train_probe")}
        if clean:
            probes = {k: as_clean_patches(x, in_channels, null) for k, (x, _) in probes.items()}
    if cfg.save_every > cfg.steps:
        log.warning("save_every=%d is larger than steps=%d: checkpoints are saved every save_every_minutes=%s and "
                    "at the end", cfg.save_every, cfg.steps, cfg.get("save_every_minutes"))
    ctx = init_workers(str(cfg.device))
    try:
        out.mkdir(parents=True, exist_ok=True)
        if ctx.rank == 0:
            (out / "train.json").write_text(json.dumps(run_record(cfg, scale), indent=1))
            (out / "held_out.json").write_text(json.dumps({"role": cfg.arch.role, "names": held}, indent=1))
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout and DataLoader shuffling only; the data are on disk
        model = build_unet(OmegaConf.to_container(cfg.arch.config, resolve=True))
        if cfg.get("init_from") and not (cfg.resume and (out / "state.pt").exists()):
            init_from(model, str(cfg.init_from))
            log.info("starting from the weights of %s", cfg.init_from)
        model = model.to(ctx.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        step = 0
        if cfg.resume and (out / "state.pt").exists():
            state = load_state(out / "state.pt", ctx.device, cfg.steps)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            step = int(state["step"])
            log.info("resuming %s from step %d", out, step)
        net = DistributedDataParallel(model) if ctx.distributed else model
        sampler = None
        workers = workers_for(cfg.num_workers, dataset, ctx.world_size)
        pin = ctx.device.type == "cuda"
        if isinstance(dataset, TileDataset):  # one batch of tiles per step, keyed by (seed, rank, step)
            tiles = TileSampler(len(dataset), cfg.batch_size, cfg.seed, ctx.rank, step, cfg.steps)
            loader = DataLoader(dataset, batch_sampler=tiles, num_workers=workers, pin_memory=pin,
                                prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
        else:
            sampler = DistributedSampler(dataset, seed=cfg.seed) if ctx.distributed else None
            loader = DataLoader(
                dataset,
                batch_size=cfg.batch_size,
                shuffle=sampler is None,
                sampler=sampler,
                drop_last=len(dataset) >= cfg.batch_size,
                num_workers=workers,
                pin_memory=pin,
            )
        diffusion = make_diffusion(cfg.diffusion_steps, cfg.beta_schedule)
        g = generator(stream_seed(cfg.seed, "train", ctx.rank, step))  # each (seed, rank, resumed step) its own
        scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and ctx.device.type == "cuda")
        log.info(
            "training %s (%d parameters) on %d %s images at scale %g (%d held out), %s, %d loader workers, "
            "from step %d to %d",
            cfg.arch.name,
            sum(p.numel() for p in model.parameters()),
            len(dataset),
            "defect-free (clean pretraining)" if clean else cfg.arch.role,
            scale,
            len(held),
            ctx.device,
            workers,
            step,
            cfg.steps,
        )
        log_file = open(out / "loss.jsonl", "a") if ctx.rank == 0 else None
        bar = progress_bar(total=cfg.steps, initial=step, desc=f"train {cfg.arch.name}",
                           disable=not cfg.progress or ctx.rank)
        window, started, epoch, waited = [], time.perf_counter(), step, 0.0
        minutes = cfg.get("save_every_minutes")
        saved_at = time.monotonic()
        with StopSignals() as signals:
            while step < cfg.steps:
                if sampler is not None:
                    sampler.set_epoch(epoch)
                epoch += 1
                fetched = time.perf_counter()
                for batch in loader:
                    x0, y = unwrap(batch, ctx.device)
                    if clean:
                        x0, y = as_clean_patches(x0, in_channels, null)
                    if cfg.channels_last:
                        x0 = x0.contiguous(memory_format=torch.channels_last)
                    waited += time.perf_counter() - fetched
                    t = torch.randint(0, diffusion.num_steps, (x0.shape[0],), generator=g).to(ctx.device)
                    noise = torch.randn(x0.shape, generator=g).to(ctx.device)
                    if cfg.label_dropout > 0:  # drawn after t and noise: rate 0 leaves the stream untouched
                        y = drop_labels(y, cfg.label_dropout, model.num_classes, g)
                    with autocast(ctx.device.type, cfg.precision):
                        terms = diffusion_loss(net, diffusion, x0, t, noise, y)
                    loss = terms["loss"].mean()
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    step += 1
                    update_ema(ema, model, min(cfg.ema_rate, (1 + step) / (10 + step)))
                    terms = {k: float(v.detach().mean()) for k, v in terms.items()}
                    window.append(terms | {"grad_norm": float(grad_norm)})
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                        elapsed = time.perf_counter() - started
                        rate = len(window) * cfg.batch_size * ctx.world_size / elapsed
                        bar.set_postfix(loss=f"{mean['loss']:.4f}", img_s=f"{rate:.1f}")
                        if log_file:
                            log_file.write(json.dumps({"step": step, **mean, "images_per_s": rate,
                                                       "data_wait": waited / elapsed}) + "\n")
                            log_file.flush()
                        if not math.isfinite(mean["loss"]):
                            raise FloatingPointError(f"loss is {mean['loss']} at step {step}: lower lr")
                        window, started, waited = [], time.perf_counter(), 0.0
                    if ctx.rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
                        sample_grid(ema, cfg, ctx.device, out / "samples" / f"step-{step:07d}.png")
                        if probes:
                            log_held_out(ema, diffusion, probes, cfg, ctx.device, step, out / "held_out.jsonl")
                    stop = signals.requested(ctx)
                    due = minutes is not None and time.monotonic() - saved_at >= 60 * minutes
                    if stop or due or step % cfg.save_every == 0 or step == cfg.steps:
                        save_all(cfg, out, model, ema, opt, step, ctx, scale)
                        saved_at = time.monotonic()
                    if stop:
                        raise TrainInterrupted(stop, step, out)
                    if step >= cfg.steps:
                        break
                    fetched = time.perf_counter()
        bar.close()
        log.info("done: %s (EMA weights: %s)", out, out / "ema.safetensors")
        return out / "ema.safetensors"
    finally:
        shutdown(ctx)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
@stop_on_interrupt("dmgr-train", "rerun the same command to resume from the last saved checkpoint")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except TrainConfigError as exc:
        print(f"dmgr-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainInterrupted as exc:
        print(f"dmgr-train: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)


if __name__ == "__main__":
    main()
