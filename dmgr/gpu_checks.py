"""Correctness of the GPU path, for a machine with CUDA (never needed by the test suite).

    python -m dmgr.gpu_checks

For each speed setting on CUDA: both tiny random networks' outputs against the CPU's in float32 (they must
agree within 1e-4 of the output's range in fp32, 3e-2 under bf16 autocast), and a whole DMGR walk (the
`fast` preset) that must stay finite. The walk's distance from the CPU's walk is printed, not checked: with
random networks the rectified walk is chaotic (rounding flips line-search decisions), and the CPU's own
walks at 1 and 2 threads are as far apart (mean |difference| 0.28 of the [-1, 1] range on this preset).
"""

from __future__ import annotations

import argparse
import sys

import torch

from dmgr.bench import GLOBAL_CONFIG, LOCAL_CONFIG, presets
from dmgr.diffusion import make_diffusion
from dmgr.models.performance import PerformanceSettings, accelerate
from dmgr.models.precision import autocast
from dmgr.models.unet import set_attention_kernel
from dmgr.sampler import PerSampleNoise, dmgr_sample, initial_noise, make_generators
from dmgr.synth.engine import randomised_unet

SEEDS = list(range(8))


def walk(device: str, precision: str, performance: PerformanceSettings) -> torch.Tensor:
    global_model = accelerate(randomised_unet(GLOBAL_CONFIG, 1).requires_grad_(False).to(device), performance)
    local_model = accelerate(randomised_unet(LOCAL_CONFIG, 2).requires_grad_(False).to(device), performance)
    settings = presets(16)["fast"].settings
    generators = make_generators(SEEDS)
    x_T = initial_noise(generators, (3, 64, 64), device)
    windows = torch.tensor([[8 + 4 * i, 40 - 4 * i] for i in range(len(SEEDS))], device=device)
    classes = torch.arange(len(SEEDS), device=device) % 6
    result = dmgr_sample(
        global_model, local_model, make_diffusion(1000, "linear", "50"), x_T, windows, classes, 16, settings,
        PerSampleNoise(generators), precision=precision,
    )
    return result.image.float().cpu()


def network_gap(precision: str, performance: PerformanceSettings) -> float:
    """Largest |difference| of both networks' outputs, CUDA in this setting against the CPU in fp32, relative
    to the largest |output|."""
    gap = 0.0
    for config, seed, y in ((GLOBAL_CONFIG, 1, None), (LOCAL_CONFIG, 2, torch.tensor([0, 3, 5, 1]))):
        size = config["image_size"]
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
        t = torch.tensor([10, 300, 600, 900])
        with torch.no_grad():
            expected = randomised_unet(config, seed)(x, t, y)
            model = accelerate(randomised_unet(config, seed).requires_grad_(False).cuda(), performance)
            with autocast("cuda", precision):
                out = model(x.cuda(), t.cuda(), None if y is None else y.cuda())
        gap = max(gap, float((out.float().cpu() - expected).abs().max() / expected.abs().max()))
    return gap


def attention_gap(device: str) -> float:
    model = randomised_unet(GLOBAL_CONFIG, 3).requires_grad_(False).to(device)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.tensor([10, 300, 600, 900], device=device)
    set_attention_kernel(model, "classic")
    classic = model(x, t)
    set_attention_kernel(model, "sdpa")
    return float((model(x, t) - classic).abs().max())


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="dmgr-gpu-checks", description=__doc__.split("\n\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device visible: nothing to check")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    gap = attention_gap("cuda")
    print(f"UNet output, sdpa against classic attention on CUDA (fp32): max |diff| {gap:.2e}")
    failures = [] if gap < 1e-4 else ["sdpa attention"]
    cpu = walk("cpu", "fp32", PerformanceSettings())
    cases = {
        "cuda fp32, classic attention": ("fp32", PerformanceSettings(attention="classic")),
        "cuda fp32, sdpa": ("fp32", PerformanceSettings()),
        "cuda fp32, sdpa, channels_last": ("fp32", PerformanceSettings(channels_last=True)),
        "cuda bf16, sdpa, channels_last": ("bf16", PerformanceSettings(channels_last=True)),
        "cuda bf16, sdpa, channels_last, compile": ("bf16", PerformanceSettings("default", True, "auto")),
    }
    for name, (precision, performance) in cases.items():
        gap = network_gap(precision, performance)
        image = walk("cuda", precision, performance)
        finite = bool(torch.isfinite(image).all())
        print(f"{name:42s} networks vs CPU: max relative |diff| {gap:.1e}; walk finite {finite}, "
              f"mean |diff| from the CPU walk {(image - cpu).abs().mean():.2f}")
        if not finite or gap > (1e-4 if precision == "fp32" else 3e-2):
            failures.append(name)
    print("FAILED: " + ", ".join(failures) if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
