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

# The tiny models gain nothing from intra-op threads, and OpenMP threads spinning on shared cores can slow a
# run down a hundredfold (seen with training jobs running alongside): one thread unless DMGR_TEST_THREADS is set.
torch.set_num_threads(int(os.environ.get("DMGR_TEST_THREADS", "1")))

# Slow tests (real job processes, whole sampling runs, training) carry `pytest.mark.slow` where they are defined
# (`pytestmark` for a whole module): `make test-fast` (-m "not slow") runs everything else; `make test` runs all.


# The longest modules, longest first (`pytest --durations`). `make test` runs two pytest workers that take a
# module each (`-n 2 --dist loadfile`, so module fixtures are made once) in collection order: starting with
# the long ones keeps one of them from being the last to start while the other worker sits idle.
LONGEST_FIRST = (
    "test_eval_job", "test_eval_panels", "test_synth_reliability", "test_synth_job", "test_slurm", "test_synth_screen",
    "test_packaging", "test_synth_backgrounds", "test_native_size", "test_exports_libraries", "test_reference_parity",
    "test_sampler_dmgr", "test_train", "test_bench",
    "test_sweep", "test_own_product", "test_eval_sources",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: order within a module kept


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


class GaussianDenoiser(torch.nn.Module):
    """A stand-in for a trained model: the exact epsilon for N(0, data_std^2) images plus a small random UNet.

    The sampler's dynamics with it are as tame as with a trained model (a bare random UNet is a chaotic map
    that amplifies float rounding by orders of magnitude per step), so runs that differ only by the batch
    they share can be compared to 1e-5. The UNet term keeps it class- and content-dependent.
    """

    def __init__(self, unet: torch.nn.Module, scale: float = 0.1, data_std: float = 0.5, diffusion_steps: int = 1000):
        super().__init__()
        self.unet, self.scale, self.var = unet, scale, data_std**2
        self.num_classes = getattr(unet, "num_classes", None)
        betas = torch.linspace(1e-4 * 1000 / diffusion_steps, 0.02 * 1000 / diffusion_steps, diffusion_steps)
        self.register_buffer("abar", torch.cumprod(1 - betas.double(), 0).float())

    def forward(self, x, timesteps, y=None):
        out = self.unet(x, timesteps, y)
        abar = self.abar[timesteps].view(-1, 1, 1, 1).to(x.dtype)
        eps = (1 - abar).sqrt() * x / (abar * self.var + 1 - abar)
        return torch.cat([eps + self.scale * out[:, :3], out[:, 3:]], dim=1)


@pytest.fixture(scope="session")
def global_denoiser():
    return GaussianDenoiser(make_unet(3, **GLOBAL_CONFIG)).eval()


@pytest.fixture(scope="session")
def local_denoiser():
    return GaussianDenoiser(make_unet(4, **LOCAL_CONFIG)).eval()


class OneByOne(torch.nn.Module):
    """Evaluates a model one sample at a time.

    CPU convolutions round differently for different batch sizes (~1e-6), and the sampler evaluates
    backtracking candidates on the subset of samples still pending. With this wrapper a sample's numbers no
    longer depend on its batch-mates at all, so per-sample independence can be checked exactly even where
    backtracking decisions would amplify rounding differences.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, timesteps, y=None):
        return torch.cat(
            [self.model(x[i : i + 1], timesteps[i : i + 1], None if y is None else y[i : i + 1]) for i in range(len(x))]
        )
