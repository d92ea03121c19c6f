"""The DMGR sampler: DDIM on the global model, rectified toward the local defect manifold.

Follows ALGORITHM.md (and the reference `FJ_DDIMSampler`) with two differences that do not change
results: every sample has its own class, window and backtracking (a whole-batch line search with an
accept mask), and the prediction at an accepted point is reused instead of being recomputed (the
reference spends one extra forward per iteration).
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
from dmgr.progress import progress_bar
from dmgr.sampler.gates import crop_gate, global_gate
from dmgr.sampler.loss import disagreement_map, rectification_loss
from dmgr.sampler.masks import window_support
from dmgr.sampler.noise import NoiseSource
from dmgr.sampler.settings import DMGRSettings


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
    crop: torch.Tensor  # (B, 3, w, w) final crop state
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


_FIELDS = ("x", "c", "eps_g", "x0_g", "eps_l", "x0_l")


@dataclass
class _Point:
    """Predictions of both models at one (x, c), and the autograd leaves they hang from: one (x, c) pair
    per line-search attempt whose candidates some rows accepted (`torch.where` routes each row's gradient
    to the attempt it came from, so summing the leaves' gradients gives every row its own)."""

    x: torch.Tensor
    c: torch.Tensor
    eps_g: torch.Tensor
    x0_g: torch.Tensor
    eps_l: torch.Tensor
    x0_l: torch.Tensor
    leaves: list[tuple[torch.Tensor, torch.Tensor]]

    def where(self, rows: torch.Tensor, other: "_Point") -> "_Point":
        """This point on `rows` (a (B,) bool mask), `other` elsewhere."""
        mask = rows.view(-1, 1, 1, 1)
        fields = {n: torch.where(mask, getattr(self, n), getattr(other, n)) for n in _FIELDS}
        return _Point(**fields, leaves=other.leaves + self.leaves)

    def detached(self) -> "_Point":
        return _Point(*(getattr(self, n).detach() for n in _FIELDS), leaves=[])


class _Rectifier:
    """Steps 1-5 (the rectification at one index) for one call of `dmgr_sample`, and the memos they keep."""

    def __init__(
        self, global_model, local_model, diffusion, windows, classes, window_size, settings, precision, counter
    ):
        self.global_model, self.local_model = global_model, local_model
        self.diffusion, self.s = diffusion, settings
        self.windows, self.classes, self.w = windows, classes, window_size
        self.precision, self.counter = precision, counter
        self.weight_map: torch.Tensor | None = None
        self.weight_t: int | None = None
        self.local_memo: tuple | None = None  # (t, c, eps_l) of the last local forward without gradient

    def local_eps(self, c: torch.Tensor, t: int, steps: torch.Tensor, grad_c: bool) -> tuple[torch.Tensor, bool]:
        """(eps_l, whether the network ran). While only x moves (anchoring, and the line search's candidates)
        the crop is unchanged, so its prediction is reused: the same input gives the same output."""
        memo = self.local_memo
        if not grad_c and memo is not None and memo[0] == t and torch.equal(memo[1], c):
            return memo[2], False
        eps_l = model_eps(self.local_model, c, steps, self.classes, self.precision)
        self.local_memo = None if grad_c else (t, c, eps_l)
        return eps_l, True

    def predict(self, x, c, t, grad_x, grad_c, phase) -> _Point:
        with torch.set_grad_enabled(grad_x or grad_c):
            x = x.detach().requires_grad_(grad_x)
            c = c.detach().requires_grad_(grad_c)
            abar = self.diffusion.abar(t)
            steps = self.diffusion.model_timesteps(t, x.shape[0], x.device)
            eps_g = model_eps(self.global_model, x, steps, None, self.precision)
            eps_l, local_ran = self.local_eps(c, t, steps, grad_c)
            point = _Point(x, c, eps_g, predict_x0(x, eps_g, abar), eps_l, predict_x0(c, eps_l, abar), [(x, c)])
        if self.counter is not None:
            self.counter.add(phase, "forward_grad_global" if grad_x else "forward_global")
            if local_ran:
                self.counter.add(phase, "forward_grad_local" if grad_c else "forward_local")
        return point

    def fit(self, p: _Point, t: int, weight_map) -> torch.Tensor:
        """Per-sample loss between the global prediction's window and the local prediction (Step 2)."""
        window = crop_windows(p.x0_g, self.windows, self.w)
        sqrt_abar = math.sqrt(self.diffusion.abar(t))
        return rectification_loss(
            window, p.x0_l[:, :3], sqrt_abar, self.s.multiscale_loss, weight_map, self.s.pyramid_levels
        )

    def loss(self, p: _Point, t, x_start, c_start, reg, weight_map) -> torch.Tensor:
        drift = ((p.x - x_start) ** 2).flatten(1).sum(1) + ((p.c - c_start) ** 2).flatten(1).sum(1)
        return self.fit(p, t, weight_map) + reg * drift.double()

    def update_weight_map(self, p: _Point, t: int) -> torch.Tensor | None:
        s = self.s
        active = s.use_loss_weight and s.multistage and s.loss_weight_until <= t <= s.T_e
        if active and self.weight_t != t:
            window = crop_windows(p.x0_g, self.windows, self.w)
            previous = None if self.weight_map is None else self.weight_map.detach()
            self.weight_map = disagreement_map(window, p.x0_l[:, :3], previous)
            self.weight_t = t
        return self.weight_map

    def rates(self, t: int, lr_base: float) -> tuple[float, float]:
        """(lr on x, lr on c) at t: the phase table of step 2."""
        abar, s = self.diffusion.abar, self.s
        lr = lr_base * math.sqrt(abar(t)) / math.sqrt(abar(0)) if s.smart_lr else lr_base
        return {"anchoring": (lr, 0.0), "free": (0.0, 0.0)}.get(s.phase(t), (lr, lr if s.gating else 0.0))

    def gradients(self, point: _Point, loss: torch.Tensor, grad_c: bool, phase: str):
        """d loss / d x and d loss / d c at `point` (None for c when the crop is not optimised)."""
        xs = [x for x, _ in point.leaves]
        cs = [c for _, c in point.leaves] if grad_c else []
        grads = torch.autograd.grad(loss.sum(), xs + cs, allow_unused=True)
        if self.counter is not None:
            self.counter.add(phase, "backward")

        def total(parts, like):
            return sum((g for g in parts if g is not None), torch.zeros_like(like))

        return total(grads[: len(xs)], point.x), (total(grads[len(xs) :], point.c) if grad_c else None)

    def line_search(self, point, loss, grad_x, grad_c, rate_x, rate_c, gate_x, gate_c, t, x_start, c_start, reg,
                    weight_map, keep_graph, phase) -> _Point:
        """Step 4: every sample moves against its gradient at its own rate, halved (x backtrack) until its
        loss does not rise; after max_backtracks halvings it stays where it is. Candidates are evaluated
        for the whole batch each attempt, so a sample never depends on which batch-mates still search;
        `rate_x` / `rate_c` (B,) are updated in place and carry over to the next iteration."""
        here_x, here_c = point.x.detach(), point.c.detach()
        searching = torch.ones_like(loss, dtype=torch.bool)
        chosen = None
        for attempt in range(self.s.max_backtracks + 1):
            last_try = attempt == self.s.max_backtracks
            if last_try:
                rate_x[searching], rate_c[searching] = 0.0, 0.0
            cand_x = here_x - rate_x.view(-1, 1, 1, 1) * gate_x * grad_x
            cand_c = here_c if grad_c is None else here_c - rate_c.view(-1, 1, 1, 1) * gate_c * grad_c
            cand = self.predict(cand_x, cand_c, t, keep_graph, keep_graph and grad_c is not None, phase)
            with torch.no_grad():
                new_loss = self.loss(cand, t, x_start, c_start, reg, weight_map)
            ok = searching & (torch.isfinite(new_loss) & (new_loss <= loss) | last_try)
            if ok.any():
                chosen = cand if chosen is None else cand.where(ok, chosen)
            searching &= ~ok
            if not searching.any():
                break
            rate_x[searching] *= self.s.backtrack
            rate_c[searching] *= self.s.backtrack
        return chosen

    def step(self, x, c, t, lr_base, reg, gate_x, gate_c, need_predictions=True):
        """Steps 1-5 of ALGORITHM.md at index t: (final point or None, x, c, per-sample loss)."""
        batch, phase = x.shape[0], self.s.phase(t)
        lr_x, lr_c = self.rates(t, lr_base)
        if lr_x == 0.0 and lr_c == 0.0:
            point = self.predict(x, c, t, False, False, phase) if need_predictions else None
            return point, x, c, torch.zeros(batch, dtype=torch.float64)
        optimise_c = lr_c > 0
        x_start, c_start = x.detach(), c.detach()
        rate_x = torch.full((batch,), lr_x, dtype=torch.float32, device=x.device)
        rate_c = torch.full((batch,), lr_c, dtype=torch.float32, device=x.device)
        point = self.predict(x, c, t, True, optimise_c, phase)
        weight_map = self.update_weight_map(point, t)
        for k in range(self.s.iterations):
            with torch.enable_grad():
                loss = self.loss(point, t, x_start, c_start, reg, weight_map)
            grad_x, grad_c = self.gradients(point, loss, optimise_c, phase)
            weight_map = None if weight_map is None else weight_map.detach()
            point = self.line_search(
                point, loss.detach(), grad_x, grad_c, rate_x, rate_c, gate_x, gate_c, t, x_start, c_start, reg,
                weight_map, keep_graph=k < self.s.iterations - 1, phase=phase,
            )
        with torch.no_grad():
            final = self.fit(point, t, weight_map)
        point = point.detached()
        return point, point.x, point.c, final


def _mask_channel_noise(noise: NoiseSource | None, x_T: torch.Tensor, windows, w: int, like) -> torch.Tensor:
    """The initial noise of a local model's extra (mask) channels: from `noise`, or without one from x_T
    itself, each window shifted by w (wrapping round), so the walk stays a function of x_T; that noise is
    independent of the crop's RGB when the image is at least twice the window each way."""
    if noise is not None:
        return noise.draw(like, "crop_mask")
    channels = [k % x_T.shape[1] for k in range(like.shape[1])]
    return crop_windows(torch.roll(x_T, shifts=(w, w), dims=(2, 3)), windows, w)[:, channels].clone()


class _Walk:
    """What DMGR carries from one index of the walk to the next (both states, the decaying rates, the gates,
    the known background) and the moves that change it."""

    def __init__(self, rect: _Rectifier, noise: NoiseSource | None, x_T: torch.Tensor, known, t0: int):
        s, windows, w = rect.s, rect.windows, rect.w
        self.rect, self.s, self.diffusion, self.noise, self.known = rect, s, rect.diffusion, noise, known
        self.edit = None if known is None else window_support(*x_T.shape[2:], windows, w)
        self.x = self.condition(x_T.clone(), t0)
        c = crop_windows(x_T, windows, w).clone()
        extra_channels = getattr(rect.local_model, "in_channels", 3) - c.shape[1]
        if extra_channels > 0:
            c = torch.cat([c, _mask_channel_noise(noise, x_T, windows, w, c[:, :extra_channels])], dim=1)
        # A mask-generating local model on a known background: the crop's RGB is known too, except where the
        # crop's own latest mask prediction says defect, so the defect grows into the real window around it.
        self.known_crop = crop_windows(known, windows, w) if known is not None and extra_channels > 0 else None
        self.defect = torch.zeros_like(c[:, :1], dtype=torch.bool)
        self.c = self.condition_crop(c, t0)
        self.lr_base, self.reg = s.lr_xt, s.reg
        self.set_gates(s.initial_falloff)
        self.final_loss = torch.zeros(len(x_T), dtype=torch.float64)
        self.reanchor_at, self.last_move = (s.T_e if s.multistage and s.reanchor else None), None

    def repaint(self, state, keep, clean, t: int, z) -> torch.Tensor:
        """RePaint's rule: `state` where `keep`, elsewhere `clean` noised to index t with the noise z."""
        abar = self.diffusion.abar(t)
        return torch.where(keep, state, math.sqrt(abar) * clean + math.sqrt(1 - abar) * z)

    def condition(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Outside the windows: the known background noised to index t."""
        return x if self.known is None else self.repaint(x, self.edit, self.known, t, self.noise.draw(x, "known"))

    def condition_crop(self, c: torch.Tensor, t: int) -> torch.Tensor:
        """Outside the crop's latest predicted defect: the known window noised to index t."""
        if self.known_crop is None:
            return c
        z = self.noise.draw(self.known_crop, "known_crop")
        return torch.cat([self.repaint(c[:, :3], self.defect, self.known_crop, t, z), c[:, 3:]], dim=1)

    def set_gates(self, falloff: float) -> None:
        """G_x and G_c for falloff f; without gating ones (x everywhere, and the crop is never rectified)."""
        s, w, ones = self.s, self.rect.w, torch.ones(1, 1, 1, 1, device=self.x.device)
        centers = self.rect.windows + w // 2
        self.gate_x = global_gate(*self.x.shape[2:], centers, s.gate_radius, falloff) if s.gating else ones
        self.gate_c = crop_gate(w, falloff, self.x.device) if s.gating else ones
        self.falloff = falloff

    def reanchor(self, t: int) -> None:
        """On first reaching T_e the crop restarts as the window of x (its mask channel kept)."""
        if t == self.reanchor_at:
            self.c = torch.cat([crop_windows(self.x, self.rect.windows, self.rect.w), self.c[:, 3:]], dim=1)
            self.reanchor_at = None

    def reverse_step(self, t: int, target: int) -> dict:
        """Refresh the gates, rectify at t (steps 1-5), then DDIM both states down to `target` (step 6)."""
        s, draw = self.s, (self.noise.draw if self.s.eta > 0 else lambda like, role: None)
        if s.gating and target % s.gate_every == 0:
            self.set_gates(self.diffusion.abar(target))
        point, x, c, loss = self.rect.step(self.x, self.c, t, self.lr_base, self.reg, self.gate_x, self.gate_c)
        if s.phase(t) != "free":
            self.final_loss = loss
        abar_t, abar_prev = self.diffusion.abar(t), self.diffusion.abar(target)
        # per-sample generators serve every role in turn: the order of the draws is part of what a seed means
        x = ddim_step(point.x0_g, point.eps_g, abar_t, abar_prev, s.eta, draw(x, "ddim_x"))
        c = ddim_step(point.x0_l, point.eps_l, abar_t, abar_prev, s.eta, draw(c, "ddim_crop"))
        self.x = self.condition(x, target)
        if self.known_crop is not None:
            self.defect = point.x0_l[:, 3:4] > 0
        self.c = self.condition_crop(c, target)
        self.lr_base, self.reg, self.last_move = self.lr_base * s.lr_decay, self.reg * s.reg_decay, "reverse"
        return dict(kind="reverse", t=t, target=target, x=self.x, crop=self.c, x0=point.x0_g, loss=loss)

    def rectify_before_undo(self, t: int) -> dict:
        """Steps 1-5 once more at t: the optimised states, not their DDIM updates, are what the undo re-noises."""
        _, self.x, self.c, loss = self.rect.step(self.x, self.c, t, self.lr_base, self.reg, self.gate_x, self.gate_c,
                                                 need_predictions=False)
        return dict(kind="pre_undo", t=t, target=t, x=self.x, crop=self.c, x0=None, loss=loss)

    def undo_step(self, t: int, target: int) -> dict:
        """Re-noise both states from t up to target = t + 1 with fresh noise."""
        beta = float(self.diffusion.betas[target])
        self.x = self.condition(diffusion_undo(self.x, beta, self.noise.draw(self.x, "undo_x")), target)
        self.c = self.condition_crop(diffusion_undo(self.c, beta, self.noise.draw(self.c, "undo_crop")), target)
        self.lr_base, self.reg, self.last_move = self.lr_base / self.s.lr_decay, self.reg / self.s.reg_decay, "undo"
        return dict(kind="undo", t=t, target=target, x=self.x, crop=self.c, x0=None, loss=None)


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
    channel's initial noise from `noise` ("crop_mask"), or without one from x_T (_mask_channel_noise).
    known: (B, 3, H, W) real backgrounds in [-1, 1]. Then outside each window the global state is, at
    every index t, the background noised to t (RePaint's rule, noise role "known"); inside, DMGR as usual.
    With a mask-generating local model the crop's RGB follows the same rule outside the defect its latest
    x0 prediction shows (mask channel > 0; noise role "known_crop").
    callback: called after every move with a dict: kind ("reverse"; "pre_undo", the optimisation before an
    undo; "undo"), t, target (the index moved to), x and crop (the states after the move), x0 (a reverse
    step's global x0 prediction, else None) and loss ((B,) rectification loss, None for undos).
    record_process and record_trace are callbacks too, filling x0_process, trace and pre_undo of the result.
    """
    s = settings
    windows, classes = windows.to(x_T.device).long(), classes.to(x_T.device).long()
    if (s.time_travel or s.eta > 0 or known is not None) and noise is None:
        raise ValueError("time travel, eta > 0 and known backgrounds need a noise source (per-sample generators)")
    indices = time_walk(diffusion.num_steps, s.time_travel, s.jump_length, s.jump_n_sample)
    moves = list(zip(indices[:-1], indices[1:]))
    if any(target >= t and target != t + 1 for t, target in moves):
        raise ValueError(f"time travel goes up one index at a time, got {moves}")
    rect = _Rectifier(global_model, local_model, diffusion, windows, classes, window_size, s, precision, counter)
    walk = _Walk(rect, noise, x_T, known, indices[0])
    result = DMGRResult(walk.x, walk.c, windows, classes, walk.falloff, walk.final_loss)
    emit = _recorder(result, s.record_every if record_process else None, record_trace, then=callback)
    for t, target in progress_bar(moves, desc="dmgr", disable=not progress, leave=False):
        walk.reanchor(t)
        if target < t:
            emit(walk.reverse_step(t, target))
            continue
        if walk.last_move == "reverse" and s.optimise_before_undo:
            emit(walk.rectify_before_undo(t))
        emit(walk.undo_step(t, target))
    result.image, result.crop, result.gate_falloff, result.final_loss = walk.x, walk.c, walk.falloff, walk.final_loss
    return result
