"""dmgr.synth.policy without a model: a scripted engine returns attempts whose checks are known, and the
policy's retries, best-of, skips and attempt budget are read off the outcomes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dmgr.synth.config import NonfiniteSettings, PlacementSettings, ScreenSettings
from dmgr.synth.engine import Attempt, DefectResult
from dmgr.synth.plan import Defect, SamplePlan
from dmgr.synth.policy import NonFiniteSample, Rules, Screened, decide, judge, rules_for

MINIMA = [4.0, 10.0]  # per class: the minimum mask area


def scripted(script: dict[tuple[int, int], dict], calls: list[list[tuple[int, int]]]):
    """A fake engine: the attempt of (seed, attempt) is finite unless script says nan, its one defect's mask
    area script's area (default 20), and its screen reasons and fidelity script's."""

    def make(plans: list[SamplePlan]) -> list[Attempt]:
        calls.append([(p.seed, p.attempt) for p in plans])
        attempts = []
        for p in plans:
            step = script.get((p.seed, p.attempt), {})
            defect = DefectResult(p.defects[0], [0, 0, 8, 8], None, step.get("area", 20), 0.0)
            attempts.append(Attempt(p, np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool), [defect],
                                    not step.get("nan", False)))
        return attempts

    def screen(attempt: Attempt) -> Screened:
        step = script.get((attempt.plan.seed, attempt.plan.attempt), {})
        return Screened({"fidelity": [step.get("fidelity", 0.9)]}, step.get("reasons", []))

    return make, screen


def run(script: dict, rules: Rules, seeds=(0,), class_id: int = 0, screen: bool = True):
    calls: list = []
    make, screened = scripted(script, calls)
    plans = [SamplePlan(s, (Defect(class_id, "c", (0, 0)),)) for s in seeds]
    outcomes = decide(plans, make, lambda a: judge(a, MINIMA, screened if screen else None),
                      lambda p: replace(p, attempt=p.attempt + 1), rules)
    return outcomes, calls


RULES = rules_for(NonfiniteSettings(), PlacementSettings(), ScreenSettings())  # the defaults


def test_the_default_rules_give_the_empty_mask_more_attempts_than_the_screen():
    assert RULES == Rules({"nonfinite": 3, "empty_mask": 6, "screen": 4}, screen=True, on_screen_exhausted="best")
    assert RULES.retries(3, "empty_mask") and not RULES.retries(3, "screen") and not RULES.retries(0, None)


def test_a_passing_attempt_is_accepted_at_once():
    (outcome,), calls = run({}, RULES)
    assert outcome.status == "accepted" and outcome.attempts == 1 and outcome.retries == []
    assert outcome.verdict.reason is None and outcome.verdict.screened.scores == {"fidelity": [0.9]}
    assert calls == [[(0, 0)]]


def test_rejections_are_made_again_together_per_round_until_they_pass():
    script = {(0, 0): {"reasons": ["seam"]}, (1, 0): {"area": 2}, (1, 1): {"reasons": ["fidelity"]}}
    (first, second, third), calls = run(script, RULES, seeds=(0, 1, 2))
    assert calls == [[(0, 0), (1, 0), (2, 0)], [(0, 1), (1, 1)], [(1, 2)]]
    assert first.retries == [(0, "screen")] and first.kept.plan.attempt == 1 and first.status == "accepted"
    assert [r.attempt for r in first.rejected] == [0]
    assert second.retries == [(0, "empty_mask"), (1, "screen")] and second.attempts == 3
    assert [r.attempt for r in second.rejected] == [1]  # an empty mask is never scored by the screen
    assert third.attempts == 1


def test_spent_screen_attempts_write_the_best_ranked_one_flagged():
    script = {(0, 0): {"reasons": ["seam", "area"], "fidelity": 0.99}, (0, 1): {"reasons": ["seam"], "fidelity": 0.2},
              (0, 2): {"reasons": ["seam"], "fidelity": 0.6}, (0, 3): {"reasons": ["fidelity", "seam"]}}
    (outcome,), _ = run(script, RULES)
    assert outcome.status == "flagged" and outcome.attempts == 4
    assert outcome.kept.plan.attempt == 2 and outcome.verdict.attempt == 2  # fewest failed checks, then fidelity
    assert [r.attempt for r in outcome.rejected] == [0, 1, 3]


@pytest.mark.parametrize("on_exhausted, status", [("flag", "flagged"), ("skip", "skipped")])
def test_spent_screen_attempts_flag_or_skip_the_last(on_exhausted, status):
    script = {(0, a): {"reasons": ["seam"]} for a in range(4)}
    (outcome,), _ = run(script, replace(RULES, on_screen_exhausted=on_exhausted))
    assert outcome.status == status and outcome.kept.plan.attempt == 3 and outcome.verdict.reason == "screen"


def test_the_one_budget_makes_a_last_screened_attempt_that_came_out_empty_again():
    """placement.max_attempts (6) > screen.max_attempts (4): attempt 3, the screen's last, is empty and is made
    again under the empty mask's larger maximum; attempt 4 is rejected by the screen, whose maximum is spent."""
    script = {(0, 0): {"reasons": ["seam"]}, (0, 1): {"reasons": ["seam", "area"]}, (0, 2): {"reasons": ["seam"],
              "fidelity": 0.1}, (0, 3): {"area": 0}, (0, 4): {"reasons": ["fidelity", "seam", "area"]}}
    (outcome,), calls = run(script, RULES)
    assert [c[0][1] for c in calls] == [0, 1, 2, 3, 4] and outcome.attempts == 5
    assert outcome.retries == [(0, "screen"), (1, "screen"), (2, "screen"), (3, "empty_mask")]
    assert outcome.status == "flagged" and outcome.kept.plan.attempt == 0  # the best-ranked of the screened


@pytest.mark.parametrize("on_exhausted, status", [("flag", "flagged"), ("skip", "skipped")])
def test_masks_below_the_class_minimum_are_flagged_or_skipped_after_their_attempts(on_exhausted, status):
    script = {(0, a): {"area": 9} for a in range(6)}  # class 1's minimum is 10
    rules = Rules({"nonfinite": 3, "empty_mask": 6, "screen": 4}, on_small_exhausted=on_exhausted)
    (outcome,), calls = run(script, rules, class_id=1, screen=False)
    assert len(calls) == 6 and outcome.status == status and outcome.verdict.reason == "empty_mask"
    assert outcome.verdict.small.areas == [9] and outcome.verdict.small.minima == [10.0]
    (passes,), _ = run(script, rules, class_id=0, screen=False)  # class 0's minimum is 4
    assert passes.status == "accepted"


def test_nan_is_retried_then_stops_the_run_naming_the_seed():
    (outcome,), _ = run({(0, 0): {"nan": True}}, RULES)
    assert outcome.retries == [(0, "nonfinite")] and outcome.status == "accepted"
    with pytest.raises(NonFiniteSample, match="^seed 0: the image holds NaN/Inf after 3 attempt"):
        run({(0, a): {"nan": True} for a in range(3)}, RULES)
    with pytest.raises(NonFiniteSample, match="after 1 attempt.*nonfinite.action=stop"):
        run({(0, 0): {"nan": True}}, replace(RULES, stop_on_nonfinite=True))
