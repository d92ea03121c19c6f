"""Beta schedules, respacing, DDIM step maths and the time-travel walk against closed forms."""

import math

import pytest
import torch

from dmgr.diffusion import (
    beta_schedule,
    ddim_step,
    make_diffusion,
    predict_x0,
    space_timesteps,
    time_walk,
    undo_step,
)


def guided_diffusion_space_timesteps(num_timesteps, section_counts):
    """openai/guided-diffusion `respace.space_timesteps`, verbatim in behaviour (accumulated float stride)."""
    if section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return set(range(0, num_timesteps, stride))
        raise ValueError(desired)
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


# ---------------------------------------------------------------- beta schedules


@pytest.mark.parametrize("steps", [1000, 100, 4000])
def test_linear_betas(steps):
    betas = beta_schedule("linear", steps)
    scale = 1000 / steps
    lo, hi = 1e-4 * scale, 0.02 * scale
    expected = torch.tensor([lo + (hi - lo) * i / (steps - 1) for i in range(steps)], dtype=torch.float64)
    assert betas.dtype == torch.float64 and betas.shape == (steps,)
    torch.testing.assert_close(betas, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("steps", [1000, 50])
def test_cosine_betas(steps):
    betas = beta_schedule("cosine", steps)

    def alpha_bar(s):
        return math.cos((s / steps + 0.008) / 1.008 * math.pi / 2) ** 2

    assert betas.max() <= 0.999
    assert betas[-1] == pytest.approx(0.999)  # alpha_bar(T) = 0: the cap is what keeps the last beta finite
    assert (betas > 0).all()
    cumprod = torch.cumprod(1 - betas, 0)
    # Away from the cap, the product of (1 - beta) telescopes to alpha_bar(t + 1) / alpha_bar(0).
    expected = torch.tensor([alpha_bar(t + 1) / alpha_bar(0) for t in range(steps)], dtype=torch.float64)
    uncapped = betas < 0.999
    torch.testing.assert_close(cumprod[uncapped], expected[uncapped], rtol=1e-10, atol=1e-14)


def test_unknown_schedule():
    with pytest.raises(ValueError):
        beta_schedule("quadratic", 1000)


# ---------------------------------------------------------------- respacing


def test_space_250_evenly_strided():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept == sorted(kept)
    assert kept[0] == 0 and kept[-1] == 999
    gaps = {b - a for a, b in zip(kept, kept[1:])}
    assert gaps <= {4, 5}
    assert set(kept) == guided_diffusion_space_timesteps(1000, "250")


def test_space_ddim():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")


def test_space_sections():
    kept = space_timesteps(1000, "10,15,20")
    assert len(kept) == 45
    assert set(kept) == guided_diffusion_space_timesteps(1000, "10,15,20")
    first, second, third = kept[:10], kept[10:25], kept[25:]
    assert first[0] == 0 and first[-1] == 333  # section sizes 334, 333, 333
    assert second[0] == 334 and second[-1] == 666
    assert third[0] == 667 and third[-1] == 999
    with pytest.raises(ValueError):
        space_timesteps(30, "11,10,10")  # a section of 10 steps cannot hold 11


def test_space_int_argument():
    assert space_timesteps(1000, 100) == space_timesteps(1000, "100")


@pytest.mark.parametrize("steps", [1000, 100])
def test_space_matches_guided_diffusion_for_every_count(steps):
    """guided-diffusion accumulates the fractional stride; the kept steps must be the very same ones."""
    departures = [
        count
        for count in range(1, steps + 1)
        if set(space_timesteps(steps, str(count))) != guided_diffusion_space_timesteps(steps, str(count))
    ]
    assert not departures, f"respacing counts that keep other timesteps than guided-diffusion: {departures[:10]}"


@pytest.mark.parametrize("respacing", ["250", "ddim50", "10,15,20", "100"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_alphas_cumprod(respacing, schedule):
    full = make_diffusion(1000, schedule, None)
    spaced = make_diffusion(1000, schedule, respacing)
    kept = space_timesteps(1000, respacing)
    assert spaced.timestep_map.tolist() == kept
    assert spaced.num_steps == len(kept)
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(spaced.alphas_cumprod, torch.cumprod(1 - spaced.betas, 0), rtol=1e-12, atol=0)


def test_unrespaced_diffusion():
    diffusion = make_diffusion(1000, "linear", None)
    assert diffusion.num_steps == 1000
    assert diffusion.timestep_map.tolist() == list(range(1000))
    torch.testing.assert_close(diffusion.betas, beta_schedule("linear", 1000), rtol=1e-12, atol=0)


def test_model_timesteps_use_the_map():
    diffusion = make_diffusion(1000, "linear", "ddim50")
    steps = diffusion.model_timesteps(3, 4, "cpu")
    assert steps.tolist() == [60] * 4 and steps.dtype == torch.long
    assert diffusion.abar(3) == pytest.approx(float(torch.cumprod(1 - beta_schedule("linear", 1000), 0)[60]))


# ---------------------------------------------------------------- one-step maths


def test_predict_x0():
    generator = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    abar = 0.37
    expected = (x.double() / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps.double()).float()
    torch.testing.assert_close(predict_x0(x, eps, abar, clip=False), expected, atol=1e-5, rtol=1e-6)
    clipped = predict_x0(x, eps, abar)
    torch.testing.assert_close(clipped, expected.clamp(-1, 1), atol=1e-5, rtol=1e-6)
    assert clipped.abs().max() <= 1 and expected.abs().max() > 1


def test_predict_x0_inverts_forward_process():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 3, 8, 8, generator=generator) * 1.6 - 0.8
    eps = torch.randn(1, 3, 8, 8, generator=generator)
    abar = 0.6
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    torch.testing.assert_close(predict_x0(x_t, eps, abar), x0, atol=1e-5, rtol=0)


def test_ddim_step_eta0():
    generator = torch.Generator().manual_seed(2)
    x0, eps = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1, torch.randn(2, 3, 8, 8, generator=generator)
    a_t, a_prev = 0.3, 0.8
    expected = math.sqrt(a_prev) * x0.double() + math.sqrt(1 - a_prev) * eps.double()
    torch.testing.assert_close(ddim_step(x0, eps, a_t, a_prev), expected.float(), atol=1e-6, rtol=1e-6)


def test_ddim_step_with_eta():
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1, torch.randn(1, 3, 8, 8, generator=generator)
    z = torch.randn(1, 3, 8, 8, generator=generator)
    a_t, a_prev, eta = 0.3, 0.8, 0.5
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    expected = math.sqrt(a_prev) * x0.double() + math.sqrt(1 - a_prev - sigma**2) * eps.double() + sigma * z.double()
    torch.testing.assert_close(ddim_step(x0, eps, a_t, a_prev, eta, z), expected.float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        ddim_step(x0, eps, a_t, a_prev, eta)


def test_undo_step():
    generator = torch.Generator().manual_seed(4)
    x, z = torch.randn(1, 3, 8, 8, generator=generator), torch.randn(1, 3, 8, 8, generator=generator)
    beta = 0.013
    expected = math.sqrt(1 - beta) * x.double() + math.sqrt(beta) * z.double()
    torch.testing.assert_close(undo_step(x, beta, z), expected.float(), atol=1e-6, rtol=1e-6)


def test_undo_inverts_marginal():
    """An undo from index t to t+1 turns the marginal at abar_t into the marginal at abar_{t+1}."""
    diffusion = make_diffusion(1000, "linear", "100")
    t = 40
    beta = float(diffusion.betas[t + 1])
    assert diffusion.abar(t) * (1 - beta) == pytest.approx(diffusion.abar(t + 1), rel=1e-12)


# ---------------------------------------------------------------- the walk


def moves(walk):
    return list(zip(walk[:-1], walk[1:]))


def test_walk_without_time_travel():
    assert time_walk(250) == list(range(249, -1, -1))
    assert time_walk(250, False, 10, 2) == list(range(249, -1, -1))


def test_walk_paper_schedule():
    walk = time_walk(250, True, 10, 2)
    assert len(walk) == 730
    assert walk[0] == 249 and walk[-1] == 0
    steps = moves(walk)
    assert all(b - a in (-1, 1) for a, b in steps)  # reverse steps go down one index, undos up one
    assert sum(b < a for a, b in steps) == 489 and sum(b > a for a, b in steps) == 240
    for j in range(0, 240, 10):
        starts = [i for i, (a, b) in enumerate(steps) if a == j and b == j + 1]
        assert len(starts) == 1, j
        i = starts[0]
        assert walk[i + 1 : i + 11] == list(range(j + 1, j + 11))
        assert walk[i + 11] == j + 9  # and comes down again
    assert not any(a == 240 and b == 241 for a, b in steps)  # 240 + 10 would leave the grid
    assert walk.count(0) == 2  # reached once before the jump at j = 0, and at the end


def test_walk_fixture_schedule():
    walk = time_walk(100, True)
    steps = moves(walk)
    assert len(walk) == 280
    assert sum(b < a for a, b in steps) == 189 and sum(b > a for a, b in steps) == 90
    undo_targets = [b for a, b in steps if b > a]
    assert undo_targets[:12] == [81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 71, 72]


def test_walk_more_samples_per_jump():
    walk = time_walk(40, True, 10, 3)
    steps = moves(walk)
    for j in (0, 10, 20):
        assert sum(1 for a, b in steps if a == j and b == j + 1) == 2
    assert walk[0] == 39 and walk[-1] == 0
    assert sum(b > a for a, b in steps) == 3 * 2 * 10
