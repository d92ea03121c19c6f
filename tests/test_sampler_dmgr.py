"""The DMGR sampling loop: phases, re-anchoring, rectification, plain-DDIM equivalence, per-seed determinism."""

import math

import pytest
import torch
from conftest import OneByOne

from dmgr.diffusion import ddim_step, make_diffusion, predict_x0, time_walk
from dmgr.sampler import (
    DMGRSettings,
    PassCounter,
    PerSampleNoise,
    crop_windows,
    ddim_sample,
    dmgr_sample,
    initial_noise,
    make_generators,
    model_eps,
)
from dmgr.sampler.loss import rectification_loss

W = 16  # window = local image size


@pytest.fixture(scope="module")
def diffusion10():
    return make_diffusion(1000, "linear", "10")


def noise(batch, seed=0, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def local_ddim(local, c, classes, diffusion, t, target):
    """One unrectified DDIM step of the crop under the local model."""
    with torch.no_grad():
        eps = model_eps(local, c, diffusion.model_timesteps(t, len(c), "cpu"), classes, "fp32")
    return ddim_step(predict_x0(c, eps, diffusion.abar(t)), eps, diffusion.abar(t), diffusion.abar(target))


def trace_at(result, t):
    (entry,) = [e for e in result.trace if e["t"] == t]
    return entry


# ---------------------------------------------------------------- phases


def test_phase_boundaries():
    s = DMGRSettings(T_s=150, T_e=40)
    assert s.phase(249) == "anchoring"
    assert s.phase(151) == "anchoring"
    assert s.phase(150) == "free"
    assert s.phase(41) == "free"
    assert s.phase(40) == "resonance"
    assert s.phase(0) == "resonance"
    flat = DMGRSettings(multistage=False)
    assert {flat.phase(t) for t in (249, 150, 40, 0)} == {"anchoring"}


def test_defaults_are_the_reference_values():
    s = DMGRSettings()
    assert (s.T_s, s.T_e, s.iterations, s.lr_xt, s.lr_decay) == (150, 40, 2, 0.02, 1.012)
    assert (s.reg, s.reg_decay, s.backtrack, s.gate_radius, s.gate_every) == (1e-4, 1.01, 0.8, 9.0, 5)
    assert (s.jump_length, s.jump_n_sample, s.time_travel, s.multiscale_loss, s.use_loss_weight) == (
        10, 2, True, True, False
    )
    assert s.eta == 0.0 and s.initial_falloff == 1e-6


# ---------------------------------------------------------------- without rectification


def test_lr0_without_time_travel_is_plain_ddim(global_model, local_model, diffusion10):
    x_T = noise(2, 1)
    settings = DMGRSettings(T_s=7, T_e=3, lr_xt=0.0, time_travel=False, record_every=5)
    result = dmgr_sample(
        global_model, local_model, diffusion10, x_T, torch.tensor([[0, 0], [16, 8]]), torch.tensor([1, 5]), W,
        settings, record_process=True, record_trace=True,
    )
    plain = ddim_sample(global_model, diffusion10, x_T)
    assert (result.image - plain).abs().max().item() <= 1e-6
    assert (result.image - x_T).abs().max() > 0.1
    assert [index for index, _ in result.x0_process] == [5, 0]
    assert all(torch.equal(e["loss"], torch.zeros(2, dtype=torch.float64)) for e in result.trace)
    assert [(e["t"], e["prev_t"]) for e in result.trace] == [(t, t - 1) for t in range(9, 0, -1)]


def test_crop_reanchored_to_window_at_T_e(global_model, local_model, diffusion10):
    """Before T_e the crop evolves under the local model alone; at the top of step T_e it becomes the window of x."""
    T_e = 4
    x_T = noise(2, 2)
    windows, classes = torch.tensor([[3, 5], [16, 12]]), torch.tensor([2, 0])
    settings = DMGRSettings(T_s=7, T_e=T_e, lr_xt=0.0, time_travel=False)
    result = dmgr_sample(global_model, local_model, diffusion10, x_T, windows, classes, W, settings, record_trace=True)

    # the crop starts as the window of x_T and then follows its own DDIM
    first = local_ddim(local_model, crop_windows(x_T, windows, W), classes, diffusion10, 9, 8)
    torch.testing.assert_close(trace_at(result, 9)["crop_prev"], first, atol=1e-6, rtol=0)
    before = trace_at(result, T_e + 2)["crop_prev"]
    torch.testing.assert_close(
        trace_at(result, T_e + 1)["crop_prev"],
        local_ddim(local_model, before, classes, diffusion10, T_e + 1, T_e),
        atol=1e-6, rtol=0,
    )

    x_at_T_e = trace_at(result, T_e + 1)["x_prev"]
    crop_at_T_e = trace_at(result, T_e + 1)["crop_prev"]
    window = crop_windows(x_at_T_e, windows, W)
    assert (window - crop_at_T_e).abs().max() > 1e-2  # the two had drifted apart: the check below can fail
    expected = local_ddim(local_model, window, classes, diffusion10, T_e, T_e - 1)
    torch.testing.assert_close(trace_at(result, T_e)["crop_prev"], expected, atol=1e-6, rtol=0)
    # and only once: the next step continues from the re-anchored crop
    torch.testing.assert_close(
        trace_at(result, T_e - 1)["crop_prev"],
        local_ddim(local_model, trace_at(result, T_e)["crop_prev"], classes, diffusion10, T_e - 1, T_e - 2),
        atol=1e-6, rtol=0,
    )


# ---------------------------------------------------------------- rectification


@pytest.mark.slow
def test_rectification_lowers_the_loss(global_denoiser, local_denoiser, diffusion10):
    """One anchoring step moves the window of the global x0 prediction toward the local prediction."""
    x_T = noise(2, 3)
    windows, classes = torch.tensor([[4, 6], [12, 10]]), torch.tensor([1, 4])
    t = 9
    abar = diffusion10.abar(t)
    steps = diffusion10.model_timesteps(t, 2, "cpu")
    with torch.no_grad():
        eps_g = model_eps(global_denoiser, x_T, steps, None, "fp32")
        crop = crop_windows(x_T, windows, W)
        eps_l = model_eps(local_denoiser, crop, steps, classes, "fp32")
        x0_l = predict_x0(crop, eps_l, abar)
        before = rectification_loss(crop_windows(predict_x0(x_T, eps_g, abar), windows, W), x0_l, math.sqrt(abar), True)

    settings = DMGRSettings(T_s=5, T_e=2, lr_xt=0.5, time_travel=False)
    result = dmgr_sample(
        global_denoiser, local_denoiser, diffusion10, x_T, windows, classes, W, settings, record_trace=True
    )
    after = result.trace[0]["loss"]
    assert after.shape == (2,)
    assert (after < 0.99 * before).all(), (before, after)

    # x was moved (its DDIM update is no longer plain DDIM) while the crop, not rectified in anchoring, was not
    plain_x = ddim_step(predict_x0(x_T, eps_g, abar), eps_g, abar, diffusion10.abar(8))
    assert (result.trace[0]["x_prev"] - plain_x).abs().max() > 1e-4
    plain_c = ddim_step(x0_l, eps_l, abar, diffusion10.abar(8))
    torch.testing.assert_close(result.trace[0]["crop_prev"], plain_c, atol=1e-6, rtol=0)

    # free steps report no loss; the result's final loss is that of the last rectified step (t = 1)
    assert all(e["loss"].abs().max() == 0 for e in result.trace if settings.phase(e["t"]) == "free")
    assert all(e["loss"].min() > 0 for e in result.trace if settings.phase(e["t"]) != "free")
    assert torch.equal(result.final_loss, result.trace[-1]["loss"])


@pytest.mark.slow
def test_rectification_changes_the_sample(global_denoiser, local_denoiser, diffusion10):
    x_T = noise(1, 4)
    windows, classes = torch.tensor([[8, 8]]), torch.tensor([3])
    on = dmgr_sample(global_denoiser, local_denoiser, diffusion10, x_T, windows, classes, W,
                     DMGRSettings(T_s=6, T_e=3, lr_xt=0.5, time_travel=False))
    off = ddim_sample(global_denoiser, diffusion10, x_T)
    inside = (on.image - off)[..., 8:24, 8:24].abs().mean()
    assert inside > 1e-3


# ---------------------------------------------------------------- batches and seeds


SEEDS = [11, 22, 33, 44, 55]
WINDOWS = torch.tensor([[8, 8], [0, 16], [16, 0], [10, 5], [3, 12]])
CLASSES = torch.tensor([0, 3, 5, 1, 4])


def seeded_run(global_model, local_model, diffusion, rows, settings, counter=None):
    generators = make_generators([SEEDS[i] for i in rows])
    x_T = initial_noise(generators, (3, 32, 32), "cpu")
    return dmgr_sample(
        global_model, local_model, diffusion, x_T, WINDOWS[rows], CLASSES[rows], W, settings,
        PerSampleNoise(generators), counter=counter,
    )


def assert_same_sample(a, i, b, j):
    torch.testing.assert_close(a.image[i], b.image[j], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.crop[i], b.crop[j], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_per_seed_determinism_with_time_travel(global_denoiser, local_denoiser):
    """A seed gives the same sample alone, in a batch of 4 and in another batch order (batched networks)."""
    diffusion = make_diffusion(1000, "linear", "20")
    settings = DMGRSettings(T_s=12, T_e=4, lr_xt=0.5, time_travel=True, jump_length=5, gate_radius=3.0)
    alone = seeded_run(global_denoiser, local_denoiser, diffusion, [1], settings)
    batch = seeded_run(global_denoiser, local_denoiser, diffusion, [0, 1, 2, 3], settings)
    order = [3, 1, 0, 2]
    shuffled = seeded_run(global_denoiser, local_denoiser, diffusion, order, settings)

    assert batch.image.shape == (4, 3, 32, 32) and batch.crop.shape == (4, 3, W, W)
    assert torch.equal(batch.windows, WINDOWS[:4]) and torch.equal(batch.classes, CLASSES[:4])
    assert_same_sample(alone, 0, batch, 1)
    for position, row in enumerate(order):
        assert_same_sample(shuffled, position, batch, row)
    # the samples differ from one another: seeds, windows and classes are per sample
    for i in range(4):
        for j in range(i + 1, 4):
            assert (batch.image[i] - batch.image[j]).abs().max() > 1e-2
            assert (batch.crop[i] - batch.crop[j]).abs().max() > 1e-2


@pytest.mark.slow
def test_samples_independent_under_backtracking(global_denoiser, local_denoiser):
    """With a rate that makes every sample backtrack its own number of times, and time travel on, a sample
    is the same alone, with other batch-mates and at another position (networks evaluated per sample)."""
    diffusion = make_diffusion(1000, "linear", "10")
    settings = DMGRSettings(T_s=6, T_e=2, lr_xt=5.0, time_travel=True, jump_length=3, gate_radius=3.0)
    global_model, local_model = OneByOne(global_denoiser), OneByOne(local_denoiser)
    alone, retries = {}, {}
    for row in (1, 3):
        counter = PassCounter()
        alone[row] = seeded_run(global_model, local_model, diffusion, [row], settings, counter)
        passes = sum(v.get("forward_grad_global", 0) + v.get("forward_global", 0) for v in counter.counts.values())
        backwards = sum(v.get("backward", 0) for v in counter.counts.values())
        retries[row] = passes - backwards * 3 // 2  # K = 2: 3 forwards per 2 backwards without retries
    assert min(retries.values()) > 0 and retries[1] != retries[3], retries  # each sample backtracks its own way

    batch = seeded_run(global_model, local_model, diffusion, [0, 1, 2, 3], settings)
    other = seeded_run(global_model, local_model, diffusion, [3, 4, 1, 0], settings)
    for row in (1, 3):
        assert_same_sample(alone[row], 0, batch, row)
    for position, row in ((0, 3), (2, 1), (3, 0)):
        assert_same_sample(other, position, batch, row)


@pytest.mark.slow
def test_class_is_per_sample(global_denoiser, local_denoiser, diffusion10):
    """Changing one sample's class changes that sample's crop and leaves its batch-mate alone."""
    global_model, local_model = OneByOne(global_denoiser), OneByOne(local_denoiser)
    x_T = noise(2, 5)
    windows = torch.tensor([[4, 4], [10, 12]])
    settings = DMGRSettings(T_s=6, T_e=3, lr_xt=0.5, time_travel=False)
    a = dmgr_sample(global_model, local_model, diffusion10, x_T, windows, torch.tensor([0, 2]), W, settings)
    b = dmgr_sample(global_model, local_model, diffusion10, x_T, windows, torch.tensor([5, 2]), W, settings)
    assert (a.crop[0] - b.crop[0]).abs().max() > 1e-3
    assert torch.equal(a.crop[1], b.crop[1]) and torch.equal(a.image[1], b.image[1])


def test_time_travel_needs_a_noise_source(global_model, local_model, diffusion10):
    x_T = noise(1, 6)
    with pytest.raises(ValueError):
        dmgr_sample(global_model, local_model, diffusion10, x_T, torch.tensor([[0, 0]]), torch.tensor([0]), W,
                    DMGRSettings(time_travel=True))
    with pytest.raises(ValueError):
        dmgr_sample(global_model, local_model, diffusion10, x_T, torch.tensor([[0, 0]]), torch.tensor([0]), W,
                    DMGRSettings(time_travel=False, eta=0.5))


def test_per_sample_noise_is_per_sample():
    a = PerSampleNoise(make_generators([1, 2])).draw(torch.empty(2, 3, 4, 4), "undo_x")
    b = PerSampleNoise(make_generators([2])).draw(torch.empty(1, 3, 4, 4), "undo_x")
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    with pytest.raises(ValueError):
        PerSampleNoise(make_generators([1])).draw(torch.empty(2, 3, 4, 4), "undo_x")
    first = initial_noise(make_generators([7, 8]), (3, 4, 4), "cpu")
    assert torch.equal(first[1], initial_noise(make_generators([8]), (3, 4, 4), "cpu")[0])


# ---------------------------------------------------------------- network calls


def test_pass_counter_free_steps(global_model, local_model, diffusion10):
    counter = PassCounter()
    settings = DMGRSettings(T_s=9, T_e=-1, time_travel=False)  # every step 9 -> 0 is free
    dmgr_sample(global_model, local_model, diffusion10, noise(1, 7), torch.tensor([[4, 4]]), torch.tensor([1]), W,
                settings, counter=counter)
    assert counter.counts == {"free": {"forward_global": 9, "forward_local": 9}}


def test_pass_counter_per_phase(global_denoiser, local_denoiser, diffusion10):
    counter = PassCounter()
    K = 2
    settings = DMGRSettings(T_s=6, T_e=2, iterations=K, lr_xt=1e-3, time_travel=False)
    dmgr_sample(global_denoiser, local_denoiser, diffusion10, noise(1, 8), torch.tensor([[4, 4]]),
                torch.tensor([1]), W, settings, counter=counter)
    anchoring, free, resonance = (counter.counts[p] for p in ("anchoring", "free", "resonance"))
    # 9..7 anchoring (3 steps), 6..3 free (4), 2..1 resonance (2); a tiny rate never backtracks; while only
    # x moves (anchoring) the crop's prediction is made once per step and reused by the K candidates
    assert anchoring == {"forward_grad_global": 3 * K, "forward_global": 3, "forward_local": 3,
                         "backward": 3 * K}
    assert free == {"forward_global": 4, "forward_local": 4}
    assert resonance == {"forward_grad_global": 2 * K, "forward_grad_local": 2 * K, "forward_global": 2,
                         "forward_local": 2, "backward": 2 * K}


@pytest.mark.slow
def test_pass_counter_backtracking_adds_forwards(local_model, global_model, diffusion10):
    """With a huge rate the candidates are rejected and retried: more forwards, still K backwards per step."""
    counter = PassCounter()
    K = 2
    settings = DMGRSettings(T_s=6, T_e=-1, iterations=K, lr_xt=1e4, time_travel=False, max_backtracks=30)
    dmgr_sample(global_model, local_model, diffusion10, noise(1, 9), torch.tensor([[4, 4]]), torch.tensor([1]), W,
                settings, counter=counter)
    anchoring = counter.counts["anchoring"]
    assert anchoring["backward"] == 3 * K
    forwards = anchoring["forward_grad_global"] + anchoring["forward_global"]
    assert forwards > 3 * (K + 1)
    assert anchoring["forward_local"] == 3  # the crop never moves while anchoring: one local pass per step


def test_without_reanchoring_the_crop_keeps_its_own_walk(global_model, local_model, diffusion10):
    """reanchor=false: at T_e the crop goes on from its own state (the defect it grew is kept)."""
    T_e = 4
    x_T = noise(2, 2)
    windows, classes = torch.tensor([[3, 5], [16, 12]]), torch.tensor([2, 0])
    settings = DMGRSettings(T_s=7, T_e=T_e, lr_xt=0.0, time_travel=False, reanchor=False)
    result = dmgr_sample(global_model, local_model, diffusion10, x_T, windows, classes, W, settings, record_trace=True)
    before = trace_at(result, T_e + 1)["crop_prev"]
    expected = local_ddim(local_model, before, classes, diffusion10, T_e, T_e - 1)
    torch.testing.assert_close(trace_at(result, T_e)["crop_prev"], expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_known_background_outside_the_window_at_every_step(global_model, local_model, diffusion10):
    """RePaint's rule: outside the window, x at index t is the background noised to t."""
    x_T = noise(2, 5)
    background = noise(2, 6).clamp(-1, 1)
    windows, classes = torch.tensor([[3, 5], [16, 12]]), torch.tensor([2, 0])
    settings = DMGRSettings(T_s=7, T_e=3, lr_xt=0.2, time_travel=True, jump_length=3, reanchor=False)
    result = dmgr_sample(
        global_model, local_model, diffusion10, x_T, windows, classes, W, settings,
        noise=PerSampleNoise(make_generators([1, 2])), record_trace=True, known=background,
    )
    outside = torch.ones(2, 1, 32, 32, dtype=torch.bool)
    for i, (x, y) in enumerate(windows.tolist()):
        outside[i, :, y : y + W, x : x + W] = False
    outside = outside.expand(-1, 3, -1, -1)
    for entry in result.trace:
        abar = diffusion10.abar(entry["prev_t"])
        residual = (entry["x_prev"] - math.sqrt(abar) * background)[outside] / math.sqrt(1 - abar)
        assert 0.8 < residual.std() < 1.2 and residual.mean().abs() < 0.1  # exactly the fresh unit noise
    final = result.image[outside]
    assert (final - background[outside]).abs().max() < 6 * math.sqrt(1 - diffusion10.abar(0))
    inside = ~outside
    assert (result.image[inside] - background[inside]).abs().mean() > 0.05  # the window was generated


@pytest.mark.slow
def test_a_mask_channel_local_model_gets_its_own_crop_channel(global_model, unet_factory, diffusion10):
    from conftest import LOCAL_CONFIG

    local4 = unet_factory(5, **{**LOCAL_CONFIG, "in_channels": 4})
    x_T = noise(2, 7)
    windows, classes = torch.tensor([[3, 5], [16, 12]]), torch.tensor([2, 0])
    settings = DMGRSettings(T_s=7, T_e=3, lr_xt=0.2, time_travel=False)
    run = lambda: dmgr_sample(  # noqa: E731
        global_model, local4, diffusion10, x_T, windows, classes, W, settings,
        noise=PerSampleNoise(make_generators([1, 2])),
    )
    a, b = run(), run()
    assert a.crop.shape == (2, 4, W, W)
    torch.testing.assert_close(a.crop, b.crop, atol=0, rtol=0)  # the mask channel's noise comes from the seed
    assert (a.crop[0, 3] - a.crop[1, 3]).abs().max() > 0.1  # and differs between seeds


def test_a_mask_channel_local_model_samples_without_a_noise_source(global_model, unet_factory, diffusion10):
    """No time travel, eta 0, no known background: the walk is a function of x_T alone, the mask channel too."""
    from conftest import LOCAL_CONFIG

    local4 = unet_factory(5, **{**LOCAL_CONFIG, "in_channels": 4})
    x_T = noise(2, 7)
    windows, classes = torch.tensor([[3, 5], [16, 12]]), torch.tensor([2, 0])
    settings = DMGRSettings(T_s=7, T_e=3, lr_xt=0.2, time_travel=False, eta=0.0)
    run = lambda x: dmgr_sample(global_model, local4, diffusion10, x, windows, classes, W, settings)  # noqa: E731
    a, b = run(x_T), run(x_T.clone())
    assert a.crop.shape == (2, 4, W, W) and torch.isfinite(a.crop).all()
    torch.testing.assert_close(a.crop, b.crop, atol=0, rtol=0)
    assert (a.crop[0, 3] - a.crop[1, 3]).abs().max() > 0.1
    assert (run(noise(2, 8)).crop[:, 3] - a.crop[:, 3]).abs().max() > 0.1  # another x_T, another mask channel


@pytest.mark.slow
def test_a_mask_channel_crop_follows_the_known_window_outside_its_defect(global_model, unet_factory, diffusion10):
    from conftest import LOCAL_CONFIG

    local4 = unet_factory(5, **{**LOCAL_CONFIG, "in_channels": 4})
    x_T, background = noise(2, 7), noise(2, 8).clamp(-1, 1)
    windows, classes = torch.tensor([[3, 5], [16, 12]]), torch.tensor([2, 0])
    settings = DMGRSettings(T_s=7, T_e=3, lr_xt=0.2, time_travel=False, reanchor=False)
    result = dmgr_sample(
        global_model, local4, diffusion10, x_T, windows, classes, W, settings,
        noise=PerSampleNoise(make_generators([1, 2])), known=background,
    )
    known_crop = crop_windows(background, windows, W)
    tolerance = 6 * math.sqrt(1 - diffusion10.abar(0))
    # the final mask channel is the last x0 prediction's up to sqrt(1 - abar_0) noise: where it is clearly
    # negative, no defect was predicted and the RGB is the known window
    outside = (result.crop[:, 3:] < -0.1).expand(-1, 3, -1, -1)
    assert outside.float().mean() > 0.3
    assert (result.crop[:, :3][outside] - known_crop[outside]).abs().max() < tolerance


# ---------------------------------------------------------------- callback


def test_callback_sees_every_move_of_the_walk_in_order(global_model, local_model, diffusion10):
    """Every reverse step and undo of the time-travel walk reaches the callback in order, each undo that follows a
    reverse step preceded by its optimisation ("pre_undo"); the last move's state is the result."""
    settings = DMGRSettings(T_s=7, T_e=3, lr_xt=0.2, time_travel=True, jump_length=3)
    moves = []
    result = dmgr_sample(
        global_model, local_model, diffusion10, noise(2, 10), torch.tensor([[3, 5], [16, 12]]), torch.tensor([2, 0]),
        W, settings, noise=PerSampleNoise(make_generators([1, 2])), record_trace=True, callback=moves.append,
    )
    walk = [9, 8, 7, 6, 7, 8, 9, 8, 7, 6, 5, 4, 3, 4, 5, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert time_walk(10, True, 3, 2) == walk
    expected = [("reverse" if b < a else "undo", a, b) for a, b in zip(walk[:-1], walk[1:])]
    assert [(m["kind"], m["t"], m["target"]) for m in moves if m["kind"] != "pre_undo"] == expected

    turns = [i for i, m in enumerate(moves) if m["kind"] == "pre_undo"]
    assert [moves[i]["t"] for i in turns] == [6, 3, 0]  # where the walk turns back up
    for i in turns:
        assert moves[i - 1]["kind"] == "reverse" and moves[i + 1]["kind"] == "undo"
        assert moves[i]["x"].shape == (2, 3, 32, 32) and moves[i]["loss"].shape == (2,)
    assert all((m["x0"] is not None) == (m["kind"] == "reverse") for m in moves)
    assert all(m["loss"] is None for m in moves if m["kind"] == "undo")

    assert moves[-1]["kind"] == "reverse" and moves[-1]["target"] == 0
    assert torch.equal(moves[-1]["x"], result.image) and torch.equal(moves[-1]["crop"], result.crop)
    # record_trace is built from the same moves
    reverse = [m for m in moves if m["kind"] == "reverse"]
    assert [(e["t"], e["prev_t"]) for e in result.trace] == [(m["t"], m["target"]) for m in reverse]
    assert all(e["x_prev"] is m["x"] and e["loss"] is m["loss"] for e, m in zip(result.trace, reverse, strict=True))
    assert [i for i in turns if any(x is moves[i]["x"] for x, _ in result.pre_undo)] == turns
