"""DMGR-N x M in the few-defect curve is what the export hands a user: M samples the screen accepted, seeds added
until there are M (flagged ones counted only with include_flagged), read through real webdataset shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dmgr.eval import fewshot


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="png")
    return buffer.getvalue()


class FakeSynthesis:
    """Stands in for `dmgr.synth`: writes a run's shard with one sample per seed, the seeds `flagged` picks written
    flagged by the screen; records every call."""

    def __init__(self, flagged) -> None:
        self.flagged, self.calls = flagged, []

    def __call__(self, run: Path, seeds: tuple[int, int]) -> Path:
        self.calls.append((run.name, seeds))
        shard = run / "shards" / "000000.tar"
        if shard.exists():
            return run
        shard.parent.mkdir(parents=True)
        with wds.TarWriter(str(shard)) as sink:
            for seed in range(*seeds):
                meta = {"seed": seed, "class_id": seed % 6, "window_box": [0, 0, 4, 4],
                        "screen": {"flagged": self.flagged(seed)}}
                mask = Image.new("L", (8, 8), 255 if seed % 2 else 0)
                buffer = io.BytesIO()
                mask.save(buffer, format="png")
                sink.write({"__key__": f"{seed:06d}", "png": _png(seed), "mask.png": buffer.getvalue(),
                            "json": json.dumps(meta).encode()})
        return run


def seeds_read(boards) -> list[int]:
    return [round((float(v) + 1) * 127.5) for v in boards.images[:, 0, 0, 0]]


def test_seeds_are_added_until_m_accepted_and_the_first_m_accepted_are_read(tmp_path):
    synthesis = FakeSynthesis(lambda seed: seed % 3 == 0)  # a third rejected by the screen
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (4, 8), include_flagged=False)
    # seeds 0-3 give 2 accepted (0 and 3 flagged); 8 more at that rate (at least 8) give 8 accepted in all
    assert [r.name for r in runs] == ["synth-0-3", "synth-4-11"]
    assert seeds_read(fewshot.read_pairs(runs, 4, include_flagged=False)) == [1, 2, 4, 5]
    assert seeds_read(fewshot.read_pairs(runs, 8, include_flagged=False)) == [1, 2, 4, 5, 7, 8, 10, 11]
    assert fewshot.read_pairs(runs, 4, include_flagged=False).classes.tolist() == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="holds 8 accepted samples, the curve needs 9"):
        fewshot.read_pairs(runs, 9, include_flagged=False)
    # a rerun resumes the runs it has and adds none; a larger M only adds runs after them
    synthesis.calls.clear()
    again = fewshot.synthesise_pairs(tmp_path, synthesis, (4, 8), include_flagged=False)
    assert again == runs and synthesis.calls == [("synth-0-3", (0, 4)), ("synth-4-11", (4, 12))]
    more = fewshot.synthesise_pairs(tmp_path, synthesis, (4, 8, 12), include_flagged=False)
    assert more[:2] == runs and more[2].name.startswith("synth-12-")
    assert len(fewshot.read_pairs(more, 12, include_flagged=False).images) == 12


def test_with_include_flagged_the_first_m_seeds_are_the_pairs(tmp_path):
    synthesis = FakeSynthesis(lambda seed: seed % 3 == 0)
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (4, 8), include_flagged=True)
    assert [r.name for r in runs] == ["synth-0-3", "synth-4-7"]
    assert seeds_read(fewshot.read_pairs(runs, 8, include_flagged=True)) == list(range(8))


def test_a_run_the_screen_rejected_whole_is_passed_over(tmp_path):
    synthesis = FakeSynthesis(lambda seed: seed < 4)
    runs = fewshot.synthesise_pairs(tmp_path, synthesis, (4,), include_flagged=False)
    assert [r.name for r in runs] == ["synth-0-3", "synth-4-7"]
    assert seeds_read(fewshot.read_pairs(runs, 4, include_flagged=False)) == [4, 5, 6, 7]


def test_a_screen_that_rejects_everything_stops_at_the_seed_budget(tmp_path):
    synthesis = FakeSynthesis(lambda seed: True)
    with pytest.raises(RuntimeError, match="16 seeds gave 0 samples the screen accepted, the curve needs 4"):
        fewshot.synthesise_pairs(tmp_path, synthesis, (4,), include_flagged=False, budget=4)
    assert sum(end - first for _, (first, end) in synthesis.calls) == 16
