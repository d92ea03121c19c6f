"""How the networks run (dmgr.models.performance): the fused attention kernel, channels_last and
torch.compile compute what the plain UNet computes; `auto` leaves CPU results bit-identical."""

from __future__ import annotations

import pytest
import torch
from conftest import GLOBAL_CONFIG, make_unet

from dmgr.bench import flops_per_sample, run_flops
from dmgr.models.performance import PerformanceSettings, accelerate
from dmgr.models.unet import set_attention_kernel

STEPS = torch.tensor([10, 900])


def _output_and_input_grad(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x, STEPS)
    (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_matches_classic_attention_in_fp32(new_order):
    model = make_unet(3, **{**GLOBAL_CONFIG, "use_new_attention_order": new_order}).requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    set_attention_kernel(model, "classic")
    classic = _output_and_input_grad(model, x)
    set_attention_kernel(model, "sdpa")
    fused = _output_and_input_grad(model, x)
    for a, b in zip(classic, fused):
        assert a.abs().max() > 1e-3  # a real signal, not two zeros
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_auto_is_the_classic_kernel_on_cpu_bit_for_bit():
    model = make_unet(4, **GLOBAL_CONFIG).requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    set_attention_kernel(model, "classic")
    classic = _output_and_input_grad(model, x)
    set_attention_kernel(model, "auto")
    auto = _output_and_input_grad(model, x)
    assert all(torch.equal(a, b) for a, b in zip(classic, auto))


def test_channels_last_computes_the_same_network():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain = _output_and_input_grad(make_unet(5, **GLOBAL_CONFIG).requires_grad_(False), x)
    nhwc = PerformanceSettings(channels_last=True)
    nhwc_model = accelerate(make_unet(5, **GLOBAL_CONFIG).requires_grad_(False), nhwc)
    assert nhwc_model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = _output_and_input_grad(nhwc_model, x)
    for a, b in zip(plain, nhwc):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_compiled_network_matches_eager_and_keeps_its_attributes():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    eager = _output_and_input_grad(make_unet(6, **GLOBAL_CONFIG).requires_grad_(False), x)
    compiled = accelerate(make_unet(6, **GLOBAL_CONFIG).requires_grad_(False), PerformanceSettings(compile="default"))
    assert compiled.config.image_size == 32 and compiled.in_channels == 3  # what the sampler reads
    for a, b in zip(eager, _output_and_input_grad(compiled, x)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_invalid_performance_setting_names_the_setting():
    with pytest.raises(ValueError, match="compile='fast'"):
        PerformanceSettings(compile="fast")
    with pytest.raises(ValueError, match="attention='flash'"):
        PerformanceSettings(attention="flash")


def test_flop_count_of_a_known_network_and_a_run():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)

    class Net(torch.nn.Module):  # the two attributes flops_per_sample reads, around one convolution
        config = type("Config", (), {"image_size": 4, "num_classes": None})()
        in_channels = 3

        def forward(self, x, t, y=None):
            return conv(x)

    conv.requires_grad_(False)
    forward, backward = flops_per_sample(Net(), "cpu", "fp32")
    assert forward == 2 * 3 * 8 * 9 * 16  # multiply-adds of a 3x3 conv, 3 -> 8 channels, 4x4 pixels
    assert backward == forward  # the input gradient is one transposed convolution (weights frozen)
    flops = {"global": (10.0, 20.0), "local": (1.0, 2.0)}
    counts = {
        "anchoring": {"forward_grad_global": 2, "forward_global": 1, "forward_local": 3, "backward": 2},
        "resonance": {"forward_grad_global": 2, "forward_grad_local": 2, "backward": 2},
    }
    # anchoring: 3*10 + 3*1 + 2*20 (backward through global only); resonance: 2*10 + 2*1 + 2*(20 + 2)
    assert run_flops(counts, runs=1, flops=flops) == 73 + 66
    assert run_flops(counts, runs=2, flops=flops) == (73 + 66) / 2
