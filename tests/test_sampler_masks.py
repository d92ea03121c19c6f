"""Defect masks: the image/twin difference, the gate support, bounding boxes."""

import math

import pytest
import torch

from dmgr.images import bounding_box
from dmgr.sampler.gates import global_gate
from dmgr.sampler.masks import diff_mask, gate_mask, gaussian_blur, local_mask, otsu_threshold, window_support


def smooth_background(batch, size, seed):
    base = torch.rand(batch, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(seed)) * 1.4 - 0.7
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


def disc(size, cx, cy, radius):
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2


def iou(a, b):
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


def test_diff_mask_recovers_a_blob_inside_the_window():
    size = 64
    twin = smooth_background(2, size, 0)
    noise = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 0.02
    windows = torch.tensor([[10, 20], [30, 4]])
    blobs = [disc(size, 18, 30, 4), disc(size, 42, 14, 5)]
    image = twin + noise
    for i, blob in enumerate(blobs):
        image[i, :, blob] += torch.tensor([0.8, -0.6, 0.7]).view(3, 1)
    # a strong difference outside the window must be ignored
    image[0, :, 50:60, 50:60] += 1.0
    mask = diff_mask(image, twin, windows, 16)
    assert mask.shape == (2, 1, size, size) and mask.dtype == torch.bool
    inside = window_support(size, size, windows, 16)
    assert not (mask & ~inside).any()
    for i, blob in enumerate(blobs):
        assert iou(mask[i, 0], blob) > 0.7, iou(mask[i, 0], blob)


def test_diff_mask_empty_without_a_defect():
    twin = smooth_background(1, 32, 2)
    image = twin + torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 0.01
    mask = diff_mask(image, twin, torch.tensor([[8, 8]]), 16)
    assert not mask.any()  # the contrast floor keeps noise out, whatever Otsu picks


def test_gate_mask_is_a_disc_at_the_window_centre():
    size, w, radius, falloff = 64, 16, 3.0, 0.5
    windows = torch.tensor([[10, 20], [40, 40]])
    mask = gate_mask(size, size, windows, w, radius, falloff)
    assert mask.shape == (2, 1, size, size)
    inside = window_support(size, size, windows, w)
    assert not (mask & ~inside).any()
    # G_x >= 0.5  <=>  d <= r + s sqrt(2 ln 2) with s = r / sqrt(2 ln(1 + f))
    reach = radius + radius / math.sqrt(2 * math.log(1 + falloff)) * math.sqrt(2 * math.log(2))
    for i, (x, y) in enumerate(windows.tolist()):
        cx, cy = x + w // 2, y + w // 2
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        d = torch.sqrt(((xs - cx) ** 2 + (ys - cy) ** 2).double())
        clear = (d - reach).abs() > 1e-3
        expected = (d <= reach) & inside[i, 0]
        assert torch.equal(mask[i, 0][clear], expected[clear])
        assert mask[i, 0, cy, cx]
        assert bounding_box(mask[i]) is not None
        x0, y0, x1, y1 = bounding_box(mask[i])
        assert (x0 + x1 - 1) / 2 == pytest.approx(cx, abs=0.5) and (y0 + y1 - 1) / 2 == pytest.approx(cy, abs=0.5)


def test_gate_mask_follows_the_gate():
    windows = torch.tensor([[4, 4]])
    gate = global_gate(32, 32, windows + 8, 3.0, 0.9)
    mask = gate_mask(32, 32, windows, 16, 3.0, 0.9)
    assert torch.equal(mask, (gate >= 0.5) & window_support(32, 32, windows, 16))
    wide = gate_mask(32, 32, windows, 16, 3.0, 1e-6)
    assert torch.equal(wide, window_support(32, 32, windows, 16))  # noisy falloff: the whole window


def test_bounding_box():
    mask = torch.zeros(1, 20, 30, dtype=torch.bool)
    mask[0, 5:9, 12:20] = True
    assert bounding_box(mask) == [12, 5, 20, 9]
    assert bounding_box(mask[0]) == [12, 5, 20, 9]
    mask[0, 15, 2] = True
    assert bounding_box(mask) == [2, 5, 20, 16]
    assert bounding_box(torch.zeros(20, 30, dtype=torch.bool)) is None


def test_window_support():
    support = window_support(10, 12, torch.tensor([[2, 3]]), 4)
    assert support.shape == (1, 1, 10, 12)
    assert support.sum() == 16
    assert support[0, 0, 3, 2] and support[0, 0, 6, 5] and not support[0, 0, 7, 5] and not support[0, 0, 3, 6]


def test_otsu_separates_two_modes():
    generator = torch.Generator().manual_seed(4)
    values = torch.cat([torch.rand(500, generator=generator) * 0.1, 0.8 + torch.rand(100, generator=generator) * 0.1])
    threshold = otsu_threshold(values)
    assert 0.1 <= threshold <= 0.8


def test_gaussian_blur_preserves_constants_and_mass():
    image = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(gaussian_blur(image, 1.5), image)
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1
    blurred = gaussian_blur(spike, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 10, 10] < 1 and blurred[0, 0, 10, 11] > 0


@pytest.mark.parametrize("background", [-1.0, -0.05])  # a weak model's channel hovers near 0 off the defect
def test_local_mask_smoothing_drops_scattered_pixels_and_keeps_the_defect(background):
    crop = torch.full((1, 4, 16, 16), background)
    crop[0, 3, 6:10, 6:10] = 1.0  # the defect: a compact 4x4 region
    scattered = [(1, 1), (1, 13), (13, 2), (12, 12), (3, 8)]
    for y, x in scattered:
        crop[0, 3, y, x] = 0.3  # isolated pixels just above the threshold
    windows = torch.tensor([[8, 4]])
    plain = local_mask(crop, windows, 24, 32)
    smoothed = local_mask(crop, windows, 24, 32, sigma=1.0)
    assert plain.sum() == 16 + len(scattered)
    assert all(plain[0, 0, 4 + y, 8 + x] for y, x in scattered)
    assert not any(smoothed[0, 0, 4 + y, 8 + x] for y, x in scattered)
    region = smoothed[0, 0, 4 + 6 : 4 + 10, 8 + 6 : 8 + 10]
    assert region.sum() >= 12 and region[1:3, 1:3].all()  # its corners may round off, its body stays
    assert smoothed.sum() == region.sum()  # nothing around it
    assert not (smoothed & ~window_support(24, 32, windows, 16)).any()
