"""Spatial gates, the Laplacian pyramid, the dynamic multi-scale loss and the disagreement map."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmgr.sampler.gates import crop_gate, global_gate
from dmgr.sampler.loss import (
    disagreement_map,
    laplacian_pyramid,
    multiscale_loss,
    pixel_loss,
    pyramid_weights,
    rectification_loss,
)


def distances(height, width, cx, cy):
    ys, xs = torch.meshgrid(torch.arange(height).double(), torch.arange(width).double(), indexing="ij")
    return torch.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)


# ---------------------------------------------------------------- G_x


def test_global_gate_noisy_falloff_is_flat():
    gate = global_gate(32, 48, torch.tensor([[10, 12], [30, 20]]), 3.0, 1e-6)
    assert gate.shape == (2, 1, 32, 48)
    assert gate.min() > 0.99 and gate.max() <= 1.0


def test_global_gate_clean_falloff_concentrates():
    centers = torch.tensor([[10, 12], [30, 20]])
    radius = 3.0
    gate = global_gate(32, 48, centers, radius, 1.0)
    for i, (cx, cy) in enumerate(centers.tolist()):
        d = distances(32, 48, cx, cy)
        assert (gate[i, 0][d <= radius] == 1).all()
        far = d > radius + 3 * radius / math.sqrt(2 * math.log(2))
        assert far.any() and gate[i, 0][far].max() < 0.1
    # each sample has its own centre
    assert gate[0, 0, 12, 10] == 1 and gate[1, 0, 12, 10] < 0.1


@pytest.mark.parametrize("falloff", [0.05, 0.5, 1.0])
def test_global_gate_closed_form(falloff):
    radius = 4.0
    gate = global_gate(24, 24, torch.tensor([[9, 14]]), radius, falloff)[0, 0].double()
    d = distances(24, 24, 9, 14)
    s = radius / math.sqrt(2 * math.log(1 + falloff))
    expected = torch.where(d <= radius, torch.ones_like(d), torch.exp(-((d - radius) ** 2) / (2 * s**2)))
    torch.testing.assert_close(gate, expected, atol=1e-5, rtol=1e-4)


def test_global_gate_narrows_as_falloff_grows():
    centers = torch.tensor([[16, 16]])
    sums = [global_gate(32, 32, centers, 3.0, f).sum().item() for f in (1e-6, 0.01, 0.1, 0.5, 1.0)]
    assert sums == sorted(sums, reverse=True) and sums[0] > sums[-1] * 5


# ---------------------------------------------------------------- G_c


def crop_expected(size, falloff):
    d = distances(size, size, size // 2, size // 2)
    radius = max(int(0.45 * size), int(0.5 * size * falloff))
    s = radius / math.sqrt(2 * math.log(2 - falloff))
    shape = torch.where(d <= radius, torch.ones_like(d), torch.exp(-((d - radius) ** 2) / (2 * s**2)))
    alpha = 1 / (1 + math.exp(-20 * (falloff - 0.03)))
    return 1 - alpha * shape


@pytest.mark.parametrize("falloff", [1e-6, 0.03, 0.3, 0.5, 0.9])
def test_crop_gate_closed_form(falloff):
    gate = crop_gate(16, falloff)
    assert gate.shape == (1, 1, 16, 16)
    torch.testing.assert_close(gate[0, 0].double(), crop_expected(16, falloff), atol=1e-5, rtol=1e-4)


def test_crop_gate_protects_the_centre():
    gate = crop_gate(16, 0.5)[0, 0]
    centre, corner = gate[8, 8].item(), gate[0, 0].item()
    assert centre < 0.01 < 0.1 < corner
    assert centre < gate[8, 0] and centre < gate[0, 8]


def test_crop_gate_frozen_at_f1():
    gate = crop_gate(16, 1.0)
    assert gate.abs().max() < 1e-6


def test_crop_gate_mostly_open_when_noisy():
    """f -> 0: alpha = sigmoid(20 (f - 0.03)) ~ 0.35, so the crop gate is at least ~0.65 everywhere."""
    gate = crop_gate(16, 1e-6)[0, 0]
    alpha = 1 / (1 + math.exp(-20 * (1e-6 - 0.03)))
    assert gate[8, 8].item() == pytest.approx(1 - alpha, abs=1e-5)
    assert gate.min() >= 1 - alpha - 1e-5 and gate.max() <= 1.0
    centres = [crop_gate(16, f)[0, 0, 8, 8].item() for f in (1e-6, 0.01, 0.05, 0.2, 0.6)]
    assert centres == sorted(centres, reverse=True)


# ---------------------------------------------------------------- pyramid and loss


@pytest.mark.parametrize(
    ("a", "low"), [(0.0, 1.0), (0.5, 0.5), (0.95, 0.1), (1.0, 0.1), (0.8, 0.2)]
)
def test_pyramid_weights(a, low):
    weights = pyramid_weights(a)
    assert len(weights) == 5
    assert weights[-1] == pytest.approx(low)
    assert weights[:4] == pytest.approx([(1 - low) / 4] * 4)
    assert sum(weights) == pytest.approx(1.0)


def test_laplacian_pyramid_reconstructs():
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pyramid = laplacian_pyramid(image, 4)
    assert [p.shape[-1] for p in pyramid] == [32, 16, 8, 4, 2]
    current = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        current = F.interpolate(current, size=band.shape[2:], mode="bilinear", align_corners=False) + band
    torch.testing.assert_close(current, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(pyramid[-1], F.avg_pool2d(F.avg_pool2d(image, 4), 4), atol=1e-6, rtol=0)


def test_laplacian_pyramid_of_constant_is_lowpass_only():
    image = torch.full((1, 3, 16, 16), 0.3)
    pyramid = laplacian_pyramid(image, 4)
    assert all(band.abs().max() < 1e-6 for band in pyramid[:-1])
    torch.testing.assert_close(pyramid[-1], torch.full((1, 3, 1, 1), 0.3))


def reference_multiscale(u, v, a, m=None):
    if m is not None:
        u, v = u * m, v * m
    u, v = u.double(), v.double()
    low = max(1 - a, 0.1)
    weights = [(1 - low) / 4] * 4 + [low]
    lap, cu, cv = 0.0, u, v
    for level in range(5):
        if level < 4:
            du, dv = F.avg_pool2d(cu, 2), F.avg_pool2d(cv, 2)
            pu = cu - F.interpolate(du, size=cu.shape[2:], mode="bilinear", align_corners=False)
            pv = cv - F.interpolate(dv, size=cv.shape[2:], mode="bilinear", align_corners=False)
            cu, cv = du, dv
        else:
            pu, pv = cu, cv
        lap = lap + weights[level] * ((pu - pv) ** 2).flatten(1).sum(1)
    return 100 * (1 - a) * lap / 4 + a * ((u - v) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize("a", [0.05, 0.5, 0.99])
def test_multiscale_loss_closed_form(a):
    generator = torch.Generator().manual_seed(1)
    u, v = torch.randn(3, 3, 16, 16, generator=generator), torch.randn(3, 3, 16, 16, generator=generator)
    m = torch.rand(3, 1, 16, 16, generator=generator)
    loss = multiscale_loss(u, v, a)
    assert loss.shape == (3,) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference_multiscale(u, v, a), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(multiscale_loss(u, v, a, m), reference_multiscale(u, v, a, m), rtol=1e-5, atol=1e-6)


def test_loss_zero_for_identical_inputs():
    u = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(multiscale_loss(u, u.clone(), 0.4), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(pixel_loss(u, u.clone()), torch.zeros(2, dtype=torch.float64))
    assert (multiscale_loss(u, u + 0.1, 0.4) > 0).all()


@pytest.mark.parametrize("multiscale", [True, False])
def test_loss_per_sample_independence(multiscale):
    generator = torch.Generator().manual_seed(3)
    u, v = torch.randn(4, 3, 16, 16, generator=generator), torch.randn(4, 3, 16, 16, generator=generator)
    m = torch.rand(4, 1, 16, 16, generator=generator)
    base = rectification_loss(u, v, 0.3, multiscale, m)
    u2, v2, m2 = u.clone(), v.clone(), m.clone()
    u2[1:] = torch.randn(3, 3, 16, 16, generator=generator)
    v2[1:] *= 3
    m2[1:] = 1
    changed = rectification_loss(u2, v2, 0.3, multiscale, m2)
    assert changed[0] == base[0]
    assert (changed[1:] != base[1:]).all()
    alone = rectification_loss(u[:1], v[:1], 0.3, multiscale, m[:1])
    torch.testing.assert_close(alone, base[:1], rtol=1e-6, atol=0)


def test_pixel_loss_closed_form():
    generator = torch.Generator().manual_seed(4)
    u, v = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    expected = ((u.double() - v.double()) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(rectification_loss(u, v, 0.7, False), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- disagreement map


def test_disagreement_map_range_and_shape():
    generator = torch.Generator().manual_seed(5)
    u, v = torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 3, 16, 16, generator=generator)
    m = disagreement_map(u, v, None)
    assert m.shape == (2, 1, 16, 16)
    assert m.min() >= 0 and m.max() <= 1
    d = ((u - v) ** 2).mean(1, keepdim=True)
    for i in range(2):
        assert m[i].flatten()[d[i].flatten().argmax()] == 1  # the worst pixel saturates
        expected = (d[i] / (0.2 * d[i].max())).clamp(0, 1)
        torch.testing.assert_close(m[i], expected, atol=1e-5, rtol=1e-5)


def test_disagreement_map_accumulates_by_max():
    generator = torch.Generator().manual_seed(6)
    u, v, w = (torch.randn(1, 3, 16, 16, generator=generator) for _ in range(3))
    first = disagreement_map(u, v, None)
    fresh = disagreement_map(u, w, None)
    accumulated = disagreement_map(u, w, first)
    torch.testing.assert_close(accumulated, torch.maximum(first, fresh), atol=1e-6, rtol=0)
    assert (accumulated >= first - 1e-7).all() and accumulated.max() <= 1
    same = disagreement_map(u, u, None)
    assert same.max() == 0
