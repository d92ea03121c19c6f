"""Speed settings for the two networks: memory layout, attention kernel and torch.compile.

None of them changes what a network computes, only how (floating-point results may move in the last bits,
so they are part of a run's identity). Mixed precision is separate: `dmgr.models.precision`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BeforeValidator
from torch import nn

from dmgr.models.unet import ATTENTION_KERNELS, set_attention_kernel
from dmgr.schema import STRICT_SECTION, Flag

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def _off_when_false(value: object) -> object:
    return "off" if value in (None, False) else value  # YAML reads a bare `off` as false


@dataclass(frozen=True)
class PerformanceSettings:
    """conf/synth.yaml `performance` (docs/configuration.md "Speed settings", docs/performance.md)."""

    __pydantic_config__ = STRICT_SECTION
    compile: Annotated[Literal[COMPILE_MODES], BeforeValidator(_off_when_false)] = "off"  # a torch.compile mode
    #   (reduce-overhead adds CUDA graphs)
    channels_last: Flag = False  # NHWC weights and activations: faster convolutions on tensor cores
    attention: Literal[ATTENTION_KERNELS] = "auto"  # auto (sdpa on CUDA, classic on CPU) | classic | sdpa

    def __post_init__(self) -> None:  # built directly (bench, gpu_checks), not through a config
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r}: allowed {', '.join(COMPILE_MODES)}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention={self.attention!r}: allowed {', '.join(ATTENTION_KERNELS)}")


def accelerate(model: nn.Module, settings: PerformanceSettings) -> nn.Module:
    """The model with `settings` applied: the same module, or its torch.compile wrapper (which forwards
    attribute access, e.g. `.config`, to the module)."""
    set_attention_kernel(model, settings.attention)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if settings.compile != "off":
        model = torch.compile(model, mode=settings.compile, dynamic=False)
    return model
