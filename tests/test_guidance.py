"""Classifier-free guidance on the local model: the null class, label dropout, the guided epsilon, the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import GLOBAL_CONFIG, LOCAL_CONFIG, make_unet
from hydra import compose, initialize_config_dir

from dmgr import CONF_DIR
from dmgr.diffusion import make_diffusion
from dmgr.models import CheckpointError, build_unet, load_unet, read_checkpoint, save_checkpoint
from dmgr.models.unet import UNetConfig, UNetConfigError, null_label
from dmgr.sampler import DMGRSettings, PassCounter, PerSampleNoise, ddim_sample, dmgr_sample, make_generators
from dmgr.sampler.dmgr import guided_eps, model_eps
from dmgr.schema import ConfigError
from dmgr.synth.config import validate
from dmgr.train import TrainConfigError, drop_labels, init_from, train

ROOT = Path(__file__).resolve().parents[1]
NULL_CONFIG = {**LOCAL_CONFIG, "null_class": True}
W = LOCAL_CONFIG["image_size"]


@pytest.fixture(scope="module")
def null_model():
    return make_unet(5, **NULL_CONFIG)


@pytest.fixture(scope="module")
def diffusion10():
    return make_diffusion(1000, "linear", "10")


class Recorder(torch.nn.Module):
    """The model, recording the labels of every call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config, self.num_classes, self.labels = model, model.config, model.num_classes, []

    def forward(self, x, timesteps, y=None):
        self.labels.append(y.clone())
        return self.model(x, timesteps, y)


