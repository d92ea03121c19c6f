"""Where a sample is decided: each attempt gets a `Verdict` (it passes, or the first reason it fails: NaN/Inf,
a mask below its class's minimum area, the quality screen), and each seed an `Outcome` (accepted, flagged or
skipped) after as many attempts as the `Rules` allow. No model here: the attempts come from a `make`
function (the engine's, or a test's scripted one) and the screen's scores from a `screen` function."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from dmgr.synth.config import NonfiniteSettings, PlacementSettings, ScreenSettings
from dmgr.synth.engine import Attempt
from dmgr.synth.plan import SamplePlan
from dmgr.synth.screen import attempt_rank

log = logging.getLogger(__name__)

Reason = Literal["nonfinite", "empty_mask", "screen"]
Status = Literal["accepted", "flagged", "skipped"]


class NonFiniteSample(RuntimeError):
    """A sample's image held NaN/Inf and nonfinite.action forbids (more) retries."""


@dataclass(frozen=True)
class SmallMasks:
    """Per defect, the mask's area and its class's minimum area (the attempt fails: one is below)."""

    areas: list[int]
    minima: list[float]


@dataclass(frozen=True)
class Screened:
    """The quality screen's scores of one attempt and the checks it failed (none: passed)."""

    scores: dict
    reasons: list[str]


@dataclass(frozen=True)
class Verdict:
    """One attempt judged: `reason` None when it passes, else the first check it fails, with its details."""

    attempt: int
    reason: Reason | None
    small: SmallMasks | None = None  # reason empty_mask
    screened: Screened | None = None  # the screen's scores, whenever the screen scored the attempt


@dataclass(frozen=True)
class Rules:
    """How many attempts a seed may take and what happens when they are spent.

    The budget is one attempt counter per seed: attempt a (counted from 0) that fails for reason r is made
    again while a + 1 < max_attempts[r]. A seed failing for several reasons in turn shares that one counter,
    so each maximum bounds the attempts in all at the moment its reason fails. The defaults give the empty
    mask more (6) than the screen (4): a seed whose last screened attempt comes out empty is made again
    rather than written with a mask below its minimum."""

    max_attempts: dict[str, int]  # by reason: nonfinite.max_attempts, placement.max_attempts, screen.max_attempts
    stop_on_nonfinite: bool = False  # nonfinite.action=stop: the first NaN/Inf stops the run
    screen: bool = False  # screen.enabled: every attempt that passes the other checks is scored
    on_screen_exhausted: Literal["best", "flag", "skip"] = "best"  # write the best-ranked attempt (flagged),
    #   the last one (flagged), or drop the seed
    on_small_exhausted: Literal["flag", "skip"] = "flag"  # write the last attempt (flagged), or drop the seed

    def retries(self, attempt: int, reason: Reason | None) -> bool:
        """Whether the seed is made again after `attempt` failed for `reason`."""
        if reason is None or (reason == "nonfinite" and self.stop_on_nonfinite):
            return False
        return attempt + 1 < self.max_attempts[reason]


def rules_for(nonfinite: NonfiniteSettings, placement: PlacementSettings, screen: ScreenSettings) -> Rules:
    """The run's rules from the settings sections that set them."""
    return Rules({"nonfinite": nonfinite.max_attempts, "empty_mask": placement.max_attempts,
                  "screen": screen.max_attempts}, stop_on_nonfinite=nonfinite.action == "stop",
                 screen=screen.enabled, on_screen_exhausted=screen.on_exhausted,
                 on_small_exhausted=placement.on_exhausted)


@dataclass
class Outcome:
    """What becomes of one seed: the attempt written (or dropped, when skipped), its verdict, how many
    attempts were made, which were made again and why, and the screen's rejections of the others."""

    kept: Attempt
    verdict: Verdict
    status: Status
    attempts: int
    retries: list[tuple[int, Reason]] = field(default_factory=list)  # (attempt, reason) of each retried one
    rejected: list[Verdict] = field(default_factory=list)  # screen rejections, in order, but the kept one's

    @property
    def seed(self) -> int:
        return self.kept.plan.seed


