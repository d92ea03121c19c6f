"""Speed of the DMGR sampler: seconds per image, network passes per reverse step, FLOPs and the FLOP bound.

    python -m dmgr.bench [--batch 4] [--images N] [--presets paper,fast] [--weights random|FILE]
                         [--device cpu|cuda] [--models tiny|paper] [--precision bf16] [--channels-last]
                         [--compile default] [--attention auto|classic|sdpa] [--cudnn-benchmark]
                         [--profile] [--json FILE]

`--models tiny` (the CPU default) has the architecture of the reference fixture (global 64 px, 32 channels,
mult 1,2,2, attention at 8; local 16 px, 6 classes); `--models paper` (the CUDA default) the architecture of
docs/algorithm.md (conf/model/paper.yaml: global 256 px, local 64 px). Weights are random and non-zero, or the
trained weights of a file in the reference fixture's format (`{global,local}_config` and `_state_dict`, e.g.
the parity fixture ../shared/fixtures/dmgr-reference/tiny-64px-100steps.pt): speed does not depend on the
values, the number of backtracking retries does a little.

`--profile` also prints where the time of one rectified step's passes goes (a forward with graph, its
input-gradient backward and a forward without graph of each network, at the timed batch), by operator,
from torch.profiler: the operators that the FLOP count does not see (norms, activations, casts, layout
copies) show up there.

FLOPs are counted by torch.utils.flop_counter for one sample's forward and input-gradient backward of each
network, times the passes the run made; the bound is that count at --peak-tflops (default on CUDA: 989, the
dense bf16 peak of an H100/H200 SXM).

Presets are the job's own schedule configs, conf/schedule/paper.yaml (respacing 250, T_s 150, T_e 40, K 2,
time travel jump 10 x 2) and conf/schedule/fast.yaml (respacing 50, T_s 30, T_e 8, K 2, no time travel).
Window = image / 4, gate radius 9 * window / 64 (9 px for the reference's 64 px window).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from dmgr.cli import add_settings, program, settings_from, usage_error
from dmgr.diffusion import make_diffusion, time_walk
from dmgr.models import build_unet
from dmgr.models.performance import PerformanceSettings, accelerate
from dmgr.models.precision import PRECISIONS
from dmgr.sampler import DMGRSettings, PassCounter, PerSampleNoise, dmgr_sample, initial_noise, make_generators
from dmgr.sampler.dmgr import model_eps
from dmgr.schema import STRICT_SECTION, Count, Flag
from dmgr.synth.config import SynthSettings
from dmgr.synth.engine import randomised_unet

GLOBAL_CONFIG = dict(
    image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="8", num_heads=2,
    learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
)
LOCAL_CONFIG = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8", num_heads=2,
    learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True, num_classes=6,
)
PHASES = ("anchoring", "free", "resonance")
DEFAULT_IMAGES = {"fast": None, "paper": 1}  # None: one batch
PASS_KINDS = (
    ("forward_grad_global", "fwd G grad"),
    ("forward_global", "fwd G"),
    ("forward_grad_local", "fwd L grad"),
    ("forward_local", "fwd L"),
    ("backward", "backward"),
)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The options of `python -m dmgr.bench` (with the job's `performance` section, `PerformanceSettings`)."""

    __pydantic_config__ = STRICT_SECTION
    batch: Annotated[Count(), Field(description="samples per sampler call (the job's batch_size)")] = (
        SynthSettings.batch_size)
    images: Annotated[Count() | None, Field(
        description="images per preset, run in batches of --batch (default: one batch for fast, 1 image for paper, "
        "which keeps the default run to a few minutes on 2 cores)")] = None
    presets: Annotated[str, Field(description="comma-separated: fast, paper")] = "fast,paper"
    weights: Annotated[str, Field(description="random, or a reference-fixture-format .pt")] = "random"
    threads: Annotated[Count() | None, Field(description="torch CPU threads (default: torch's choice)")] = None
    seed: Annotated[Count(0), Field(description="the first sample's seed")] = 0
    device: Annotated[str, Field(description="cpu or cuda[:N]")] = "cpu"
    models: Annotated[Literal["tiny", "paper"] | None, Field(
        description="architecture of the random weights (default: tiny on cpu, paper on cuda)")] = None
    precision: Annotated[Literal[PRECISIONS], Field(description="autocast for the networks")] = SynthSettings.precision
    profile: Annotated[Flag, Field(
        description="print the operators that take the time of one rectified step's passes")] = False
    cudnn_benchmark: Annotated[Flag, Field(
        description="let cuDNN time its convolution algorithms (faster; a GPU run's last bits may then "
        "differ from run to run)")] = False
    json: Annotated[Path | None, Field(description="also write the results to this file")] = None
    peak_tflops: Annotated[float | None, Field(
        gt=0, description="the device's peak for the FLOP bound (default: 989 on cuda, none on cpu)")] = None


