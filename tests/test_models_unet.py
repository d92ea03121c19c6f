"""The guided-diffusion compatible UNet: shapes, conditioning, reference parity, bf16 autocast."""

import pytest
import torch
from conftest import GLOBAL_CONFIG, LOCAL_CONFIG

from dmgr.models import UNetConfig, build_unet
from dmgr.sampler import model_eps

STEPS = torch.tensor([10, 900])


def test_output_channels_with_and_without_learned_sigma(unet_factory):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    learned = unet_factory(0, **GLOBAL_CONFIG)
    fixed = unet_factory(0, **{**GLOBAL_CONFIG, "learn_sigma": False})
    with torch.no_grad():
        assert learned(x, STEPS).shape == (2, 6, 32, 32)
        assert fixed(x, STEPS).shape == (2, 3, 32, 32)


def test_local_model_shape_and_nonzero_output(local_model):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = local_model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 2, 5]))
    assert out.shape == (3, 6, 16, 16)
    assert out.abs().mean() > 1e-2  # randomised: not the zero output of a fresh guided-diffusion UNet


def test_fresh_unet_outputs_zeros():
    """Why the tests randomise: a freshly built UNet zero-initialises its output layer, like guided-diffusion."""
    model = build_unet(GLOBAL_CONFIG).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([10]))
    assert torch.count_nonzero(out) == 0


def test_class_label_changes_output(local_model):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = local_model(x, STEPS, torch.tensor([0, 0]))
        b = local_model(x, STEPS, torch.tensor([3, 3]))
        c = local_model(x, STEPS, torch.tensor([0, 0]))
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(a, c)


def test_timestep_changes_output(global_model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = global_model(x, torch.tensor([10, 10]))
        b = global_model(x, torch.tensor([900, 900]))
    assert (a - b).abs().max() > 1e-3


def test_label_required_iff_class_conditional(global_model, local_model):
    x_global = torch.randn(2, 3, 32, 32)
    x_local = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError):
        local_model(x_local, STEPS)
    with pytest.raises(ValueError):
        global_model(x_global, STEPS, torch.tensor([1, 2]))
    with torch.no_grad():
        global_model(x_global, STEPS)
        local_model(x_local, STEPS, torch.tensor([1, 2]))


def test_samples_in_a_batch_are_independent(local_model):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 16, 16, generator=generator)
    with torch.no_grad():
        batch = local_model(x, torch.tensor([5, 400, 800]), torch.tensor([1, 2, 3]))
        alone = local_model(x[1:2], torch.tensor([400]), torch.tensor([2]))
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=0)  # CPU kernels round per batch size


def test_config_round_trip():
    model = build_unet(LOCAL_CONFIG)
    again = build_unet(UNetConfig.from_dict(model.config.to_dict()))
    assert again.config == model.config
    assert model.config.num_classes == 6 and model.config.learn_sigma
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("which", ["global", "local"])
def test_reference_unet_outputs(load_reference, which):
    """The fixture's trained guided-diffusion weights load strictly and give its outputs within 1e-5."""
    ref = load_reference("tiny-64px-100steps.pt")
    model = build_unet(ref[f"{which}_config"])
    result = model.load_state_dict(ref[f"{which}_state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    y = ref["unet_y"] if which == "local" else None
    with torch.no_grad():
        out = model(ref[f"unet_x_{which}"], ref["unet_t"], y)
    expected = ref[f"unet_out_{which}"]
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("which", ["global", "local"])
def test_bf16_autocast_close_to_fp32(global_model, local_model, which):
    model = global_model if which == "global" else local_model
    size = 32 if which == "global" else 16
    y = torch.tensor([1, 4]) if which == "local" else None
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model_eps(model, x, STEPS, y, "fp32")
        half = model_eps(model, x, STEPS, y, "bf16")
    assert half.dtype == torch.float32 and half.shape == (2, 3, size, size)
    difference = (half - full).abs().max()
    assert difference > 0  # autocast really computed in bf16 (NaN anywhere fails this and the next line)
    assert difference < 0.1 * full.abs().max()
    correlation = torch.corrcoef(torch.stack([full.flatten(), half.flatten()]))[0, 1]
    assert correlation > 0.99


def test_model_eps_takes_epsilon_channels(global_model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = global_model(x, STEPS)
        eps = model_eps(global_model, x, STEPS, None, "fp32")
    assert torch.equal(eps, out[:, :3])


def test_unknown_config_keys_are_refused_with_the_nearest_known_key():
    from dmgr.models.unet import UNetConfigError

    with pytest.raises(UNetConfigError, match=r"'num_head_channel'.*did you mean 'num_head_channels'") as info:
        UNetConfig.from_dict({**LOCAL_CONFIG, "num_head_channel": 8})
    assert "\n" not in str(info.value)
    with pytest.raises(UNetConfigError, match="'class_cond'.*num_classes"):
        build_unet({**LOCAL_CONFIG, "class_cond": True})


def test_guided_diffusion_memory_settings_are_accepted():
    """use_checkpoint and use_fp16 change memory and speed only (precision is the job's setting)."""
    config = UNetConfig.from_dict({**LOCAL_CONFIG, "use_checkpoint": True, "use_fp16": False})
    assert config == UNetConfig.from_dict(LOCAL_CONFIG)