class LabelScaled(torch.nn.Module):
    """epsilon = x * (y + 1): the label's effect is known exactly."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.config, self.num_classes = UNetConfig(num_classes=num_classes, null_class=True), num_classes

    def forward(self, x, timesteps, y=None):
        return x * (y + 1).view(-1, 1, 1, 1).to(x.dtype)


def crop_walk(global_model, local_model, diffusion, settings, counter=None):
    generators = make_generators([3, 4])
    x_T = torch.stack([torch.randn(3, 32, 32, generator=g) for g in generators])
    return dmgr_sample(global_model, local_model, diffusion, x_T, torch.tensor([[4, 8], [12, 2]]),
                       torch.tensor([1, 4]), W, settings, PerSampleNoise(generators), counter=counter)


SHORT_WALK = dict(T_s=6, T_e=2, time_travel=False, gate_every=1, gate_radius=3.0)


# ---------------------------------------------------------------- the UNet's null class


def test_without_null_class_the_parameters_are_todays():
    today = build_unet(LOCAL_CONFIG).state_dict()
    off = build_unet({**LOCAL_CONFIG, "null_class": False}).state_dict()
    assert {k: v.shape for k, v in off.items()} == {k: v.shape for k, v in today.items()}
    on = build_unet(NULL_CONFIG).state_dict()
    assert on.keys() == today.keys()
    assert [k for k in on if on[k].shape != today[k].shape] == ["label_emb.weight"]
    assert on["label_emb.weight"].shape[0] == LOCAL_CONFIG["num_classes"] + 1
    # the published demo checkpoint stores no null_class and loads strictly into its own architecture
    state, stored, _ = read_checkpoint(ROOT / "checkpoints" / "demo" / "local.safetensors")
    assert stored.null_class is False
    build_unet(stored).load_state_dict(state, strict=True)


def test_null_class_config(tmp_path, null_model):
    assert null_label(null_model) == 6 and null_label(make_unet(0, **LOCAL_CONFIG)) is None
    with pytest.raises(UNetConfigError, match="null_class needs a class-conditional model"):
        build_unet({**GLOBAL_CONFIG, "null_class": True})
    path = save_checkpoint(null_model, tmp_path / "null.safetensors")
    assert read_checkpoint(path)[1].null_class is True


def test_init_from_adds_the_null_class_as_the_mean_embedding(tmp_path):
    plain = make_unet(1, **LOCAL_CONFIG)
    path = save_checkpoint(plain, tmp_path / "plain.safetensors")
    model = build_unet(NULL_CONFIG)
    init_from(model, str(path))
    rows = plain.label_emb.weight
    assert torch.equal(model.label_emb.weight[:6], rows)
    assert torch.equal(model.label_emb.weight[6], rows.mean(0))
    assert torch.equal(model.out[2].weight, plain.out[2].weight)


# ---------------------------------------------------------------- the guided epsilon


def test_guided_eps_is_the_formula_on_the_null_label():
    x, t, y = torch.randn(3, 3, 4, 4), torch.tensor([5, 5, 5]), torch.tensor([0, 2, 5])
    cond, uncond = x * (y + 1).view(-1, 1, 1, 1), x * 7
    for w in (0.5, 2.0, 5.0):
        assert torch.equal(guided_eps(LabelScaled(), x, t, y, w, 6, "fp32"), uncond + (1 + w) * (cond - uncond))


def test_guided_eps_of_a_unet_matches_two_direct_calls(null_model):
    x = torch.randn(2, 3, W, W, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([400, 400]), torch.tensor([1, 3])
    cond = model_eps(null_model, x, t, y, "fp32")
    uncond = model_eps(null_model, x, t, torch.full_like(y, 6), "fp32")
    # one batch of 2B rounds differently from two of B (about 1e-5 per call here), and the formula weighs the
    # calls 4 and 3: guided - reference = 4 (cond' - cond) - 3 (uncond' - uncond), so up to 7 roundings
    rounding = 1e-5
    assert (cond - uncond).abs().max() > 1000 * rounding  # the null label is its own class: a wrong weight shows
    torch.testing.assert_close(guided_eps(null_model, x, t, y, 3.0, 6, "fp32"), uncond + 4.0 * (cond - uncond),
                               rtol=1e-5, atol=7 * rounding)
    with pytest.raises(ValueError, match="null class"):
        guided_eps(null_model, x, t, y, 3.0, None, "fp32")


# ---------------------------------------------------------------- the sampler


def test_guidance_zero_is_todays_sampler_bit_for_bit(global_model, null_model, diffusion10):
    plain = make_unet(5, **LOCAL_CONFIG)  # the same weights without the null row
    plain.load_state_dict({k: v[:6] if k == "label_emb.weight" else v for k, v in null_model.state_dict().items()})
    today_counter, counter = PassCounter(), PassCounter()
    today = crop_walk(global_model, plain, diffusion10, DMGRSettings(**SHORT_WALK), today_counter)
    recorder = Recorder(null_model)
    result = crop_walk(global_model, recorder, diffusion10, DMGRSettings(**SHORT_WALK, guidance=0.0), counter)
    assert DMGRSettings().guidance == 0.0
    assert torch.equal(result.image, today.image) and torch.equal(result.crop, today.crop)
    assert counter.counts == today_counter.counts
    assert all(int(labels.max()) < 6 for labels in recorder.labels)  # never the null label: no extra pass
    # the plain DDIM path too
    x_T = torch.randn(2, 3, W, W, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 5])
    assert torch.equal(ddim_sample(null_model, diffusion10, x_T, y=y, guidance=0.0),
                       ddim_sample(plain, diffusion10, x_T, y=y))


def test_guidance_changes_the_crop_uses_the_null_label_and_counts_both_passes(global_model, null_model, diffusion10):
    free = dict(T_s=9, T_e=-1, time_travel=False)  # every step is free evolution: no line search
    off_counter, on_counter = PassCounter(), PassCounter()
    off = crop_walk(global_model, null_model, diffusion10, DMGRSettings(**free), off_counter)
    recorder = Recorder(null_model)
    on = crop_walk(global_model, recorder, diffusion10, DMGRSettings(**free, guidance=2.0), on_counter)
    assert not torch.allclose(on.crop, off.crop, atol=1e-3)
    assert all(labels.tolist() == [1, 4, 6, 6] for labels in recorder.labels)
    assert on_counter.counts["free"]["forward_local"] == 2 * off_counter.counts["free"]["forward_local"] == 18
    x_T = torch.randn(2, 3, W, W, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 5])
    assert not torch.allclose(ddim_sample(null_model, diffusion10, x_T, y=y, guidance=2.0),
                              ddim_sample(null_model, diffusion10, x_T, y=y), atol=1e-3)


# ---------------------------------------------------------------- label dropout


def test_label_dropout_is_drawn_from_the_training_generator_at_its_rate():
    y = torch.arange(6).repeat(4000)
    global_state = torch.get_rng_state()
    first = drop_labels(y, 0.25, 6, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), global_state)  # no global RNG
    assert torch.equal(first, drop_labels(y, 0.25, 6, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, drop_labels(y, 0.25, 6, torch.Generator().manual_seed(4)))
    dropped = first == 6
    assert abs(dropped.float().mean().item() - 0.25) < 0.02
    assert torch.equal(first[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, 6, torch.Generator()), y)


# ---------------------------------------------------------------- settings


def train_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="train", overrides=overrides)


def synth_spec(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return validate(compose(config_name="synth", overrides=["model=tiny_random", "dataset.source=generate",
                                                                "screen.enabled=false",
                                                                *overrides]))


def test_label_dropout_needs_a_null_class(tmp_path):
    for arch, key in (("demo_local", "label_dropout"), ("demo_global", "label_dropout"),
                      ("demo_local", "sample_guidance")):
        with pytest.raises(TrainConfigError) as err:
            train(train_config([f"arch={arch}", f"{key}=0.1", f"data_root={tmp_path}"]))
        message = str(err.value)
        assert message.startswith(f"{key}=0.1: ") and "arch.config.null_class" in message and "\n" not in message
    with pytest.raises(TrainConfigError, match="^label_dropout=1.0"):
        train(train_config(["arch=demo_local_mask_guided", "label_dropout=1.0", f"data_root={tmp_path}"]))


def test_guidance_settings(tmp_path):
    out = f"out_dir={tmp_path / 'run'}"
    with pytest.raises(ConfigError) as err:
        synth_spec([out, "schedule.guidance=2"])
    message = str(err.value)
    assert message.startswith("schedule.guidance=2") and "label_dropout" in message and "\n" not in message
    with pytest.raises(ConfigError, match="^schedule.guidance=-1"):
        synth_spec([out, "schedule.guidance=-1"])
    guided = synth_spec([out, "+model.local.config.null_class=true", "schedule.guidance=2"])
    assert guided.schedule.settings.guidance == 2.0
    today = synth_spec([out, "~schedule.guidance"]).identity
    assert synth_spec([out]).identity == today  # the default leaves the run's identity (its out_dir) as it was
    assert synth_spec([out, "schedule.guidance=0"]).identity == today


def test_a_null_class_mismatch_is_named(tmp_path, null_model):
    path = save_checkpoint(null_model, tmp_path / "null.safetensors")
    with pytest.raises(CheckpointError, match=r"it has a null class: null_class: true\)\.$"):
        load_unet(path, LOCAL_CONFIG)
    plain = save_checkpoint(make_unet(0, **LOCAL_CONFIG), tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match=r"it has no null class: null_class: false\)\.$"):
        load_unet(plain, NULL_CONFIG)
