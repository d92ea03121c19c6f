"""Shared fixtures: tiny UNets with non-zero random weights, and the reference fixture folder.

A freshly built guided-diffusion UNet zero-initialises its output layers (it outputs zeros), so every
parameter of the tiny models is redrawn from a fixed generator: the networks then compute something
and the sampler has something to rectify.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dmgr.models import build_unet

FIXTURE_DIR = Path(__file__).parents[1] / ".." / "shared" / "fixtures" / "dmgr-reference"
FIXTURE_NAMES = ("tiny-64px-100steps.pt", "tiny-64px-100steps-timetravel.pt")

# Like the reference architectures, scaled down: resblock up/down, scale-shift norm, learned sigma.
GLOBAL_CONFIG = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",  # ds 2: the second level has attention
    num_heads=2,
    learn_sigma=True,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
LOCAL_CONFIG = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_heads=2,
    learn_sigma=True,
    use_scale_shift_norm=True,
    resblock_updown=True,
    num_classes=6,
)


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Redraw every parameter: normal(0, std), norm scales normal(1, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_scale = name.endswith(".weight") and param.dim() == 1 and "norm" in _module_kind(model, name)
            param.copy_(noise + 1.0 if is_norm_scale else noise)
    return model.eval()


def _module_kind(model: torch.nn.Module, param_name: str) -> str:
    module = model.get_submodule(param_name.rsplit(".", 1)[0])
    return type(module).__name__.lower()


def make_unet(seed: int = 0, **config) -> torch.nn.Module:
    return randomise(build_unet(config), seed)


@pytest.fixture(scope="session")
def unet_factory():
    """make(seed=0, **config) -> a randomised UNet in eval mode."""
    return make_unet


@pytest.fixture(scope="session")
def global_model():
    return make_unet(1, **GLOBAL_CONFIG)


@pytest.fixture(scope="session")
def local_model():
    return make_unet(2, **LOCAL_CONFIG)


def fixture_file(name: str | os.PathLike) -> Path:
    """The path of a reference file; skips (fails under CI=true) when it is absent."""
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = FIXTURE_DIR / path
    if not path.is_file():
        message = (
            f"reference fixture {path.name} not found in {FIXTURE_DIR.resolve()} "
            f"(the folder ../shared/fixtures/dmgr-reference/ next to the repository)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


_LOADED: dict[Path, dict] = {}


@pytest.fixture(scope="session")
def load_reference():
    """load(name) -> the fixture dict (cached); skips or fails as `fixture_file` says when absent."""

    def load(name):
        path = fixture_file(name).resolve()
        if path not in _LOADED:
            _LOADED[path] = torch.load(path, weights_only=True)
        return _LOADED[path]

    return load
