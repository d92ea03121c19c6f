"""The DMGR sampler: DDIM on the global model, rectified toward the local defect manifold.

The steps are numbered as in docs/algorithm.md ("one reverse step at index t"):
  1. predict with both models            `predict`
  2. pick the rates from the phase table  `phase_rates`, `RECTIFIED_STATES`
  3. no rate: no gradients                `rectify`
  4. K gradient iterations, backtracking  `rectify`, `backtrack`
  5. the multi-scale loss                 `fit` (dmgr/sampler/loss.py)
  6. DDIM-update both states              `reverse_step`
and the walk around them: time travel (`undo_step`, `rectify_before_undo`), re-anchoring at T_e (`reanchor`) and
the spatial gates (`set_gates`). The product's additions are separate pieces: the known region (`KnownRegion`:
real backgrounds, and the crop of a mask-generating local model) and the switch `reanchor=false`.

Every sample has its own class, window and backtracking (a whole-batch line search with an accept mask), and
the prediction at an accepted point is reused instead of recomputed (the reference spends one more forward per
iteration): neither changes a result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dmgr.diffusion import Diffusion, ddim_step, predict_x0, time_walk
from dmgr.diffusion import undo_step as diffusion_undo
from dmgr.models.precision import autocast
from dmgr.models.unet import null_label
from dmgr.progress import progress_bar
from dmgr.sampler.gates import crop_gate, global_gate
from dmgr.sampler.loss import disagreement_map, rectification_loss
from dmgr.sampler.masks import window_support
from dmgr.sampler.noise import NoiseSource
from dmgr.sampler.settings import MASK_CHANNEL, RGB, DMGRSettings, has_mask_channel

# Step 2, the phase table: which states a phase rectifies (its rates are `phase_rates`).
RECTIFIED_STATES = {
    #             x      crop
    "anchoring": (True, False),  # t > T_s: Structural Anchoring
    "free": (False, False),  # T_e < t <= T_s: free evolution
    "resonance": (True, True),  # t <= T_e: Textural Resonance
}


@dataclass
class PassCounter:
    """Network calls per phase: forwards with and without gradient, and backward passes."""

    counts: dict = field(default_factory=dict)

    def add(self, phase: str, kind: str, n: int = 1) -> None:
        self.counts.setdefault(phase, {}).setdefault(kind, 0)
        self.counts[phase][kind] += n


@dataclass
class DMGRResult:
    image: torch.Tensor  # (B, 3, H, W) in [-1, 1] (unclipped final state)
    crop: torch.Tensor  # (B, C, w, w) final crop state (C = 4 with a mask channel)
    windows: torch.Tensor  # (B, 2) top-left (x, y)
    classes: torch.Tensor  # (B,)
    gate_falloff: float  # f of the last gate update, for the `gate` mask method
    final_loss: torch.Tensor  # (B,) rectification loss of the last rectified step
    x0_process: list = field(default_factory=list)  # [(index, x0_g (B,3,H,W))]
    trace: list = field(default_factory=list)  # per reverse step: dict(t, prev_t, x_prev, crop_prev, loss)
    pre_undo: list = field(default_factory=list)  # (x, crop) handed to each undo after optimisation


def crop_windows(images: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable per-sample crop of `size` at top-left (x, y)."""
    return torch.stack(
        [images[i, :, int(y) : int(y) + size, int(x) : int(x) + size] for i, (x, y) in enumerate(windows.tolist())]
    )


def model_eps(
    model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None, precision: str
) -> torch.Tensor:
    """The epsilon channels of a (possibly learned-sigma) guided-diffusion UNet, in float32."""
    with autocast(x.device.type, precision):
        out = model(x, timesteps, y)
    return out[:, : x.shape[1]].float()


def guided_eps(
    model: nn.Module,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    null: int | None,
    precision: str,
) -> torch.Tensor:
    """Classifier-free guidance: eps_null + (1 + scale) * (eps_y - eps_null), where eps_null is the
    prediction for the "no class" label `null` (a model built with null_class, trained with label
    dropout). scale 0 is the conditional prediction; scale w is s = 1 + w in the eps_null + s * (eps_y -
    eps_null) convention. One forward pass over [x; x] with labels [y; null]."""
    if null is None:
        raise ValueError("guidance needs a local model with a null class (null_class: true, trained with "
                         "label_dropout > 0)")
    labels = torch.cat([y, torch.full_like(y, null)])
    both = model_eps(model, torch.cat([x, x]), torch.cat([timesteps, timesteps]), labels, precision)
    cond, uncond = both.chunk(2)
    return uncond + (1 + scale) * (cond - uncond)


