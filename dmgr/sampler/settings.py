"""Every setting of the DMGR sampler, with the reference's values as defaults (docs/algorithm.md). The
formulas' fixed constants are not settings: each is named where it is defined (dmgr/sampler/loss.py,
dmgr/sampler/gates.py), with the formula it belongs to.

The defaults are the only copy of the paper's settings: conf/schedule/paper.yaml inherits them (via
`schedule/base` in Hydra's ConfigStore). The bounds apply where a config is checked (dmgr.schema.build);
building the dataclass directly checks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from dmgr.schema import STRICT_SECTION, Count, Flag, NonNegative

# The crop of a mask-generating local model holds RGB, then the defect mask (a local model with 4 input channels).
RGB = slice(0, 3)
MASK_CHANNEL = 3


def has_mask_channel(in_channels: int) -> bool:
    """Whether a local model with `in_channels` inputs generates the defect mask beside its RGB."""
    return in_channels > MASK_CHANNEL


@dataclass(frozen=True)
class DMGRSettings:
    __pydantic_config__ = STRICT_SECTION
    T_s: Count(0) = 150  # above: Structural Anchoring (rectify x only)
    T_e: Count(0) = 40  # at or below: Textural Resonance (rectify x and crop)
    reanchor: Flag = True  # at T_e the crop restarts as the window of x (the reference; it drops the defect)
    iterations: Count() = 2  # K gradient iterations per rectified step
    lr_xt: NonNegative = 0.02
    lr_decay: float = 1.012  # per reverse step, undone on every undo
    smart_lr: Flag = True  # lr * sqrt(abar_t) / sqrt(abar_0)
    reg: NonNegative = 1e-4
    reg_decay: float = 1.01
    backtrack: Annotated[float, Field(gt=0, lt=1)] = 0.8
    max_backtracks: Count(0) = 30  # the reference loops until accepted; after this many a sample stays put
    multiscale_loss: Flag = True
    pyramid_levels: Count() = 4
    multistage: Flag = True  # the asymmetric phases; off = rectify x only, at every step
    gating: Flag = True  # the two spatial gates; off = ones (and the crop is never rectified)
    gate_radius: float = 9.0  # pixels (the job's default: 9/64 of the window, schedule.gate_radius=null)
    gate_every: Count() = 5
    initial_falloff: float = 1e-6
    use_loss_weight: Flag = False  # the disagreement weight map
    loss_weight_until: int = 35  # the map accumulates for loss_weight_until <= t <= T_e
    time_travel: Flag = True
    jump_length: Count() = 10
    jump_n_sample: Count() = 2
    optimise_before_undo: Flag = True
    eta: NonNegative = 0.0
    record_every: Count() = 50  # x0 predictions kept for the process grid at indices multiple of this
    guidance: NonNegative = 0.0  # classifier-free guidance w on the local model: eps_null + (1 + w) * (eps_y -
    #   eps_null); 0: off (no extra pass). Needs a local model with a null class (trained with label_dropout)

    def phase(self, t: int) -> str:
        if not self.multistage:
            return "anchoring"
        if t > self.T_s:
            return "anchoring"
        if t > self.T_e:
            return "free"
        return "resonance"