def judge(attempt: Attempt, minima: Sequence[float], screen: Callable[[Attempt], Screened] | None) -> Verdict:
    """The attempt's verdict, checked in order: NaN/Inf, a defect mask below its class's minimum area (or
    empty), the quality screen (when `screen` is given)."""
    index = attempt.plan.attempt
    if not attempt.finite:
        return Verdict(index, "nonfinite")
    areas = [d.mask_area for d in attempt.defects]
    floors = [minima[d.defect.class_id] for d in attempt.defects]
    if not all(a >= f and a > 0 for a, f in zip(areas, floors)):
        return Verdict(index, "empty_mask", small=SmallMasks(areas, floors))
    if screen is None:
        return Verdict(index, None)
    screened = screen(attempt)
    return Verdict(index, "screen" if screened.reasons else None, screened=screened)


def _status(rules: Rules, reason: Reason | None) -> Status:
    if reason is None:
        return "accepted"
    exhausted = rules.on_screen_exhausted if reason == "screen" else rules.on_small_exhausted
    return "skipped" if exhausted == "skip" else "flagged"


@dataclass
class _Seed:
    """What a seed has gone through so far: its retries, the screen's rejections, the best-ranked of them."""

    retries: list[tuple[int, Reason]] = field(default_factory=list)
    rejected: list[Verdict] = field(default_factory=list)
    best: tuple[Attempt, Verdict] | None = None


def decide(plans: list[SamplePlan], make: Callable[[list[SamplePlan]], list[Attempt]],
           check: Callable[[Attempt], Verdict], replan: Callable[[SamplePlan], SamplePlan], rules: Rules
           ) -> list[Outcome]:
    """Make the plans, judge each attempt, and make the failed ones again at their next attempt (`replan`: a
    new placement with noise from a derived seed) until they pass or `rules` say stop; one `Outcome` per plan,
    in order. A seed whose attempts are spent keeps its last attempt or, with on_screen_exhausted=best and any
    screened attempt, the best-ranked of those (`attempt_rank`: also when the last attempt's mask was the
    failure); a NaN/Inf that may not be retried raises NonFiniteSample. Each round makes the failed plans of one
    batch together, so the batches depend only on the seeds and the batch."""
    outcomes: list[Outcome | None] = [None] * len(plans)
    seeds = [_Seed() for _ in plans]
    keep_best = rules.screen and rules.on_screen_exhausted == "best"
    pending = list(enumerate(plans))
    while pending:
        again = []
        for (i, plan), attempt in zip(pending, make([p for _, p in pending])):
            verdict, seed = check(attempt), seeds[i]
            reason = verdict.reason
            if reason == "screen":
                seed.rejected.append(verdict)
                if keep_best and (seed.best is None or _rank(verdict) < _rank(seed.best[1])):
                    seed.best = (attempt, verdict)
            if rules.retries(plan.attempt, reason):
                seed.retries.append((plan.attempt, reason))
                log.info("seed %d: attempt %d failed (%s): a new placement", plan.seed, plan.attempt, reason)
                again.append((i, replan(plan)))
                continue
            attempts, kept = plan.attempt + 1, attempt
            if reason in ("screen", "empty_mask") and seed.best is not None:
                kept, verdict = seed.best
            elif reason == "nonfinite":
                raise NonFiniteSample(
                    f"seed {plan.seed}: the image holds NaN/Inf after {attempts} attempt(s) (nonfinite.action="
                    f"{'stop' if rules.stop_on_nonfinite else 'retry'}, max_attempts="
                    f"{rules.max_attempts['nonfinite']}): check the checkpoints and precision; nothing of this "
                    "shard was written")
            status = _status(rules, verdict.reason)
            if verdict.reason == "empty_mask":
                log.warning("seed %d: a defect mask below its minimum area after %d attempt(s): %s", plan.seed,
                            attempts, status)
            others = [r for r in seed.rejected if r.attempt != verdict.attempt]
            outcomes[i] = Outcome(kept, verdict, status, attempts, seed.retries, others)
        pending = again
    return outcomes


def _rank(verdict: Verdict) -> tuple[int, float]:
    return attempt_rank(verdict.screened.scores, verdict.screened.reasons)