def class_eps(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None, guidance: float,
              precision: str) -> torch.Tensor:
    """The epsilon of a class-conditional model for labels `y`: with guidance > 0 classifier-free guided
    (`guided_eps`, two passes), else one plain pass."""
    if guidance:
        return guided_eps(model, x, timesteps, y, guidance, null_label(model), precision)
    return model_eps(model, x, timesteps, y, precision)


@dataclass(frozen=True)
class Sampler:
    """What stays fixed during one call of `dmgr_sample`: the models, the process and every sample's plan."""

    global_model: nn.Module
    local_model: nn.Module
    diffusion: Diffusion
    windows: torch.Tensor  # (B, 2)
    classes: torch.Tensor  # (B,)
    w: int  # window side = the local model's image size
    s: DMGRSettings
    precision: str
    counter: PassCounter | None

    def window(self, image: torch.Tensor) -> torch.Tensor:
        return crop_windows(image, self.windows, self.w)

    def count(self, phase: str, kind: str) -> None:
        if self.counter is not None:
            self.counter.add(phase, kind)


_FIELDS = ("x", "c", "eps_g", "x0_g", "eps_l", "x0_l")


@dataclass
class Point:
    """Step 1 at one (x, c): both models' predictions.

    `leaves` are the autograd leaves the predictions hang from. After a line search a row's values come from the
    attempt that row accepted, so the predictions hang from one (x, c) leaf pair per such attempt; the gradient
    of a row then sits in the leaf of its own attempt (`torch.where` routes it there) and is zero in the others,
    and the sum over the leaves is every row's gradient. This is what lets the next iteration differentiate the
    accepted point without evaluating the networks at it once more.
    """

    x: torch.Tensor
    c: torch.Tensor
    eps_g: torch.Tensor
    x0_g: torch.Tensor
    eps_l: torch.Tensor
    x0_l: torch.Tensor
    leaves: list[tuple[torch.Tensor, torch.Tensor]]

    def where(self, rows: torch.Tensor, other: Point) -> Point:
        """This point on `rows` (a (B,) bool mask), `other` elsewhere."""
        mask = rows.view(-1, 1, 1, 1)
        fields = {n: torch.where(mask, getattr(self, n), getattr(other, n)) for n in _FIELDS}
        return Point(**fields, leaves=other.leaves + self.leaves)

    def detached(self) -> Point:
        return Point(*(getattr(self, n).detach() for n in _FIELDS), leaves=[])


def predict(sm: Sampler, x, c, t: int, grad_x: bool, grad_c: bool, eps_l: torch.Tensor | None = None) -> Point:
    """Step 1: eps_g = global(x, t), x0_g; eps_l = local(c, t, class), x0_l. A given `eps_l` (the crop's
    prediction while only x moves) is reused: the same input gives the same output."""
    phase = sm.s.phase(t)
    with torch.set_grad_enabled(grad_x or grad_c):
        x = x.detach().requires_grad_(grad_x)
        c = c.detach().requires_grad_(grad_c)
        abar = sm.diffusion.abar(t)
        steps = sm.diffusion.model_timesteps(t, x.shape[0], x.device)
        eps_g = model_eps(sm.global_model, x, steps, None, sm.precision)
        sm.count(phase, "forward_grad_global" if grad_x else "forward_global")
        if eps_l is None:
            eps_l = class_eps(sm.local_model, c, steps, sm.classes, sm.s.guidance, sm.precision)
            for _ in range(2 if sm.s.guidance else 1):  # guidance: the batch twice (its class, the null class)
                sm.count(phase, "forward_grad_local" if grad_c else "forward_local")
        return Point(x, c, eps_g, predict_x0(x, eps_g, abar), eps_l, predict_x0(c, eps_l, abar), [(x, c)])


def fit(sm: Sampler, p: Point, t: int, weight_map: torch.Tensor | None) -> torch.Tensor:
    """Step 5: per-sample loss between the window of the global prediction and the local prediction's RGB."""
    sqrt_abar = math.sqrt(sm.diffusion.abar(t))
    return rectification_loss(
        sm.window(p.x0_g), p.x0_l[:, RGB], sqrt_abar, sm.s.multiscale_loss, weight_map, sm.s.pyramid_levels
    )


