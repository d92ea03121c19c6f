"""Speed of the DMGR sampler on small models: seconds per image and network passes per reverse step.

    python -m dmgr.bench [--batch 4] [--images N] [--presets paper,fast] [--weights random|FILE]

The models have the architecture of the reference fixture (global 64 px, 32 channels, mult 1,2,2, attention
at 8; local 16 px, 6 classes) with random non-zero weights, or the trained weights of a file in the reference
fixture's format (`{global,local}_config` and `_state_dict`, e.g. the parity fixture
../shared/fixtures/dmgr-reference/tiny-64px-100steps.pt): speed does not depend on the values, the number of
backtracking retries does a little.

Presets are the job's own schedule configs, conf/schedule/paper.yaml (respacing 250, T_s 150, T_e 40, K 2,
time travel jump 10 x 2) and conf/schedule/fast.yaml (respacing 50, T_s 30, T_e 8, K 2, no time travel).
Window = image / 4, gate radius 9 * window / 64 (9 px for the reference's 64 px window).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import time
from pathlib import Path

import torch

from dmgr.diffusion import make_diffusion, time_walk
from dmgr.models import build_unet
from dmgr.sampler import DMGRSettings, PassCounter, PerSampleNoise, dmgr_sample, initial_noise, make_generators
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
class Preset:
    name: str
    respacing: str
    settings: DMGRSettings


def presets(window: int) -> dict[str, Preset]:
    """The `paper` and `fast` schedules exactly as the synthesis job composes and validates them."""
    from hydra import compose, initialize_config_dir

    from dmgr import CONF_DIR
    from dmgr.synth.config import sampler_settings

    found = {}
    for name in ("paper", "fast"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="synth", overrides=[f"schedule={name}", "model=tiny_random"])
        found[name] = Preset(name, str(cfg.schedule.respacing), sampler_settings(cfg, window))
    return found


def load_models(weights: str) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """`random`, or the path of a file holding `{global,local}_config` and `{global,local}_state_dict`."""
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
    global_model = randomised_unet(GLOBAL_CONFIG, 1)
    local_model = randomised_unet(LOCAL_CONFIG, 2)
    return global_model, local_model, "random non-zero weights"


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


def run_preset(preset, global_model, local_model, batch, images, seed) -> dict:
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
        x_T = initial_noise(generators, (3, size, size), "cpu")
        placement = torch.Generator().manual_seed(seed + 10_000 + done)
        windows = torch.randint(margin, max(margin + 1, size - window - margin), (n, 2), generator=placement)
        classes = torch.randint(0, num_classes, (n,), generator=placement)
        start = time.perf_counter()
        dmgr_sample(
            global_model, local_model, diffusion, x_T, windows, classes, window, preset.settings,
            PerSampleNoise(generators), counter=counter,
        )
        seconds += time.perf_counter() - start
        done += n
    runs = math.ceil(images / batch)
    steps, undos, pre_undo = reverse_steps_per_phase(preset.settings, diffusion.num_steps)
    return dict(seconds=seconds, images=images, runs=runs, batch=batch, steps=steps, undos=undos, pre_undo=pre_undo,
                counts=counter.counts, num_steps=diffusion.num_steps)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), line, *map(fmt, rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmgr.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="samples per sampler call (default 4)")
    parser.add_argument(
        "--images", type=int, default=None,
        help="images per preset, run in batches of --batch (default: one batch for fast, 1 image for paper, "
        "which keeps the default run to a few minutes on 2 cores)",
    )
    parser.add_argument("--presets", default="fast,paper", help="comma-separated: fast, paper (default both)")
    parser.add_argument("--weights", default="random", help="random (default) or a reference-fixture-format .pt")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch < 1 or (args.images is not None and args.images < 1):
        parser.error("--batch and --images must be positive")

    global_model, local_model, source = load_models(args.weights)
    window = local_model.config.image_size
    available = presets(window)
    chosen = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        parser.error(f"unknown presets {unknown}: choose from {sorted(available)}")

    size = global_model.config.image_size
    print(f"DMGR sampler benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, CPU float32")
    print(f"models: {source}; global {size}px, local {window}px ({local_model.config.num_classes} classes); "
          f"window {window}px, gate radius {9 * window / 64:g}px")
    print()

    results = {}
    for name in chosen:
        images = args.images or DEFAULT_IMAGES.get(name, args.batch) or args.batch
        batch = min(args.batch, images)
        print(f"running {name}: {images} image(s) in batches of {batch} ...", flush=True)
        results[name] = run_preset(available[name], global_model, local_model, batch, images, args.seed)
    print()

    rows = []
    for name, r in results.items():
        s = available[name].settings
        reverse = sum(r["steps"].values())
        rows.append([
            name, available[name].respacing, f"{s.T_s}/{s.T_e}", s.iterations, r["batch"], r["images"],
            f"jump {s.jump_length}x{s.jump_n_sample}" if s.time_travel else "off",
            reverse, r["undos"], f"{r['seconds']:.2f}", f"{r['seconds'] / r['images']:.2f}",
            f"{1000 * r['seconds'] / (reverse * r['runs']):.1f}",
        ])
    header = ["preset", "respacing", "T_s/T_e", "K", "batch", "images", "time travel", "reverse steps", "undos",
              "total s", "s/image", "ms/reverse step"]
    print(table(rows, header))
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


if __name__ == "__main__":
    main()
