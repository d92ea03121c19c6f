"""Whole walks with each of the algorithm's switches turned off (or, for the weight map, on): each switch changes
what it says it changes and nothing before it takes effect."""

import math

import pytest
import torch

from dmgr.diffusion import ddim_step, make_diffusion, predict_x0
from dmgr.sampler import DMGRSettings, crop_windows, dmgr_sample, model_eps
from dmgr.sampler.loss import multiscale_loss, pixel_loss

W = 16
WINDOWS = torch.tensor([[3, 5], [16, 12]])
CLASSES = torch.tensor([2, 0])


@pytest.fixture(scope="module")
def diffusion10():
    return make_diffusion(1000, "linear", "10")


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(21))


def walk(global_model, local_model, diffusion, x_T, **overrides):
    settings = DMGRSettings(**{"T_s": 7, "T_e": 3, "lr_xt": 0.5, "time_travel": False, **overrides})
    moves = []
    result = dmgr_sample(global_model, local_model, diffusion, x_T, WINDOWS, CLASSES, W, settings,
                         record_trace=True, callback=moves.append)
    return result, moves


def local_ddim(local, c, diffusion, t):
    """The crop's plain DDIM step from t to t - 1 under the local model (no rectification)."""
    with torch.no_grad():
        eps = model_eps(local, c, diffusion.model_timesteps(t, len(c), "cpu"), CLASSES, "fp32")
    return ddim_step(predict_x0(c, eps, diffusion.abar(t)), eps, diffusion.abar(t), diffusion.abar(t - 1))


def crop_is_plain_ddim(result, local, diffusion, t) -> bool:
    """Whether the crop's step at t was the local model's own DDIM step from its state at t + 1."""
    by_t = {e["t"]: e for e in result.trace}
    expected = local_ddim(local, by_t[t + 1]["crop_prev"], diffusion, t)
    return (by_t[t]["crop_prev"] - expected).abs().max().item() <= 1e-6


def test_multistage_off_rectifies_x_at_every_step_and_never_the_crop(global_denoiser, local_denoiser, diffusion10, x_T):
    result, _ = walk(global_denoiser, local_denoiser, diffusion10, x_T, multistage=False)
    assert all(e["loss"].min() > 0 for e in result.trace)  # no free phase: every step is rectified
    # the crop follows its own DDIM throughout: never rectified, and not re-anchored at T_e
    assert all(crop_is_plain_ddim(result, local_denoiser, diffusion10, t) for t in range(8, 0, -1))

    staged, _ = walk(global_denoiser, local_denoiser, diffusion10, x_T)
    assert all(staged.trace[i]["loss"].abs().max() == 0 for i in range(2, 6))  # t = 7..4: free
    assert not crop_is_plain_ddim(staged, local_denoiser, diffusion10, 2)  # resonance moves the crop


def test_gating_off_never_rectifies_the_crop(global_denoiser, local_denoiser, diffusion10, x_T):
    result, _ = walk(global_denoiser, local_denoiser, diffusion10, x_T, gating=False)
    assert all(e["loss"].min() > 0 for e in result.trace if e["t"] <= 3)  # x is still rectified in resonance
    assert all(crop_is_plain_ddim(result, local_denoiser, diffusion10, t) for t in (2, 1))

    gated, _ = walk(global_denoiser, local_denoiser, diffusion10, x_T)
    assert not crop_is_plain_ddim(gated, local_denoiser, diffusion10, 2)
    # without the gates x moves far from the window too: the whole canvas differs from the gated walk
    corner = (slice(None), slice(None), slice(0, 3), slice(29, 32))  # outside both windows
    assert (result.image[corner] - gated.image[corner]).abs().max() > 1e-4


@pytest.mark.parametrize("multiscale", [False, True])
def test_the_walk_minimises_the_loss_it_is_configured_with(global_denoiser, local_denoiser, diffusion10, x_T,
                                                           multiscale):
    """The loss a step reports is the configured loss between the window of the global x0 prediction and the local
    x0 prediction at the step's final point (anchoring: the crop does not move, so its prediction is known)."""
    result, moves = walk(global_denoiser, local_denoiser, diffusion10, x_T, multiscale_loss=multiscale)
    first = moves[0]
    assert (first["kind"], first["t"]) == ("reverse", 9)
    crop = crop_windows(x_T, WINDOWS, W)
    with torch.no_grad():
        eps_l = model_eps(local_denoiser, crop, diffusion10.model_timesteps(9, 2, "cpu"), CLASSES, "fp32")
    x0_l = predict_x0(crop, eps_l, diffusion10.abar(9))
    window = crop_windows(first["x0"], WINDOWS, W)
    pixel, spectral = pixel_loss(window, x0_l), multiscale_loss(window, x0_l, math.sqrt(diffusion10.abar(9)))
    expected, other = (spectral, pixel) if multiscale else (pixel, spectral)
    torch.testing.assert_close(first["loss"], expected, rtol=1e-5, atol=0)
    assert ((first["loss"] - other).abs() > 1e-3 * expected).all()


def test_loss_weight_map_acts_from_T_e_and_only_when_on(global_denoiser, local_denoiser, diffusion10, x_T):
    plain, _ = walk(global_denoiser, local_denoiser, diffusion10, x_T)
    weighted, _ = walk(global_denoiser, local_denoiser, diffusion10, x_T, use_loss_weight=True, loss_weight_until=1)
    by_t = lambda result: {e["t"]: e for e in result.trace}  # noqa: E731
    a, b = by_t(plain), by_t(weighted)
    for t in range(9, 3, -1):  # above T_e = 3 the map does not exist yet: the same run, bit for bit
        assert torch.equal(a[t]["x_prev"], b[t]["x_prev"]) and torch.equal(a[t]["loss"], b[t]["loss"])
    for t in (3, 2, 1):  # from T_e on the loss is weighted by the disagreement map (entries in [0, 1])
        assert (a[t]["loss"] - b[t]["loss"]).abs().max() > 1e-6
    assert (weighted.image - plain.image).abs().max() > 1e-4 and torch.isfinite(weighted.image).all()

    # an empty interval (loss_weight_until above T_e) never builds the map: the unweighted walk
    empty, _ = walk(global_denoiser, local_denoiser, diffusion10, x_T, use_loss_weight=True, loss_weight_until=4)
    assert torch.equal(empty.image, plain.image)