def objective(sm: Sampler, p: Point, t: int, start: tuple, reg: float, weight_map) -> torch.Tensor:
    """Step 4's loss: the fit plus lambda_reg times the squared drift of both states from the step's start."""
    x_start, c_start = start
    drift = ((p.x - x_start) ** 2).flatten(1).sum(1) + ((p.c - c_start) ** 2).flatten(1).sum(1)
    return fit(sm, p, t, weight_map) + reg * drift.double()


def phase_rates(s: DMGRSettings, abar: Callable[[int], float], t: int, lr_base: float) -> tuple[float, float]:
    """Step 2: (lr on x, lr on the crop) at t. Without gating the crop is never rectified."""
    lr = lr_base * math.sqrt(abar(t)) / math.sqrt(abar(0)) if s.smart_lr else lr_base
    on_x, on_c = RECTIFIED_STATES[s.phase(t)]
    return (lr if on_x else 0.0), (lr if on_c and s.gating else 0.0)


def gradients(sm: Sampler, p: Point, loss: torch.Tensor, grad_c: bool, phase: str):
    """d loss / d x and d loss / d c at `p` (None for c when the crop is not optimised), summed over its leaves."""
    xs = [x for x, _ in p.leaves]
    cs = [c for _, c in p.leaves] if grad_c else []
    grads = torch.autograd.grad(loss.sum(), xs + cs, allow_unused=True)
    sm.count(phase, "backward")

    def total(parts, like):
        return sum((g for g in parts if g is not None), torch.zeros_like(like))

    return total(grads[: len(xs)], p.x), (total(grads[len(xs) :], p.c) if grad_c else None)


def backtrack(sm: Sampler, p: Point, loss, grads, rates, gates, t, start, reg, weight_map, keep_graph) -> Point:
    """Step 4's update with backtracking: every sample steps against its gradient at its own rate, times `backtrack`
    until its loss is finite and does not rise; after max_backtracks reductions it stays where it is. Candidates
    are evaluated for the whole batch each attempt, so a sample never depends on which batch-mates still search.
    `rates` ((B,) on x, (B,) on c) are reduced in place: a reduced rate stays reduced for the step's next iteration."""
    (grad_x, grad_c), (rate_x, rate_c), (gate_x, gate_c) = grads, rates, gates
    here_x, here_c = p.x.detach(), p.c.detach()
    fixed_eps_l = p.eps_l.detach() if grad_c is None else None  # the crop does not move
    searching = torch.ones_like(loss, dtype=torch.bool)
    chosen = None
    for attempt in range(sm.s.max_backtracks + 1):
        last_try = attempt == sm.s.max_backtracks
        if last_try:
            rate_x[searching], rate_c[searching] = 0.0, 0.0
        cand_x = here_x - rate_x.view(-1, 1, 1, 1) * gate_x * grad_x
        cand_c = here_c if grad_c is None else here_c - rate_c.view(-1, 1, 1, 1) * gate_c * grad_c
        cand = predict(sm, cand_x, cand_c, t, keep_graph, keep_graph and grad_c is not None, fixed_eps_l)
        with torch.no_grad():
            new_loss = objective(sm, cand, t, start, reg, weight_map)
        ok = searching & (torch.isfinite(new_loss) & (new_loss <= loss) | last_try)
        if ok.any():
            chosen = cand if chosen is None else cand.where(ok, chosen)
        searching &= ~ok
        if not searching.any():
            break
        rate_x[searching] *= sm.s.backtrack
        rate_c[searching] *= sm.s.backtrack
    return chosen


def update_weight_map(sm: Sampler, p: Point, t: int, previous: torch.Tensor | None) -> torch.Tensor | None:
    """The optional weight map M: max-accumulated disagreement of the two predictions for until <= t <= T_e."""
    s = sm.s
    if not (s.use_loss_weight and s.multistage and s.loss_weight_until <= t <= s.T_e):
        return previous
    return disagreement_map(sm.window(p.x0_g), p.x0_l[:, RGB], None if previous is None else previous.detach())