# Help of the `performance` options (PerformanceSettings, dmgr/models/performance.py, documents them in comments).
ACCELERATION_HELP = {
    "compile": "torch.compile mode of both networks",
    "channels_last": "NHWC weights and activations",
    "attention": "attention kernel: auto (sdpa on CUDA, classic on CPU), classic or sdpa",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    respacing: str
    settings: DMGRSettings


def presets(window: int) -> dict[str, Preset]:
    """The `paper` and `fast` schedules exactly as the synthesis job composes and validates them."""
    from hydra import compose, initialize_config_dir

    from dmgr import CONF_DIR
    from dmgr.synth.config import schedule_settings

    found = {}
    for name in ("paper", "fast"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="synth", overrides=[f"schedule={name}", "model=tiny_random"])
        found[name] = Preset(name, str(cfg.schedule.respacing), schedule_settings(cfg, window))
    return found


def load_models(weights: str, architecture: str = "tiny") -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """`random` (with the `tiny` or `paper` architecture), or the path of a file holding
    `{global,local}_config` and `{global,local}_state_dict`."""
    if weights != "random":
        path = Path(weights)
        if not path.is_file():
            raise SystemExit(f"--weights {weights}: no such file (give `random` or a reference-fixture .pt)")
        ref = torch.load(path, weights_only=True)
        models = []
        for which in ("global", "local"):
            model = build_unet(ref[f"{which}_config"])
            model.load_state_dict(ref[f"{which}_state_dict"], strict=True)
            models.append(model.eval())
        return models[0], models[1], f"trained weights of {path.name}"
    if architecture == "paper":
        from omegaconf import OmegaConf

        from dmgr import CONF_DIR

        paper = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "paper.yaml"))
        configs = paper["global"]["config"], paper["local"]["config"]
    else:
        configs = GLOBAL_CONFIG, LOCAL_CONFIG
    global_model = randomised_unet(configs[0], 1)
    local_model = randomised_unet(configs[1], 2)
    return global_model, local_model, f"random non-zero weights, {architecture} architecture"


