"""Correctness of the GPU path, for a machine with CUDA (never needed by the test suite).

    python -m dmgr.gpu_checks

The same tiny random networks and seeds run the DMGR walk (the `fast` preset) on the CPU in float32 and on
CUDA in each speed setting; prints the largest difference of the final images from the CPU's, and fails
(exit 1) where the fp32 GPU result is not the CPU's within float tolerance or any result is not finite.
"""

from __future__ import annotations

import sys

import torch

from dmgr.bench import GLOBAL_CONFIG, LOCAL_CONFIG, presets
from dmgr.diffusion import make_diffusion
from dmgr.models.acceleration import Acceleration, accelerate
from dmgr.models.unet import set_attention_kernel
from dmgr.sampler import PerSampleNoise, dmgr_sample, initial_noise, make_generators
from dmgr.synth.engine import randomised_unet

SEEDS = list(range(8))


def walk(device: str, precision: str, acceleration: Acceleration) -> torch.Tensor:
    global_model = accelerate(randomised_unet(GLOBAL_CONFIG, 1).requires_grad_(False).to(device), acceleration)
    local_model = accelerate(randomised_unet(LOCAL_CONFIG, 2).requires_grad_(False).to(device), acceleration)
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


def attention_gap(device: str) -> float:
    model = randomised_unet(GLOBAL_CONFIG, 3).requires_grad_(False).to(device)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.tensor([10, 300, 600, 900], device=device)
    set_attention_kernel(model, "classic")
    classic = model(x, t)
    set_attention_kernel(model, "sdpa")
    return float((model(x, t) - classic).abs().max())


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible: nothing to check")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    gap = attention_gap("cuda")
    print(f"UNet output, sdpa against classic attention on CUDA (fp32): max |diff| {gap:.2e}")
    failures = [] if gap < 1e-4 else ["sdpa attention"]
    cpu = walk("cpu", "fp32", Acceleration())
    cases = {
        "cuda fp32, classic attention": ("fp32", Acceleration(attention="classic")),
        "cuda fp32, sdpa": ("fp32", Acceleration()),
        "cuda fp32, sdpa, channels_last": ("fp32", Acceleration(channels_last=True)),
        "cuda bf16, sdpa, channels_last": ("bf16", Acceleration(channels_last=True)),
        "cuda bf16, sdpa, channels_last, compile": ("bf16", Acceleration("default", True, "auto")),
    }
    for name, (precision, acceleration) in cases.items():
        image = walk("cuda", precision, acceleration)
        diff = (image - cpu).abs()
        finite = bool(torch.isfinite(image).all())
        print(f"{name:42s} final image vs CPU fp32: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}, "
              f"finite {finite}")
        if not finite or (precision == "fp32" and diff.mean() > 1e-3):
            failures.append(name)
    print("FAILED: " + ", ".join(failures) if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
