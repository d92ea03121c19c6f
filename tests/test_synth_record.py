"""dmgr.synth.record is the only writer of the sample json, and docs/data.md's table is its specification:
every key the table documents is written in some case, and every key written is documented."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
from synth_support import ROOT
from test_synth_backgrounds import IMAGES, write_boards
from test_synth_config import spec_of

from dmgr.synth.engine import Attempt, DefectResult
from dmgr.synth.geometry import image_window_box
from dmgr.synth.placement import Placement
from dmgr.synth.plan import plan_sample
from dmgr.synth.policy import Rules, Screened, decide, judge
from dmgr.synth.record import config_problem, outcome_json

DIGESTS = {"global": "g", "local": "l"}
NESTED = ("checkpoints", "background", "screen", "empty_mask")  # dicts whose keys the table names in prose


def documented_keys() -> set[str]:
    """The keys in the first column of docs/data.md's json table ("`a`, `b`" rows name several)."""
    text = (ROOT / "docs" / "data.md").read_text()
    table = text[text.index("| key | content |"):].split("\n\n")[0]
    return {key for row in table.splitlines()[2:] for key in re.findall(r"`([^`]+)`", row.split("|")[1])}


def written_keys(meta: dict) -> set[str]:
    keys = set(meta)
    for entry in meta.get("defects", []):
        keys |= {f"defects[].{k}" for k in entry}
    return keys


def scripted_outcomes(spec, script: dict):
    """Decided seeds from attempts made without a model: each defect at its first candidate, mask area and
    screen verdict from `script` by (seed, attempt)."""
    geometry = spec.backgrounds.geometry

    def make(plans):
        attempts = []
        for p in plans:
            area = script.get((p.seed, p.attempt), {}).get("area", 30)
            defects = []
            for d in p.defects:
                placed = d.placed(0, geometry) if d.candidates else d
                box = image_window_box(placed, geometry)
                defects.append(DefectResult(placed, box, box, area, 0.123456,
                                            Placement(len(d.candidates), 0, -0.0123456) if d.candidates else None))
            image = spec.backgrounds.image(p.background)
            mask = np.zeros(image.shape[:2], bool)
            x0, y0, x1, y1 = defects[0].window_box
            mask[y0:y1, x0:x1] = True
            attempts.append(Attempt(p, image, mask, defects, True, given=image))
        return attempts

    def screen(attempt):
        reasons = script.get((attempt.plan.seed, attempt.plan.attempt), {}).get("reasons", [])
        return Screened({"fidelity": [0.5]}, reasons)

    rules = Rules({"nonfinite": 3, "empty_mask": 3, "screen": 2}, screen=True, on_screen_exhausted="best")
    plans = [plan_sample(s, spec.dataset, spec.backgrounds) for s in (0, 1, 2)]
    return decide(plans, make, lambda a: judge(a, [4.0] * len(spec.dataset.classes), screen),
                  lambda p: plan_sample(p.seed, spec.dataset, spec.backgrounds, p.attempt + 1), rules)


def test_every_documented_json_key_is_written_and_every_written_key_documented(tmp_path):
    folder = write_boards(tmp_path / "in", 3)
    spec = spec_of([*IMAGES, f"dataset.images={folder}", "dataset.defects_per_image=2", f"out_dir={tmp_path / 'r'}"])
    spec = replace(spec, screen=replace(spec.screen, enabled=True))
    script = {(0, 0): {"reasons": ["seam"]}, (0, 1): {"reasons": ["seam"]},  # screen: flagged, the best of two
              **{(1, a): {"area": 0} for a in range(3)}}  # empty masks: flagged after three attempts
    metas = [outcome_json(spec, DIGESTS, o) for o in scripted_outcomes(spec, script)]
    assert metas[0]["screen"]["flagged"] and metas[1]["empty_mask"]["flagged"] and metas[2]["screen"]["accepted"]
    written = set().union(*(written_keys(m) for m in metas))
    boards = spec_of([f"out_dir={tmp_path / 'b'}"])
    board = plan_sample(0, boards.dataset)
    box = [*board.window, board.window[0] + 16, board.window[1] + 16]
    attempt = Attempt(board, np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), bool),
                      [DefectResult(board.defects[0], box, None, 0, 1.0)], True)
    written |= set(outcome_json(boards, DIGESTS, decide([board], lambda plans: [attempt], lambda a: judge(
        a, [0.0] * 6, None), lambda p: p, Rules({"nonfinite": 1, "empty_mask": 1, "screen": 1}))[0]))
    documented = documented_keys()
    assert written == documented, (sorted(written - documented), sorted(documented - written))
    for nested in NESTED:
        assert nested in documented
    for key in ("accepted", "attempt", "attempts", "reasons", "scores", "rejected"):
        assert key in metas[0]["screen"]
    assert set(metas[1]["empty_mask"]) == {"mask_area", "min_area", "attempts", "flagged"}
    assert metas[0]["defects"][0]["final_loss"] == 0.1235 and metas[0]["defects"][0]["placement"]["score"] == -0.01235


def test_a_written_json_passes_the_adoption_check_and_a_changed_one_does_not(tmp_path):
    folder = write_boards(tmp_path / "in", 3)
    spec = spec_of([*IMAGES, f"dataset.images={folder}", f"out_dir={tmp_path / 'r'}"])
    metas = {o.seed: outcome_json(spec, DIGESTS, o) for o in scripted_outcomes(spec, {(0, 0): {"area": 0}})}
    assert metas[0]["attempt"] == 1
    assert config_problem(spec, DIGESTS, metas) is None
    metas[0]["defects"][0]["placement"]["chosen"] = 1  # its boxes are candidate 0's
    assert config_problem(spec, DIGESTS, metas).startswith("seed 0: its json's defects is window_box")
