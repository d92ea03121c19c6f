"""The quality screen: scores recorded, weak samples regenerated deterministically, max attempts, flag / skip,
the manifest's reject rates, and a screen that rejects nothing changing nothing but the json (its screen record
and the run identity, which holds the screen's settings).

The job tests use the tiny random models and a screen classifier trained 3 steps on tiny random patches: the
fidelity scores are meaningless there, so the class check is switched off (min_fidelity=0,
min_class_margin=null) and the rejections are driven by the seam score, a deterministic function of the pixels;
the classifier is tested on its own below.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from synth_support import (
    assert_same_sample,
    grey_difference,
    manifest,
    pixels_close,
    raw_members,
    read_samples,
    run_synth,
)
from test_synth_backgrounds import IMAGES, write_boards
from test_synth_config import spec_of

from dmgr import CONF_DIR
from dmgr.synth.backgrounds import scan_backgrounds
from dmgr.synth.config import ConfigError
from dmgr.synth.engine import load_engine, make_attempts, make_settings
from dmgr.synth.plan import plan_sample
from dmgr.synth.record import attempt_sample, screen_metrics
from dmgr.synth.screen import (
    attempt_rank,
    changed_outside,
    failed_checks,
    fidelity_threshold,
    mask_outside,
    screen_summary,
    seam_z,
)

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

CLASSES = ("missinghole", "mousebite", "opencircuit", "short", "spur", "spuriouscopper")


def write_data_root(root: Path, per_class: int = 4) -> Path:
    """local/<class>/ patches of noise with masks whose areas run from 0 to the whole 16 x 16 window."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        folder = root / "local" / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
            mask = np.zeros((16, 16), np.uint8)
            mask[: 16 * i // (per_class - 1)] = 255  # areas 0, 80, 160, 256 for per_class=4
            Image.fromarray(mask).save(folder / f"{i:03d}.mask.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("screen")
    return {"boards": write_boards(base / "boards", 5), "data": write_data_root(base / "data"),
            "cache": base / "cache", "base": base}


CLASS_CHECK_OFF = ("screen.min_fidelity=0", "screen.min_class_margin=null")


def job(setup, out: Path, *more: str, screen: bool = True) -> list[str]:
    args = [*IMAGES, f"dataset.images={setup['boards']}", "seeds=0-3", "samples_per_shard=2", "batch_size=2",
            "extras.input=true", f"out_dir={out}"]
    if screen:
        args += ["screen.enabled=true", f"screen.data_root={setup['data']}", f"screen.cache_dir={setup['cache']}",
                 "screen.classifier_steps=3", "screen.area_quantile=0", *CLASS_CHECK_OFF,
                 "screen.max_seam=1000000.0"]
    return [*args, *more]


@pytest.fixture(scope="module")
def plain(setup):
    out = setup["base"] / "plain"
    run_synth(job(setup, out, screen=False))
    return out


@pytest.fixture(scope="module")
def open_screen(setup):
    """Every threshold open: each seed's first attempt is accepted and scored."""
    out = setup["base"] / "open"
    run_synth(job(setup, out, "screen.max_attempts=1"))
    return out


def screen_records(out: Path) -> dict[int, dict]:
    return {int(k): s["json"]["screen"] for k, s in read_samples(out).items()}


@pytest.fixture(scope="module")
def cut(open_screen) -> float:
    """A seam threshold that rejects the first attempt of the two seeds with the highest seam scores."""
    seams = sorted(g["scores"]["seam"] for g in screen_records(open_screen).values())
    assert len(set(seams)) == 4
    return (seams[1] + seams[2]) / 2


LAST = ("screen.on_exhausted=flag",)  # a seed that spends its attempts writes its last one


@pytest.fixture(scope="module")
def regenerated(setup, cut):
    out = setup["base"] / "regen"
    run_synth(job(setup, out, f"screen.max_seam={cut}", "screen.max_attempts=3", *LAST))
    return out


def test_an_open_gate_changes_nothing_but_the_json_gate_record(plain, open_screen):
    before, after = raw_members(plain), raw_members(open_screen)
    assert sorted(before) == sorted(after)
    for name, data in before.items():
        if not name.endswith(".json"):
            assert after[name] == data, name
            continue
        meta = json.loads(after[name])
        screen, old = meta.pop("screen"), json.loads(data)
        assert meta.pop("run_identity") != old.pop("run_identity")  # the screen's settings join the identity
        assert meta == old
        assert screen["accepted"] and screen["attempt"] == 0 and screen["rejected"] == [] and screen["reasons"] == []
        scores = screen["scores"]
        assert scores["changed_outside"] == 0 and scores["mask_outside"] == 0
        assert scores["mask_area"] == [d["mask_area"] for d in meta["defects"]]
        assert all(0 <= p <= 1 for p in scores["fidelity"]) and isinstance(scores["seam"], float)
    g = manifest(open_screen)["metrics"]["screen"]
    assert g["images_generated"] == 4 and g["accepted"] == 4 and g["reject_rate"] == 0
    assert g["generated_per_accepted"] == 1.0 and g["skipped_seeds"] == []


def test_rejected_seeds_are_regenerated_from_the_next_attempt(setup, open_screen, regenerated, cut):
    first, final = screen_records(open_screen), screen_records(regenerated)
    rejected_first = {s for s, g in first.items() if g["scores"]["seam"] > cut}
    assert len(rejected_first) == 2
    for seed, g in final.items():
        if seed not in rejected_first:
            assert g == first[seed]  # accepted at once: the very sample of the open screen
            continue
        history = g["rejected"]
        assert history[0] == {"attempt": 0, "reasons": ["seam"], "scores": first[seed]["scores"]}
        assert [h["attempt"] for h in history] == list(range(len(history))) and g["attempt"] == len(history)
        assert g["attempt"] <= 2, "screen.max_attempts=3 spent"
        if g["accepted"]:
            assert g["scores"]["seam"] <= cut and "flagged" not in g
        else:
            assert g["attempt"] == 2 and g["flagged"] and g["reasons"] == ["seam"]
    # each written sample is its seed's plan at the recorded attempt (a new placement: same background and
    # class, new window; the derived noise seed) made alone, up to rounding: it was made beside the other
    # rejected seed, and kernels round per batch composition
    spec = spec_of(job(setup, setup["base"] / "unused", f"screen.max_seam={cut}", "screen.max_attempts=3", *LAST))
    engine = load_engine(spec, torch.device("cpu"))
    samples = read_samples(regenerated)
    for seed in rejected_first:
        plan = plan_sample(seed, spec.dataset, spec.backgrounds, final[seed]["attempt"])
        first_plan = plan_sample(seed, spec.dataset, spec.backgrounds)
        assert (plan.background, plan.class_id) == (first_plan.background, first_plan.class_id)
        assert plan.window != first_plan.window
        alone = attempt_sample(spec, engine.digests, make_attempts(engine, make_settings(spec), [plan])[0])
        written = samples[f"{seed:08d}"]
        assert alone["json"]["attempt"] == final[seed]["attempt"] == written["json"]["attempt"]
        assert written["json"]["retries"] == [{"attempt": a, "reason": "screen"} for a in range(plan.attempt)]
        assert_same_sample(alone, written, ignore=("screen", "retries"))
        for attempt in {plan.attempt - 1, plan.attempt + 1}:  # the neighbouring streams are far outside it
            again = make_attempts(engine, make_settings(spec), [replace(plan, attempt=attempt)])[0]
            other = Image.fromarray(again.image)
            assert not pixels_close(other, written["png"]), (attempt, grey_difference(other, written["png"]))


def test_a_seed_that_spends_its_attempts_writes_its_best_ranked_attempt(setup):
    """screen.on_exhausted=best (the default) against flag, with every attempt rejected (a seam threshold below
    any seam): both make the same attempts; best writes, flagged, the attempt that attempt_rank puts first
    (the earliest on a tie) and lists the others as rejected; flag writes the last."""
    every = ("screen.max_seam=-1000000.0", "screen.max_attempts=3")
    run_synth(job(setup, setup["base"] / "best", *every))
    run_synth(job(setup, setup["base"] / "last", *every, *LAST))
    best, last = read_samples(setup["base"] / "best"), read_samples(setup["base"] / "last")
    assert sorted(best) == sorted(last)
    for key in best:
        b, f = best[key]["json"]["screen"], last[key]["json"]["screen"]
        assert b["flagged"] and f["flagged"] and not b["accepted"] and b["attempts"] == f["attempts"] == 3
        assert f["attempt"] == 2
        made = {h["attempt"]: h for h in f["rejected"]} | {2: {"reasons": f["reasons"], "scores": f["scores"]}}
        rank = {a: attempt_rank(h["scores"], h["reasons"]) for a, h in made.items()}
        assert b["attempt"] == min(made, key=lambda a: (rank[a], a))
        assert (b["scores"], b["reasons"]) == (made[b["attempt"]]["scores"], made[b["attempt"]]["reasons"])
        assert [h["attempt"] for h in b["rejected"]] == [a for a in range(3) if a != b["attempt"]]
        assert best[key]["json"].get("attempt", 0) == b["attempt"]  # the plan's attempt (absent for 0)
        if b["attempt"] == 2:
            assert_same_sample(best[key], last[key], ignore=("screen",))
        else:
            assert not pixels_close(best[key]["png"], last[key]["png"])
    assert {s["json"]["screen"]["attempt"] for s in best.values()} != {2}, "every seed's best was its last"
    g = manifest(setup["base"] / "best")["metrics"]["screen"]
    assert g["images_generated"] == 12 and g["flagged"] == 4 and g["rejected"] == 12 and g["accepted"] == 0


def test_manifest_reports_reject_rates_from_the_records(regenerated):
    final = screen_records(regenerated)
    g = manifest(regenerated)["metrics"]["screen"]
    rejected = sum(len(r["rejected"]) + (not r["accepted"]) for r in final.values())
    generated = sum(r["attempts"] for r in final.values())
    assert all(r["attempts"] == r["attempt"] + 1 for r in final.values())
    assert g["images_generated"] == generated == g["attempts_scored"]
    assert g["rejected"] == rejected and g["reject_rate"] == round(rejected / generated, 4)
    assert g["reject_rate_by_reason"]["seam"] == g["reject_rate"] and g["reject_rate_by_reason"]["fidelity"] == 0
    assert g["accepted"] + g["flagged"] == 4 and g["skipped"] == 0
    assert sum(c["attempts"] for c in g["by_class"].values()) == generated
    assert sum(c["rejected"] for c in g["by_class"].values()) == rejected


def test_regeneration_is_bit_identical_across_workers(setup, regenerated, cut):
    out = setup["base"] / "regen-w2"
    run_synth(job(setup, out, f"screen.max_seam={cut}", "screen.max_attempts=3", *LAST), nproc=2)
    assert raw_members(out) == raw_members(regenerated)


SEAM_ROUNDING = 0.01  # a grey level in a few border pixels moves the seam z-score by ~1e-3


def attempts_seen(screen: dict) -> list[tuple[float, list[str]]]:
    """(seam score, reasons) of every attempt of one seed, the written one last."""
    return [(h["scores"]["seam"], h["reasons"]) for h in screen["rejected"]] + [(screen["scores"]["seam"],
                                                                               screen["reasons"])]


def test_regeneration_decisions_do_not_depend_on_the_batch_size(setup, regenerated, cut):
    """Shards are bit-identical for equal batch sizes only; across batch sizes a sample moves within rounding
    (pixels by a grey level, the seam score by far less than SEAM_ROUNDING), so each attempt's verdict is the
    same unless its seam score lies within that rounding of the threshold, and the written samples agree."""
    out = setup["base"] / "regen-b1"
    run_synth(job(setup, out, f"screen.max_seam={cut}", "screen.max_attempts=3", *LAST, "batch_size=1"))
    a, b = read_samples(regenerated), read_samples(out)
    assert sorted(a) == sorted(b)
    for key in a:
        ga, gb = a[key]["json"]["screen"], b[key]["json"]["screen"]
        for (seam_a, reasons_a), (seam_b, reasons_b) in zip(attempts_seen(ga), attempts_seen(gb)):
            assert abs(seam_a - seam_b) <= SEAM_ROUNDING, (key, seam_a, seam_b)
            if abs(seam_a - cut) <= SEAM_ROUNDING:  # a verdict at the threshold may go either way
                break
            assert reasons_a == reasons_b, key
        else:
            assert (ga["attempt"], ga["accepted"]) == (gb["attempt"], gb["accepted"])
            assert_same_sample(a[key], b[key], ignore=("screen",))
        x0, y0, x1, y1 = a[key]["json"]["window_box"]
        outside = np.ones((64, 64), dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert (np.asarray(a[key]["png"])[outside] == np.asarray(b[key]["png"])[outside]).all()


def test_skipped_seeds_are_left_out_listed_and_verified_on_resume(setup, open_screen, cut):
    out = setup["base"] / "skip"
    args = job(setup, out, f"screen.max_seam={cut}", "screen.max_attempts=1", "screen.on_exhausted=skip")
    run_synth(args)
    first = screen_records(open_screen)
    skipped = sorted(s for s, g in first.items() if g["scores"]["seam"] > cut)
    kept = read_samples(out)
    assert sorted(int(k) for k in kept) == sorted(set(first) - set(skipped))
    m = manifest(out)
    assert m["metrics"]["screen"]["skipped_seeds"] == skipped and m["metrics"]["screen"]["skipped"] == 2
    assert m["num_samples"] == 2 and sum(s["samples"] for s in m["shards"]) == 2
    before = raw_members(out)
    shutil.rmtree(out / "logs")
    run_synth(args)
    log = (out / "logs" / "worker-000.log").read_text()
    assert "2 shards complete and verified, 0 made" in log
    assert raw_members(out) == before and manifest(out)["shards"] == m["shards"]


# -- the scores, plain functions ---------------------------------------------------------------------------


def test_scores_of_known_pixels():
    rng = np.random.default_rng(1)
    given = rng.integers(100, 110, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[10:14, 10:14] = True
    image = given.copy()
    image[mask] = 255  # a flat bright square: a hard edge
    assert changed_outside(image, given, mask) == 0
    leaked = image.copy()
    leaked[0, 0] = 0
    assert changed_outside(leaked, given, mask) == 1
    assert mask_outside(mask, [[8, 8, 24, 24]]) == 0 and mask_outside(mask, [[12, 8, 28, 24]]) == 8
    assert seam_z(image, given, mask) > 10
    soft = given.copy()
    soft[mask] = given[mask] + 1
    assert seam_z(soft, given, mask) < 1
    assert seam_z(given, given, np.zeros_like(mask)) == 0.0
    thresholds = {"min_fidelity": 0.5, "max_mask_outside": 0, "max_changed_outside": 0, "max_seam": 4.0}
    good = {"fidelity": [0.9], "mask_area": [16], "mask_outside": 0, "changed_outside": 0, "seam": 1.0}
    assert failed_checks(good, [(5, 20)], thresholds) == []
    bad = {"fidelity": [0.9, 0.1], "mask_area": [16, 30], "mask_outside": 3, "changed_outside": 1, "seam": 9.0}
    assert failed_checks(bad, [(5, 20), (5, 20)], thresholds) == ["fidelity", "area", "mask_outside",
                                                              "changed_outside", "seam"]


def test_gate_counts_add_up_to_rates():
    def meta(cls, accepted, history, **flags):
        reasons = [] if accepted else ["fidelity"]
        return {"defects": [{"class_name": cls}],
                "screen": {"accepted": accepted, "attempt": len(history), "attempts": len(history) + 1,
                           "reasons": reasons,
                           "rejected": [{"attempt": i, "reasons": r} for i, r in enumerate(history)], **flags}}

    total: dict = {}
    for m in (meta("spur", True, []), meta("spur", True, [["seam", "area"]]),
              meta("short", False, [["fidelity"], ["fidelity"]], skipped=True)):
        for k, v in screen_metrics(m).items():
            total[k] = total.get(k, 0) + v
    s = screen_summary(total, [7])
    assert s["images_generated"] == 6 and s["accepted"] == 2 and s["rejected"] == 4 and s["skipped"] == 1
    assert s["reject_rate"] == round(4 / 6, 4) and s["generated_per_accepted"] == 3.0
    assert s["reject_rate_by_reason"] == {"fidelity": 0.5, "area": round(1 / 6, 4), "mask_outside": 0.0,
                                          "changed_outside": 0.0, "seam": round(1 / 6, 4)}
    assert s["by_class"] == {"short": {"attempts": 3, "rejected": 3, "reject_rate": 1.0},
                             "spur": {"attempts": 3, "rejected": 1, "reject_rate": round(1 / 3, 4)}}
    assert s["skipped_seeds"] == [7]


def test_each_attempt_draws_different_noise():
    from dmgr.sampler import make_generators
    from dmgr.synth.plan import SamplePlan

    for seed in (0, 5, 2**33 + 7):
        draws = [torch.randn(8, generator=make_generators([SamplePlan(seed, (), attempt=a).noise_seed])[0])
                 for a in range(4)]
        assert SamplePlan(seed, ()).noise_seed == seed  # attempt 0 is the seed itself, as before the screen
        assert len({tuple(d.tolist()) for d in draws}) == 4, seed


# -- configuration and the classifier ---------------------------------------------------------------------


def test_gate_settings_are_checked_in_one_line(setup, tmp_path):
    images = ["dataset.source=images", f"dataset.images={setup['boards']}", f"out_dir={tmp_path / 'r'}"]
    on = ["screen.enabled=true", f"screen.data_root={setup['data']}"]
    cases = [
        (["screen.enabled=true", "dataset.source=generate"], "screen.enabled=True: the quality screen needs"),
        ([*images, *on, "screen.on_exhausted=drop"], "screen.on_exhausted='drop': allowed: best, flag, skip"),
        ([*images, *on, "screen.min_fidelity=2"], "screen.min_fidelity=2: a number in [0, 1]"),
        ([*images, *on, "screen.fidelity_quantile=1.5"], "screen.fidelity_quantile=1.5: a number in [0, 1], or null"),
        ([*images, *on, "screen.min_class_margin=2"], "screen.min_class_margin=2: a number in [-1, 1], or null"),
        ([*images, "screen.enabled=true", f"screen.data_root={tmp_path}"], "screen.data_root="),
        ([*images, "+screen.threshold=1"], "screen.threshold=1: unknown setting"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            spec_of(overrides)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_identity_ignores_a_disabled_gate_and_holds_an_enabled_one(setup, tmp_path):
    images = ["dataset.source=images", f"dataset.images={setup['boards']}", f"out_dir={tmp_path / 'r'}"]
    off = [*images, "screen.enabled=false"]
    today = spec_of(off).identity
    assert spec_of([*off, "screen.max_seam=-3", "screen.on_exhausted=skip", "screen.data_root=nowhere"]).identity \
        == today
    on = [*images, "screen.enabled=true", f"screen.data_root={setup['data']}"]
    screened = spec_of(on).identity
    assert screened != today and spec_of([*on, "screen.max_seam=2.5"]).identity != screened
    fixed = spec_of([*on, "screen.fidelity_quantile=null"])
    assert fixed.identity != screened and "fidelity_quantile" not in fixed.identity_inputs["screen"]
    unranked = spec_of([*on, "screen.min_class_margin=null"])
    assert unranked.identity != screened and "min_class_margin" not in unranked.identity_inputs["screen"]
    assert spec_of([*on, "screen.min_class_margin=0.2"]).identity != screened
    assert spec_of([*on, f"screen.cache_dir={tmp_path}"]).identity == screened  # where it is cached is no matter


def test_classifier_is_trained_cached_and_keyed_by_its_inputs(setup, tmp_path):
    from dmgr.synth.screen_classifier import ScreenClassifierSettings, load_screen_classifier

    backgrounds = scan_backgrounds(setup["boards"], 64, 16, 5)
    settings = ScreenClassifierSettings(steps=3, area_quantile=0)
    first = load_screen_classifier(setup["data"], CLASSES, backgrounds, settings, tmp_path, progress=False)
    assert first.record["classes"] == [*CLASSES, "clean"]
    assert first.record["patches"] == {"train": 18 + 18, "held_out": 6 + 2}  # 24 class + 20 clean patches
    assert first.area_ranges == {c: (0.0, 256.0) for c in CLASSES}
    again = load_screen_classifier(setup["data"], CLASSES, backgrounds, settings, tmp_path, progress=False)
    assert all((a == b).all() for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    # its probability of the right class on each of the 6 held-out defects (one per class), as the model reads them
    held = [p for p, label in zip(*_held_out_reading(first, setup["data"], backgrounds, settings)[:2]) if label < 6]
    assert len(first.held_out_fidelity) == 6 and np.allclose(first.held_out_fidelity, held, atol=1e-5)
    # an entry written without it gains it on load, once, with the same values
    path = tmp_path / f"screen-classifier-{first.record['key']}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "held_out_fidelity"}))
    older = load_screen_classifier(setup["data"], CLASSES, backgrounds, settings, tmp_path, progress=False)
    assert older.held_out_fidelity == first.held_out_fidelity
    assert json.loads(path.read_text())["held_out_fidelity"] == list(first.held_out_fidelity)
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    Image.new("L", (16, 16), 255).save(data / "local" / "spur" / "000.mask.png")
    changed = load_screen_classifier(data, CLASSES, backgrounds, settings, tmp_path / "c", progress=False)
    assert changed.record["key"] != first.record["key"]
    assert changed.area_ranges["spur"] == (80.0, 256.0)


def _held_out_reading(screen, data, backgrounds, settings) -> tuple[list[float], list[int], list[float]]:
    """The screen model's probability of each held-out patch's label, one patch at a time, the labels, and each
    defect patch's margin: its label's probability less the highest other defect class's (nan for clean)."""
    from dmgr.synth.screen_classifier import user_patches

    _, held = user_patches(data, CLASSES, backgrounds, settings)
    with torch.no_grad():
        every = [torch.softmax(screen.model(x[None]), 1)[0].numpy() for x in held.images]
    labels = held.labels.tolist()
    margins = [q[y] - np.delete(q[:len(CLASSES)], y).max() if y < len(CLASSES) else np.nan
               for q, y in zip(every, labels)]
    return [float(q[y]) for q, y in zip(every, labels)], labels, margins


def test_the_class_margin_rejects_a_window_read_as_another_defect_class():
    from dmgr.synth.screen import class_margin

    probs = torch.tensor([0.10, 0.30, 0.05, 0.05, 0.05, 0.05, 0.40])  # 6 classes + clean: class 0 beaten by 1
    assert class_margin(probs, 0, 6) == pytest.approx(-0.2) and class_margin(probs, 1, 6) == pytest.approx(0.2)
    thresholds = {"min_fidelity": 0.05, "min_class_margin": 0.0, "max_mask_outside": 0, "max_changed_outside": 0,
                  "max_seam": 4.0}
    scores = {"fidelity": [0.10], "class_margin": [-0.2], "mask_area": [16], "mask_outside": 0,
              "changed_outside": 0, "seam": 1.0}
    assert failed_checks(scores, [(5, 20)], thresholds) == ["fidelity"]
    assert failed_checks({**scores, "class_margin": [0.0]}, [(5, 20)], thresholds) == []  # clean reads higher
    assert failed_checks(scores, [(5, 20)], {**thresholds, "min_class_margin": None}) == []
    assert failed_checks(scores, [(5, 20)], {**thresholds, "min_class_margin": -0.3}) == []
    # at a threshold of 0.5 or more the margin (at 0) rejects nothing the threshold passes: no other label can
    # read higher than a probability of at least a half
    g, confident = torch.Generator().manual_seed(0), 0
    for _ in range(2000):
        q = torch.softmax(torch.randn(7, generator=g) * 4, 0)
        k = int(torch.randint(6, (1,), generator=g))
        if q[k] >= 0.5:
            confident += 1
            assert round(class_margin(q, k, 6), 6) >= 0
    assert confident > 100


def test_the_class_check_is_lowered_to_what_the_classifier_reads_of_unseen_user_defects():
    # a classifier that reads the user's held-out defects well keeps min_fidelity
    assert fidelity_threshold(0.5, 0.1, (0.9, 0.97, 0.99, 1.0)) == 0.5
    # one that misreads them (few defects per class) rejects only samples it reads worse than most of them
    held = (0.001, 0.002, 0.004, 0.3, 0.6, 0.9)
    assert fidelity_threshold(0.5, 0.1, held) == pytest.approx(0.0015) and fidelity_threshold(0.5, 0.5, held) < 0.5
    # null, or no held-out defect to read: min_fidelity as given
    assert fidelity_threshold(0.5, None, held) == 0.5 and fidelity_threshold(0.5, 0.1, ()) == 0.5


def test_the_screen_check_reads_unseen_defects_as_the_job_does(setup, tmp_path):
    """`python -m dmgr.synth.screen_check`: per class, the share of real defects the fixed class check, the class
    margin and the job's calibrated class check (threshold and margin) pass, from the classifier's own
    probabilities; without the margin (null); on the benchmark's TEST-stream defects too."""
    import subprocess
    import sys

    from dmgr.synth.screen_classifier import ScreenClassifierSettings, load_screen_classifier

    backgrounds = scan_backgrounds(setup["boards"], 64, 16, 5)
    settings = ScreenClassifierSettings(steps=3, area_quantile=0)
    screen = load_screen_classifier(setup["data"], CLASSES, backgrounds, settings, tmp_path, progress=False)
    weights = tmp_path / f"screen-classifier-{screen.record['key']}.safetensors"
    done = subprocess.run([sys.executable, "-m", "dmgr.synth.screen_check", "--classifier", str(weights),
                           "--data-root", str(setup["data"]), "--out", str(tmp_path / "check")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "check" / "screen-check.json").read_text())
    probs, labels, margins = _held_out_reading(screen, setup["data"], backgrounds,
                                               replace(settings, validation_every=1))
    threshold = fidelity_threshold(0.5, 0.1, screen.held_out_fidelity)
    assert report["held_out_defects"] == 6 and report["calibrated_threshold"] == pytest.approx(threshold)
    for k, name in enumerate(CLASSES):
        mine = np.array([p for p, label in zip(probs, labels) if label == k])
        margin = np.array([m for m, label in zip(margins, labels) if label == k])
        row = report["classes"][name]
        assert row["defects"] == len(mine) == 4
        assert row["pass_fixed"] == pytest.approx(np.mean(mine >= 0.5), abs=1e-4)
        assert row["pass_margin"] == pytest.approx(np.mean(margin >= 0), abs=1e-4)
        assert row["pass_calibrated"] == pytest.approx(np.mean((mine >= threshold) & (margin >= 0)), abs=1e-4)
    assert report["all"]["defects"] == 24
    done = subprocess.run([sys.executable, "-m", "dmgr.synth.screen_check", "--classifier", str(weights),
                           "--data-root", str(setup["data"]), "--min-class-margin", "null",
                           "--out", str(tmp_path / "no-margin")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "no-margin" / "screen-check.json").read_text())
    assert report["all"]["pass_margin"] == 1 and report["all"]["pass_calibrated"] == pytest.approx(
        np.mean(np.array(probs)[np.array(labels) < len(CLASSES)] >= threshold), abs=1e-4)
    done = subprocess.run([sys.executable, "-m", "dmgr.synth.screen_check", "--classifier", str(weights),
                           "--test-defects", "12", "--out", str(tmp_path / "test")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "test" / "screen-check.json").read_text())
    assert report["all"]["defects"] == 12 and all(row["defects"] == 2 for row in report["classes"].values())


def test_classifier_command_trains_the_model_the_job_loads(setup, tmp_path):
    from dmgr.synth.engine import load_screen
    from dmgr.synth.screen_ahead import main

    main(["--data-root", str(setup["data"]), "--images", str(setup["boards"]), "--classes", ",".join(CLASSES),
          "--steps", "3", "--area-quantile", "0", "--cache-dir", str(tmp_path), "--quiet"])
    trained = list(tmp_path.glob("screen-classifier-*.safetensors"))
    assert len(trained) == 1
    spec = spec_of(["dataset.source=images", f"dataset.images={setup['boards']}", f"out_dir={tmp_path / 'r'}",
                    "screen.enabled=true", f"screen.data_root={setup['data']}", f"screen.cache_dir={tmp_path}",
                    "screen.classifier_steps=3", "screen.area_quantile=0"])
    screen = load_screen(spec)
    assert trained[0].name == f"screen-classifier-{screen.record['key']}.safetensors"
    assert list(tmp_path.glob("screen-classifier-*.safetensors")) == trained  # loaded, not trained again


def test_the_default_screens_every_seed_with_four_attempts_on_the_20_step_walk(setup, tmp_path):
    """The default job: the screen on with its class check (min_fidelity 0.5, calibrated; class margin 0), 4
    attempts in all (an empty mask 6), the inpaint walk at 20 steps; every seed is written, accepted or flagged
    after its attempts."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="synth")
    spec = spec_of(["dataset.source=images", f"dataset.images={setup['boards']}", f"out_dir={tmp_path / 'r'}",
                    f"screen.data_root={setup['data']}"])
    assert spec.screen.enabled and spec.screen.max_attempts == 4 and spec.screen.min_fidelity == 0.5
    assert spec.dataset.placement.max_attempts == 6
    assert cfg.schedule.name == "inpaint20" and cfg.schedule.respacing == "20"
    assert (cfg.schedule.T_s, cfg.schedule.T_e, cfg.schedule.lr_xt) == (12, 3, 0.5)
    assert not cfg.schedule.reanchor and not cfg.schedule.time_travel
    defaults = [o for o in job(setup, tmp_path / "faithful") if o not in CLASS_CHECK_OFF]  # the tiny models
    run_synth(defaults)
    samples = read_samples(tmp_path / "faithful")
    assert len(samples) == 4
    # the class check's threshold: 0.5, or lower where the classifier reads the user's held-out defects worse
    run = manifest(tmp_path / "faithful")
    record = json.loads((setup["cache"] / f"screen-classifier-{run['screen']['classifier']}.json").read_text())
    held = record["held_out_fidelity"]
    threshold = min(0.5, float(np.quantile(held, 0.1)))
    assert len(held) == run["screen"]["held_out_defects"] > 0 and run["screen"]["min_fidelity"] == threshold
    assert run["screen"]["min_class_margin"] == 0.0
    for sample in samples.values():
        screen = sample["json"]["screen"]
        assert screen["attempt"] < screen["attempts"] <= 6 and len(screen["rejected"]) < screen["attempts"]
        empty = sample["json"].get("empty_mask", {})
        assert screen["accepted"] or (screen.get("flagged") and screen["attempts"] >= 4) or empty.get("flagged")
        assert sample["json"]["mask_area"] > 0 or empty.get("flagged")
        scores = screen["scores"]
        assert len(scores["class_margin"]) == len(scores["fidelity"]) and -1 <= min(scores["class_margin"]) <= 1
        assert screen["accepted"] == (min(scores["fidelity"]) >= threshold and min(scores["class_margin"]) >= 0)
    summary = manifest(tmp_path / "faithful")["metrics"]["screen"]
    assert summary["seeds"] == 4 and summary["images_generated"] <= 24
