"""Every number of the DMGR sampler, with the reference's values as defaults (ALGORITHM.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DMGRSettings:
    T_s: int = 150  # above: Structural Anchoring (rectify x only)
    T_e: int = 40  # at or below: Textural Resonance (rectify x and crop)
    reanchor: bool = True  # at T_e the crop restarts as the window of x (the reference; it drops the defect)
    iterations: int = 2  # K gradient iterations per rectified step
    lr_xt: float = 0.02
    lr_decay: float = 1.012  # per reverse step, undone on every undo
    smart_lr: bool = True  # lr * sqrt(abar_t) / sqrt(abar_0)
    reg: float = 1e-4
    reg_decay: float = 1.01
    backtrack: float = 0.8
    max_backtracks: int = 30  # the reference loops until accepted; after this many a sample stays put
    multiscale_loss: bool = True
    pyramid_levels: int = 4
    multistage: bool = True  # the asymmetric phases; off = rectify x only, at every step
    gating: bool = True  # the two spatial gates; off = ones (and the crop is never rectified)
    gate_radius: float = 9.0
    gate_every: int = 5
    initial_falloff: float = 1e-6
    use_loss_weight: bool = False  # the disagreement weight map
    loss_weight_until: int = 35  # the map accumulates for loss_weight_until <= t <= T_e
    time_travel: bool = True
    jump_length: int = 10
    jump_n_sample: int = 2
    optimise_before_undo: bool = True
    eta: float = 0.0
    record_every: int = 50  # x0 predictions kept for the process grid at indices multiple of this

    def phase(self, t: int) -> str:
        if not self.multistage:
            return "anchoring"
        if t > self.T_s:
            return "anchoring"
        if t > self.T_e:
            return "free"
        return "resonance"