@dataclass
class Walk:
    """What the walk carries from one index to the next."""

    x: torch.Tensor  # the whole image
    c: torch.Tensor  # the crop (RGB, and the mask channel of a mask-generating local model)
    lr_base: float  # lr_xt: times lr_decay per reverse step, divided back per undo
    reg: float  # lambda_reg: times reg_decay per reverse step, divided back per undo
    falloff: float  # f of the gates' last refresh
    gate_x: torch.Tensor
    gate_c: torch.Tensor
    final_loss: torch.Tensor  # (B,) of the last rectified step
    weight_map: torch.Tensor | None = None
    weight_t: int | None = None  # the index the map was last accumulated at (a pre-undo pass adds nothing)
    defect: torch.Tensor | None = None  # (B, 1, w, w) bool: the crop's latest predicted defect (mask channel)
    reanchor_at: int | None = None  # T_e until the crop was re-anchored
    last_move: str | None = None


def rectify(sm: Sampler, walk: Walk, t: int, need_predictions: bool = True):
    """Steps 1-5 at index t: (final point or None, x, c, per-sample loss)."""
    batch, phase = walk.x.shape[0], sm.s.phase(t)
    lr_x, lr_c = phase_rates(sm.s, sm.diffusion.abar, t, walk.lr_base)  # step 2
    if lr_x == 0.0 and lr_c == 0.0:  # step 3
        point = predict(sm, walk.x, walk.c, t, False, False) if need_predictions else None
        return point, walk.x, walk.c, torch.zeros(batch, dtype=torch.float64)
    optimise_c = lr_c > 0
    start = (walk.x.detach(), walk.c.detach())
    rates = tuple(torch.full((batch,), lr, dtype=torch.float32, device=walk.x.device) for lr in (lr_x, lr_c))
    point = predict(sm, walk.x, walk.c, t, True, optimise_c)  # step 1
    if walk.weight_t != t:
        walk.weight_map, walk.weight_t = update_weight_map(sm, point, t, walk.weight_map), t
    weight_map = walk.weight_map
    for k in range(sm.s.iterations):  # step 4
        with torch.enable_grad():
            loss = objective(sm, point, t, start, walk.reg, weight_map)
        grads = gradients(sm, point, loss, optimise_c, phase)
        weight_map = None if weight_map is None else weight_map.detach()
        point = backtrack(sm, point, loss.detach(), grads, rates, (walk.gate_x, walk.gate_c), t, start, walk.reg,
                          weight_map, keep_graph=k < sm.s.iterations - 1)
    with torch.no_grad():
        final = fit(sm, point, t, weight_map)
    point = point.detached()
    return point, point.x, point.c, final


