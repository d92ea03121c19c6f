"""DMGR-N x M in the few-defect curve is what the export hands a user: M samples the screen accepted, seeds added
until there are M (flagged ones counted only with include_flagged), read through real webdataset shards; balanced,
M / 6 of each class, further seeds weighted to the classes short of theirs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dmgr.eval import fewshot
from dmgr.eval.fewshot import CurveSettings, sources_for
from dmgr.schema import build

SIZE = 64  # the curve's boards


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buffer, format="png")
    return buffer.getvalue()


class FakeSynthesis:
    """Stands in for `dmgr.synth`: writes a run's shard with one sample per seed, of class seed % 6 (with class
    weights, the seed's turn among the classes weighted above 0), the samples `flagged(seed, class)` picks written
    flagged by the screen; records every call."""

    def __init__(self, flagged) -> None:
        self.flagged, self.calls = flagged, []

    def __call__(self, run: Path, seeds: tuple[int, int], weights: list[float] | None) -> Path:
        self.calls.append((run.name, seeds, weights))
        shard = run / "shards" / "000000.tar"
        if shard.exists():
            return run
        shard.parent.mkdir(parents=True)
        classes = [c for c, w in enumerate(weights or [1] * 6) if w > 0]
        with wds.TarWriter(str(shard)) as sink:
            for seed in range(*seeds):
                class_id = classes[seed % len(classes)]
                meta = {"seed": seed, "class_id": class_id, "window_box": [0, 0, 4, 4],
                        "screen": {"flagged": self.flagged(seed, class_id)}}
                mask = Image.new("L", (SIZE, SIZE), 255 if seed % 2 else 0)
                buffer = io.BytesIO()
                mask.save(buffer, format="png")
                sink.write({"__key__": f"{seed:06d}", "png": _png(seed), "mask.png": buffer.getvalue(),
                            "json": json.dumps(meta).encode()})
        return run


def seeds_read(boards) -> list[int]:
    return [round((float(v) + 1) * 127.5) for v in boards.images[:, 0, 0, 0]]


def test_seeds_are_added_until_m_accepted_and_the_first_m_accepted_are_read(tmp_path):
    synthesis = FakeSynthesis(lambda seed, _: seed % 3 == 0)  # a third rejected by the screen
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (4, 8), include_flagged=False, balance=False)
    # seeds 0-3 give 2 accepted (0 and 3 flagged); 8 more at that rate (at least 8) give 8 accepted in all
    assert [r.name for r in runs] == ["synth-0-3", "synth-4-11"]
    assert seeds_read(fewshot.read_pairs(runs, 4, include_flagged=False, balance=False)) == [1, 2, 4, 5]
    assert seeds_read(fewshot.read_pairs(runs, 8, include_flagged=False, balance=False)) == [1, 2, 4, 5, 7, 8, 10, 11]
    assert fewshot.read_pairs(runs, 4, include_flagged=False, balance=False).classes.tolist() == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="holds 8 accepted samples, the curve needs 9"):
        fewshot.read_pairs(runs, 9, include_flagged=False, balance=False)
    # a rerun resumes the runs it has and adds none; a larger M only adds runs after them
    synthesis.calls.clear()
    again = fewshot.synthesise_pairs(tmp_path, synthesis, (4, 8), include_flagged=False, balance=False)
    assert again == runs and synthesis.calls == [("synth-0-3", (0, 4), None), ("synth-4-11", (4, 12), None)]
    more = fewshot.synthesise_pairs(tmp_path, synthesis, (4, 8, 12), include_flagged=False, balance=False)
    assert more[:2] == runs and more[2].name.startswith("synth-12-")
    assert len(fewshot.read_pairs(more, 12, include_flagged=False, balance=False).images) == 12


def test_with_include_flagged_the_first_m_seeds_are_the_pairs(tmp_path):
    synthesis = FakeSynthesis(lambda seed, _: seed % 3 == 0)
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (4, 8), include_flagged=True, balance=False)
    assert [r.name for r in runs] == ["synth-0-3", "synth-4-7"]
    assert seeds_read(fewshot.read_pairs(runs, 8, include_flagged=True, balance=False)) == list(range(8))


def test_a_run_the_screen_rejected_whole_is_passed_over(tmp_path):
    synthesis = FakeSynthesis(lambda seed, _: seed < 4)
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (4,), include_flagged=False, balance=False)
    assert [r.name for r in runs] == ["synth-0-3", "synth-4-7"]
    assert seeds_read(fewshot.read_pairs(runs, 4, include_flagged=False, balance=False)) == [4, 5, 6, 7]


def test_a_screen_that_rejects_everything_stops_at_the_seed_budget(tmp_path, caplog):
    synthesis = FakeSynthesis(lambda seed, _: True)
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (4,), include_flagged=False, balance=False, budget=4)
    assert sum(end - first for _, (first, end), _ in synthesis.calls) == 16
    assert "16 seeds gave 0 usable samples of the 4 asked" in caplog.text
    assert [r.name for r in runs] == ["synth-0-3", "synth-4-7", "synth-8-11", "synth-12-15"]
    assert fewshot.tally(runs, include_flagged=False) == ([0] * 6, [3, 3, 3, 3, 2, 2])
    rows = sources_for(1, runs, build(CurveSettings, dict(per_class=(1,), pairs=(4,), balance=False)))
    assert set(rows) == {"real-1", "cut-paste-1x4"}  # no DMGR rows without a usable sample


def test_rows_of_an_m_the_budget_could_not_fill_hold_the_accepted_samples_there_are(tmp_path):
    synthesis = FakeSynthesis(lambda seed, _: seed % 4 != 1)  # one seed in four accepted
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (6,), include_flagged=False, balance=False, budget=2)
    assert fewshot.seed_range(runs[-1])[1] == 12
    rows = sources_for(1, runs, build(CurveSettings, dict(per_class=(1,), pairs=(6,), balance=False)))
    assert seeds_read(rows["dmgr-1x6"]) == [1, 5, 9]
    assert len(rows["real-1+dmgr-1x6"].images) == 6 + 3 and len(rows["cut-paste-1x6"].images) == 6


def test_balanced_pairs_hold_m_over_6_of_each_class_and_further_seeds_go_to_the_short_ones(tmp_path):
    synthesis = FakeSynthesis(lambda seed, c: c == 1 and seed < 12)  # the first mousebites rejected
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (12,), include_flagged=False, balance=True)
    # seeds 0-11: two of each class, both mousebites flagged; mousebite's shortfall of 2 at acceptance 0 of 2
    # counts 2 x (2 + 1) = 6 seeds, at least 8, all weighted to mousebite
    assert [r.name for r in runs] == ["synth-0-11", "synth-12-19"]
    assert fewshot.planned_weights(runs[1]) == [0, 1, 0, 0, 0, 0] and fewshot.planned_weights(runs[0]) is None
    pairs = fewshot.read_pairs(runs, 12, include_flagged=False, balance=True)
    assert seeds_read(pairs) == [0, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]
    assert sorted(pairs.classes.tolist()) == [c for c in range(6) for _ in range(2)]
    # the first 12 accepted by seed would hold no mousebite
    assert 1 not in fewshot.read_pairs(runs, 10, include_flagged=False, balance=False).classes.tolist()
    # a rerun resumes each run with the weights it was planned with
    synthesis.calls.clear()
    assert fewshot.synthesise_pairs(tmp_path, synthesis, (12,), include_flagged=False, balance=True) == runs
    assert synthesis.calls == [("synth-0-11", (0, 12), None), ("synth-12-19", (12, 20), [0, 1, 0, 0, 0, 0])]


def test_top_up_weights_each_short_class_by_its_shortfall_over_its_acceptance():
    # quota 3: missinghole short by 1 at 1 of 2 accepted (2 seeds), mousebite by 3 with none of 1 (6 seeds)
    size, weights = fewshot.top_up([2, 0, 3, 3, 3, 3], [4, 1, 3, 3, 3, 3], [3] * 6)
    assert size == 9 and weights == [0.25, 0.75, 0, 0, 0, 0]
    assert fewshot.quotas(14, balance=True) == [3, 3, 2, 2, 2, 2] and fewshot.quotas(14, balance=False) is None


def test_a_class_the_screen_never_accepts_leaves_its_quota_empty_at_the_budget(tmp_path, caplog):
    synthesis = FakeSynthesis(lambda seed, c: c == 4)
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (12,), include_flagged=False, balance=True, budget=2)
    assert fewshot.seed_range(runs[-1])[1] == 24 and "24 seeds gave [2, 2, 2, 2, 0, 2] per class" in caplog.text
    rows = sources_for(1, runs, build(CurveSettings, dict(per_class=(1,), pairs=(12,))))
    assert sorted(rows["dmgr-1x12"].classes.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 5, 5]