def example_inputs(model: torch.nn.Module, batch: int, device: str, timestep: int = 0) -> tuple:
    """(x, t, y) of the shapes `model` takes: noise, one timestep for all, class 0 if it is conditional."""
    config = model.config
    x = torch.randn(batch, model.in_channels, config.image_size, config.image_size, device=device)
    t = torch.full((batch,), timestep, dtype=torch.long, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if config.num_classes else None
    return x, t, y


def flops_per_sample(model: torch.nn.Module, device: str, precision: str) -> tuple[float, float]:
    """(forward, input-gradient backward) FLOPs of one sample through `model`."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y = example_inputs(model, 1, device)
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model_eps(model, x, t, y, precision)
    with FlopCounterMode(display=False) as both:
        model_eps(model, x, t, y, precision).sum().backward()  # weights frozen: input gradient only
    return forward.get_total_flops(), both.get_total_flops() - forward.get_total_flops()


def run_flops(counts: dict, runs: int, flops: dict) -> float:
    """FLOPs per image of a run: every counted pass (each covers the whole batch) at per-sample cost; a
    backward goes through the global network, and through the local one in phases that optimise the crop."""
    total = 0.0
    for phase_counts in counts.values():
        local_grad = phase_counts.get("forward_grad_local", 0) > 0
        for kind, n in phase_counts.items():
            if kind == "backward":
                total += n * (flops["global"][1] + (flops["local"][1] if local_grad else 0.0))
            else:
                total += n * flops["local" if kind.endswith("local") else "global"][0]
    return total / runs


def reference_structure_flops(result: dict, flops: dict) -> float:
    """FLOPs per image the reference's pass structure would spend on the same walk and the same backtracking
    (docs/performance.md "Network passes"): per rectification 3 forwards with gradient and 2 + retries without,
    of each network, and 2 backwards through both; per free step one forward of each."""
    counts, steps = result["counts"], result["steps"]
    rectifications = (steps["anchoring"] + steps["resonance"] + result["pre_undo"]) * result["runs"]
    global_forwards = sum(counts.get(phase, {}).get(kind, 0) for phase in ("anchoring", "resonance")
                          for kind in ("forward_grad_global", "forward_global"))
    retries = global_forwards - 3 * rectifications  # our structure: 3 global forwards per rectification + retries
    forward = flops["global"][0] + flops["local"][0]
    backward = flops["global"][1] + flops["local"][1]
    free = steps["free"] * result["runs"]
    return ((5 * rectifications + retries) * forward + 2 * rectifications * backward + free * forward) / result["runs"]


def reverse_steps_per_phase(settings: DMGRSettings, num_steps: int) -> tuple[dict[str, int], int, int]:
    """Reverse steps of the walk by phase of their index t, undo count, optimise-before-undo passes."""
    walk = time_walk(num_steps, settings.time_travel, settings.jump_length, settings.jump_n_sample)
    steps = dict.fromkeys(PHASES, 0)
    undos = pre_undo = 0
    previous = None
    for t, target in zip(walk[:-1], walk[1:]):
        if target < t:
            steps[settings.phase(t)] += 1
            previous = "reverse"
        else:
            undos += 1
            if previous == "reverse" and settings.optimise_before_undo and settings.phase(t) != "free":
                pre_undo += 1
            previous = "undo"
    return steps, undos, pre_undo


def warm_up(global_model, local_model, batch: int, device: str, precision: str) -> None:
    """One short rectified walk at the timed batch size, so that compilation, autotuning and the CUDA
    allocator's first growth fall outside the timing."""
    settings = DMGRSettings(T_s=6, T_e=2, time_travel=False, gate_every=1, loss_weight_until=1)
    preset = Preset("warm-up", "10", settings)
    run_preset(preset, global_model, local_model, batch, batch, 10**6, device, precision)


def profile_passes(global_model, local_model, batch: int, device: str, precision: str, rows: int = 25) -> str:
    """torch.profiler's table, by operator and sorted by own device time, of one rectified step's passes of
    each network at `batch`: a forward with graph, its input-gradient backward, a forward without graph."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    inputs = [(model, *example_inputs(model, batch, device, timestep=500)) for model in (global_model, local_model)]

    def passes():
        for model, x, t, y in inputs:
            x = x.clone().requires_grad_(True)
            torch.autograd.grad(model_eps(model, x, t, y, precision).square().sum(), x)
            with torch.no_grad():
                model_eps(model, x, t, y, precision)
        synchronize(device)

    passes()  # first-call costs (allocator, autotuning, compilation) outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        passes()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    title = f"where one rectified step's passes spend their time (batch {batch}, both networks):"
    return title + "\n" + prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60) + "\n"


def run_preset(preset, global_model, local_model, batch, images, seed, device="cpu", precision="fp32") -> dict:
    size = global_model.config.image_size
    window = local_model.config.image_size
    num_classes = local_model.config.num_classes or 1
    diffusion = make_diffusion(1000, "linear", preset.respacing)
    counter = PassCounter()
    margin = max(1, round(20 * size / 256))  # the reference draws windows in [20, 256 - 64 - 20)
    seconds, done = 0.0, 0
    while done < images:
        n = min(batch, images - done)
        seeds = [seed + done + i for i in range(n)]
        generators = make_generators(seeds)
        x_T = initial_noise(generators, (3, size, size), device)
        placement = torch.Generator().manual_seed(seed + 10_000 + done)
        windows = torch.randint(margin, max(margin + 1, size - window - margin), (n, 2), generator=placement)
        classes = torch.randint(0, num_classes, (n,), generator=placement)
        synchronize(device)
        start = time.perf_counter()
        dmgr_sample(
            global_model, local_model, diffusion, x_T, windows.to(device), classes.to(device), window,
            preset.settings, PerSampleNoise(generators), counter=counter, precision=precision,
        )
        synchronize(device)
        seconds += time.perf_counter() - start
        done += n
    runs = math.ceil(images / batch)
    steps, undos, pre_undo = reverse_steps_per_phase(preset.settings, diffusion.num_steps)
    return dict(seconds=seconds, images=images, runs=runs, batch=batch, steps=steps, undos=undos, pre_undo=pre_undo,
                counts=counter.counts, num_steps=diffusion.num_steps)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), line, *map(fmt, rows)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.bench"), description=__doc__.split("\n\n")[0])
    add_settings(p, BenchSettings)
    add_settings(p, PerformanceSettings, help=ACCELERATION_HELP)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--train" in argv:  # the training benchmark: dmgr/bench_train.py
        from dmgr.bench_train import main as bench_train

        return bench_train([a for a in argv if a != "--train"])
    cli = parser()
    parsed = cli.parse_args(argv)
    args = settings_from(cli, parsed, BenchSettings)
    performance = settings_from(cli, parsed, PerformanceSettings)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        usage_error(cli.prog, f"--device {device}: no CUDA device is visible here")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    architecture = args.models or ("paper" if device.startswith("cuda") else "tiny")
    peak = args.peak_tflops or (989.0 if device.startswith("cuda") else None)

    global_model, local_model, source = load_models(args.weights, architecture)
    global_model.requires_grad_(False)
    local_model.requires_grad_(False)
    flops = {
        "global": flops_per_sample(global_model.to(device), device, args.precision),
        "local": flops_per_sample(local_model.to(device), device, args.precision),
    }
    global_model = accelerate(global_model, performance)
    local_model = accelerate(local_model, performance)
    window = local_model.config.image_size
    available = presets(window)
    chosen = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        usage_error(cli.prog, f"unknown presets {unknown}: choose from {sorted(available)}")

    size = global_model.config.image_size
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"DMGR sampler benchmark: torch {torch.__version__}, {where}; precision {args.precision}, "
          f"channels_last {performance.channels_last}, compile {performance.compile}, "
          f"attention {performance.attention}, "
          f"cudnn benchmark {args.cudnn_benchmark}")
    print(f"models: {source}; global {size}px, local {window}px ({local_model.config.num_classes} classes); "
          f"window {window}px, gate radius {9 * window / 64:g}px")
    print(f"GFLOP per sample: global forward {flops['global'][0] / 1e9:.1f}, backward {flops['global'][1] / 1e9:.1f}; "
          f"local forward {flops['local'][0] / 1e9:.1f}, backward {flops['local'][1] / 1e9:.1f}")
    print()

    results = {}
    for name in chosen:
        images = args.images or DEFAULT_IMAGES.get(name, args.batch) or args.batch
        batch = min(args.batch, images)
        if device.startswith("cuda") or performance.compile != "off":
            print(f"warming up at batch {batch} ...", flush=True)
            start = time.perf_counter()
            warm_up(global_model, local_model, batch, device, args.precision)
            print(f"warm-up (with any compilation) took {time.perf_counter() - start:.1f} s", flush=True)
        if args.profile and name == chosen[0]:
            print(profile_passes(global_model, local_model, batch, device, args.precision), flush=True)
        print(f"running {name}: {images} image(s) in batches of {batch} ...", flush=True)
        results[name] = r = run_preset(
            available[name], global_model, local_model, batch, images, args.seed, device, args.precision
        )
        r.update(seconds_per_image=r["seconds"] / r["images"],
                 tflop_per_image=run_flops(r["counts"], r["runs"], flops) / 1e12,
                 reference_tflop_per_image=reference_structure_flops(r, flops) / 1e12)
        print(f"{name}: {r['seconds']:.2f} s, {r['seconds_per_image']:.2f} s/image", flush=True)
    print()

    rows = []
    for name, r in results.items():
        s = available[name].settings
        reverse = sum(r["steps"].values())
        rows.append([
            name, available[name].respacing, f"{s.T_s}/{s.T_e}", s.iterations, r["batch"], r["images"],
            f"jump {s.jump_length}x{s.jump_n_sample}" if s.time_travel else "off",
            reverse, r["undos"], f"{r['seconds']:.2f}", f"{r['seconds_per_image']:.2f}",
            f"{1000 * r['seconds'] / (reverse * r['runs']):.1f}",
        ])
    header = ["preset", "respacing", "T_s/T_e", "K", "batch", "images", "time travel", "reverse steps", "undos",
              "total s", "s/image", "ms/reverse step"]
    print(table(rows, header))
    print()

    rows = []
    for name, r in results.items():
        per_image, achieved = r["tflop_per_image"], r["tflop_per_image"] / r["seconds_per_image"]
        bound = [f"{per_image / peak:.2f}", f"{achieved / peak:.1%}"] if peak else ["-", "-"]
        rows.append([name, f"{per_image:.2f}", f"{r['seconds_per_image']:.2f}", f"{achieved:.2f}", *bound])
    print("FLOPs per image (passes actually made x per-sample FLOPs of each network) and the FLOP bound"
          + (f" at {peak:g} TFLOP/s:" if peak else " (no --peak-tflops given):"))
    print(table(rows, ["preset", "TFLOP/image", "s/image", "TFLOP/s achieved", "s/image at peak", "of bound"]))
    print()

    rows = []
    for name, r in results.items():
        ours, reference = r["tflop_per_image"], r["reference_tflop_per_image"]
        rows.append([name, f"{1000 * ours:.1f}", f"{1000 * reference:.1f}", f"{reference / ours:.2f}x"])
    print("against the reference's pass structure on the same walk and backtracking (per rectification 3")
    print("forwards with gradient, 2 + retries without, of each network, 2 backwards through both):")
    print(table(rows, ["preset", "GFLOP/image", "reference GFLOP/image", "reference / ours"]))
    print()

    rows = []
    for name, r in results.items():
        for phase in PHASES:
            n = r["steps"][phase]
            if n == 0:
                continue
            counts = r["counts"].get(phase, {})
            per_step = [f"{counts.get(kind, 0) / (n * r['runs']):.2f}" for kind, _ in PASS_KINDS]
            rows.append([name, phase, n, *per_step])
    print("network passes per reverse step (whole batch per pass; rectified steps also count their backtracking")
    print("retries, and the time-travel presets their optimise-before-undo passes, which are not reverse steps):")
    print(table(rows, ["preset", "phase", "reverse steps", *[label for _, label in PASS_KINDS]]))
    notes = [f"{name}: {r['pre_undo']} optimise-before-undo passes" for name, r in results.items() if r["pre_undo"]]
    if notes:
        print("(" + "; ".join(notes) + ")")
    if args.json:
        setting = dict(device=where, torch=torch.__version__, precision=args.precision, models=architecture,
                       channels_last=performance.channels_last, compile=performance.compile,
                       attention=performance.attention,
                       cudnn_benchmark=args.cudnn_benchmark, weights=source)
        args.json.write_text(json.dumps(dict(setting=setting, presets=results), indent=1))


if __name__ == "__main__":
    main()