class KnownRegion:
    """RePaint's rule for real backgrounds: outside the windows the image is, at every index t, the background
    noised to t. With a mask-generating local model the crop's RGB follows the same rule outside the defect its
    latest x0 prediction shows, so the defect grows into the real window around it."""

    def __init__(self, sm: Sampler, known: torch.Tensor | None, noise: NoiseSource | None, mask_channel: bool):
        self.sm, self.known, self.noise = sm, known, noise
        self.edit = None if known is None else window_support(*known.shape[2:], sm.windows, sm.w)
        self.known_crop = sm.window(known) if known is not None and mask_channel else None

    def repaint(self, state, keep, clean, t: int, z) -> torch.Tensor:
        """`state` where `keep`, elsewhere `clean` noised to index t with the noise z."""
        abar = self.sm.diffusion.abar(t)
        return torch.where(keep, state, math.sqrt(abar) * clean + math.sqrt(1 - abar) * z)

    def image(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return x if self.known is None else self.repaint(x, self.edit, self.known, t, self.noise.draw(x, "known"))

    def crop(self, c: torch.Tensor, defect: torch.Tensor | None, t: int) -> torch.Tensor:
        if self.known_crop is None:
            return c
        z = self.noise.draw(self.known_crop, "known_crop")
        return torch.cat([self.repaint(c[:, RGB], defect, self.known_crop, t, z), c[:, MASK_CHANNEL:]], dim=1)

    @staticmethod
    def defect(point: Point) -> torch.Tensor:
        """Where the crop's x0 prediction shows the defect (its mask channel > 0)."""
        return point.x0_l[:, MASK_CHANNEL : MASK_CHANNEL + 1] > 0


def set_gates(sm: Sampler, walk: Walk, falloff: float) -> None:
    """G_x and G_c for falloff f; without gating ones (x everywhere, and the crop is never rectified)."""
    s, ones = sm.s, torch.ones(1, 1, 1, 1, device=walk.x.device)
    walk.gate_x = global_gate(*walk.x.shape[2:], sm.windows + sm.w // 2, s.gate_radius, falloff) if s.gating else ones
    walk.gate_c = crop_gate(sm.w, falloff, walk.x.device) if s.gating else ones
    walk.falloff = falloff


def reanchor(sm: Sampler, walk: Walk, t: int) -> None:
    """On first reaching T_e the crop restarts as the window of x (a mask channel keeps its state)."""
    if t == walk.reanchor_at:
        walk.c = torch.cat([sm.window(walk.x), walk.c[:, MASK_CHANNEL:]], dim=1)
        walk.reanchor_at = None


def reverse_step(sm: Sampler, walk: Walk, region: KnownRegion, t: int, target: int) -> dict:
    """Refresh the gates, rectify at t (steps 1-5), then DDIM both states down to `target` (step 6)."""
    s = sm.s
    draw = region.noise.draw if s.eta > 0 else lambda like, role: None
    if s.gating and target % s.gate_every == 0:
        set_gates(sm, walk, sm.diffusion.abar(target))
    point, x, c, loss = rectify(sm, walk, t)
    if s.phase(t) != "free":
        walk.final_loss = loss
    abar_t, abar_prev = sm.diffusion.abar(t), sm.diffusion.abar(target)
    # per-sample generators serve every role in turn: the order of the draws is part of what a seed means
    x = ddim_step(point.x0_g, point.eps_g, abar_t, abar_prev, s.eta, draw(x, "ddim_x"))
    c = ddim_step(point.x0_l, point.eps_l, abar_t, abar_prev, s.eta, draw(c, "ddim_crop"))
    walk.x = region.image(x, target)
    if region.known_crop is not None:
        walk.defect = KnownRegion.defect(point)
    walk.c = region.crop(c, walk.defect, target)
    walk.lr_base, walk.reg, walk.last_move = walk.lr_base * s.lr_decay, walk.reg * s.reg_decay, "reverse"
    return dict(kind="reverse", t=t, target=target, x=walk.x, crop=walk.c, x0=point.x0_g, loss=loss)


def rectify_before_undo(sm: Sampler, walk: Walk, t: int) -> dict:
    """Steps 1-5 once more at t: the optimised states, not their DDIM updates, are what the undo re-noises."""
    _, walk.x, walk.c, loss = rectify(sm, walk, t, need_predictions=False)
    return dict(kind="pre_undo", t=t, target=t, x=walk.x, crop=walk.c, x0=None, loss=loss)


def undo_step(sm: Sampler, walk: Walk, region: KnownRegion, t: int, target: int) -> dict:
    """Re-noise both states from t up to target = t + 1 with fresh noise."""
    beta = float(sm.diffusion.betas[target])
    walk.x = region.image(diffusion_undo(walk.x, beta, region.noise.draw(walk.x, "undo_x")), target)
    walk.c = region.crop(diffusion_undo(walk.c, beta, region.noise.draw(walk.c, "undo_crop")), walk.defect, target)
    walk.lr_base, walk.reg, walk.last_move = walk.lr_base / sm.s.lr_decay, walk.reg / sm.s.reg_decay, "undo"
    return dict(kind="undo", t=t, target=target, x=walk.x, crop=walk.c, x0=None, loss=None)


def mask_channel_noise(noise: NoiseSource | None, x_T: torch.Tensor, windows, w: int, like) -> torch.Tensor:
    """The initial noise of a local model's extra (mask) channels: from `noise`, or without one from x_T
    itself, each window shifted by w (wrapping round), so the walk stays a function of x_T; that noise is
    independent of the crop's RGB when the image is at least twice the window each way."""
    if noise is not None:
        return noise.draw(like, "crop_mask")
    channels = [k % x_T.shape[1] for k in range(like.shape[1])]
    return crop_windows(torch.roll(x_T, shifts=(w, w), dims=(2, 3)), windows, w)[:, channels].clone()


def start_walk(sm: Sampler, region: KnownRegion, noise: NoiseSource | None, x_T: torch.Tensor, t0: int) -> Walk:
    """x = x_T, the crop a copy of its window (not new noise); a mask channel gets its own initial noise."""
    x = region.image(x_T.clone(), t0)
    c = sm.window(x_T).clone()
    extra_channels = getattr(sm.local_model, "in_channels", 3) - c.shape[1]
    if extra_channels > 0:
        c = torch.cat([c, mask_channel_noise(noise, x_T, sm.windows, sm.w, c[:, :extra_channels])], dim=1)
    defect = torch.zeros_like(c[:, :1], dtype=torch.bool)
    s, ones = sm.s, torch.ones(1, 1, 1, 1, device=x.device)
    walk = Walk(x, region.crop(c, defect, t0), s.lr_xt, s.reg, s.initial_falloff, ones, ones,
                torch.zeros(len(x_T), dtype=torch.float64), defect=defect,
                reanchor_at=s.T_e if s.multistage and s.reanchor else None)
    set_gates(sm, walk, s.initial_falloff)
    return walk


def _recorder(result: DMGRResult, process_every: int | None, trace: bool, then) -> Callable[[dict], None]:
    """`record_process` and `record_trace` as a callback that fills `result`'s lists, then calls `then`."""

    def record(move: dict) -> None:
        kind, target, x0s = move["kind"], move["target"], result.x0_process
        if kind == "reverse" and process_every is not None and target % process_every == 0:
            if x0s and x0s[-1][0] == target:  # back down to the index last recorded: keep the later prediction
                x0s.pop()
            x0s.append((target, move["x0"]))
        if trace and kind == "reverse":
            result.trace.append(dict(t=move["t"], prev_t=target, x_prev=move["x"], crop_prev=move["crop"],
                                     loss=move["loss"]))
        elif trace and kind == "pre_undo":
            result.pre_undo.append((move["x"], move["crop"]))
        if then is not None:
            then(move)

    return record


def dmgr_sample(
    global_model: nn.Module,
    local_model: nn.Module,
    diffusion: Diffusion,
    x_T: torch.Tensor,
    windows: torch.Tensor,
    classes: torch.Tensor,
    window_size: int,
    settings: DMGRSettings,
    noise: NoiseSource | None = None,
    precision: str = "fp32",
    record_process: bool = False,
    record_trace: bool = False,
    counter: PassCounter | None = None,
    progress: bool = False,
    known: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
) -> DMGRResult:
    """Run the DMGR walk from x_T.

    windows: (B, 2) top-left (x, y) of each sample's window; classes: (B,) local-model labels.
    noise: needed for time travel, eta > 0 and `known` (per-sample generators or a replay).
    The crop state starts as the window of x_T; a local model with a mask channel (4 inputs) gets that
    channel's initial noise from `noise` ("crop_mask"), or without one from x_T (`mask_channel_noise`).
    known: (B, 3, H, W) real backgrounds in [-1, 1]: the known region (`KnownRegion`, noise roles "known" and,
    with a mask channel, "known_crop").
    callback: called after every move with a dict: kind ("reverse"; "pre_undo", the optimisation before an
    undo; "undo"), t, target (the index moved to), x and crop (the states after the move), x0 (a reverse
    step's global x0 prediction, else None) and loss ((B,) rectification loss, None for undos).
    record_process and record_trace are callbacks too, filling x0_process, trace and pre_undo of the result.
    """
    s = settings
    windows, classes = windows.to(x_T.device).long(), classes.to(x_T.device).long()
    mask_channel = has_mask_channel(getattr(local_model, "in_channels", 3))
    if (s.time_travel or s.eta > 0 or known is not None) and noise is None:
        raise ValueError("time travel, eta > 0 and known backgrounds need a noise source (per-sample generators)")
    indices = time_walk(diffusion.num_steps, s.time_travel, s.jump_length, s.jump_n_sample)
    moves = list(zip(indices[:-1], indices[1:]))
    if any(target >= t and target != t + 1 for t, target in moves):
        raise ValueError(f"time travel goes up one index at a time, got {moves}")
    sm = Sampler(global_model, local_model, diffusion, windows, classes, window_size, s, precision, counter)
    region = KnownRegion(sm, known, noise, mask_channel)
    walk = start_walk(sm, region, noise, x_T, indices[0])
    result = DMGRResult(walk.x, walk.c, windows, classes, walk.falloff, walk.final_loss)
    emit = _recorder(result, s.record_every if record_process else None, record_trace, then=callback)
    for t, target in progress_bar(moves, desc="dmgr", disable=not progress, leave=False):
        reanchor(sm, walk, t)
        if target < t:
            emit(reverse_step(sm, walk, region, t, target))
            continue
        if walk.last_move == "reverse" and s.optimise_before_undo:
            emit(rectify_before_undo(sm, walk, t))
        emit(undo_step(sm, walk, region, t, target))
    result.image, result.crop, result.gate_falloff, result.final_loss = walk.x, walk.c, walk.falloff, walk.final_loss
    return result
