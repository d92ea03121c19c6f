"""The class-aware downstream benchmark: a 7-class segmenter (6 defect classes + background) per source,
its per-class metrics on known answers, an end-to-end run on a tiny budget, and the binary benchmark's
numbers unchanged by the code path the two share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_eval_job import real_image_run, run_eval  # noqa: F401  (the fixture, used by name)

from dmgr.data.defects import CLASS_NAMES
from dmgr.eval.downstream import DownstreamSettings, build_sources, model_key, run_benchmark
from dmgr.eval.metrics import nan_mean
from dmgr.eval.real import USER, Boards, defective_boards, heldout_boards
from dmgr.eval.segment import (
    SegmentSettings,
    SegNet,
    class_maps,
    class_scores,
    detection_scores,
    predict_maps,
    train_segmenter,
)
from dmgr.eval.sources import cut_paste, perlin_anomalies
from dmgr.models.classifier import augment

TINY_SEGMENT = SegmentSettings(steps=4, batch_size=4, width=4)
TINY = DownstreamSettings(n=6, real_small=2, seeds=(0, 1), test_defective=6, test_clean=2, image_size=32,
                          window=8, margin=2, segment=TINY_SEGMENT)


def _binary_reference(train, test, settings: SegmentSettings, seed: int) -> dict:
    """The binary benchmark's training and scoring as written before the class-aware task shared its code:
    BCE with pos_weight plus soft Dice on a one-channel U-Net, sigmoid maps."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SegNet(settings.width)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps)
    model.train()
    for _ in range(settings.steps):
        idx = torch.randint(len(train), (settings.batch_size,), generator=g)
        images, masks = augment(g, train.images[idx], train.masks[idx])
        logits, target = model(images), masks.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(settings.pos_weight))
        prob = torch.sigmoid(logits)
        loss = bce + 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        maps = torch.cat([torch.sigmoid(model(chunk)) for chunk in test.images.split(64)])
    return detection_scores(maps, test, settings.threshold)


def test_binary_scores_equal_the_reference_path():
    sources = {"cut-paste": cut_paste(6, 32, 8, 2), "real-small": defective_boards(USER, 2, 32)}
    test = heldout_boards(TINY.test_defective, TINY.test_clean, TINY.image_size)
    results = run_benchmark(sources, TINY, progress=False)
    for name, train in sources.items():
        for run, seed in zip(results["sources"][name]["runs"], TINY.seeds):
            expected = _binary_reference(train, test, TINY_SEGMENT, seed)
            assert {k: v for k, v in run.items() if k not in ("seed", "seconds")} == expected, (name, seed)


def test_binary_cache_keys_are_those_of_the_cached_models():
    """Models cached by earlier versions stay valid: the binary key hashes the settings as they were."""
    train = defective_boards(USER, 2, 32)
    described = {k: v for k, v in asdict(TINY).items() if k != "panel"}  # settings of the cached models
    described["segment"] = {k: v for k, v in described["segment"].items() if k not in ("device", "task")}
    digest = hashlib.sha256(json.dumps([described, 3], sort_keys=True, default=str).encode())
    for tensor in (train.images, train.masks, train.classes):
        digest.update(tensor.contiguous().numpy().tobytes())
    assert model_key(train, TINY, 3) == digest.hexdigest()[:20]


def _onehot(targets: torch.Tensor) -> torch.Tensor:
    return F.one_hot(targets[:, 0], 1 + len(CLASS_NAMES)).permute(0, 3, 1, 2).float()


def test_class_maps_label_each_mask_with_its_board_class():
    boards = heldout_boards(6, 2, 32)
    maps = class_maps(boards)
    assert maps.dtype == torch.long and maps.shape == boards.masks.shape
    for i in range(8):
        expected = boards.classes[i] + 1 if boards.classes[i] >= 0 else 0
        assert set(maps[i][boards.masks[i]].tolist()) <= {int(expected)}
        assert not maps[i][~boards.masks[i]].any()
    assert sorted(set(maps.unique().tolist())) == list(range(7))
    with pytest.raises(ValueError, match="needs a class id"):
        class_maps(perlin_anomalies(2, 32))


def test_class_scores_of_a_perfect_and_a_swapped_prediction():
    test = heldout_boards(12, 2, 32)
    targets = class_maps(test)
    perfect = class_scores(_onehot(targets), test)
    assert perfect["map"] == 1.0 and perfect["mean_iou"] == 1.0 and perfect["background_iou"] == 1.0
    assert set(perfect["ap"].values()) == {1.0} and set(perfect["iou"].values()) == {1.0}
    # missinghole (1) and short (4) swapped: 0 IoU for both, the other classes untouched
    swapped = torch.where(targets == 1, 4, torch.where(targets == 4, 1, targets))
    scores = class_scores(_onehot(swapped), test)
    assert scores["iou"]["missinghole"] == 0.0 and scores["iou"]["short"] == 0.0
    assert all(scores["iou"][c] == 1.0 for c in CLASS_NAMES if c not in ("missinghole", "short"))
    assert scores["ap"]["missinghole"] == pytest.approx(float((targets == 1).float().mean()))
    assert scores["mean_iou"] == pytest.approx(4 / 6)
    assert scores["map"] == pytest.approx(nan_mean(scores["ap"].values()))


@pytest.mark.slow
def test_class_segmenter_learns_classes_told_apart_by_colour():
    g = torch.Generator().manual_seed(0)
    n, size = 48, 32
    classes = torch.arange(n) % 6
    images = torch.rand(n, 3, size, size, generator=g) * 0.2 - 0.6
    masks = torch.zeros(n, 1, size, size, dtype=torch.bool)
    colours = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]).float()
    for i in range(n):
        x, y = torch.randint(2, size - 8, (2,), generator=g).tolist()
        masks[i, 0, y : y + 5, x : x + 5] = True
        images[i, :, y : y + 5, x : x + 5] = colours[classes[i]].view(3, 1, 1) * 0.8
    train, test = Boards(images[:36], masks[:36], classes[:36]), Boards(images[36:], masks[36:], classes[36:])
    settings = SegmentSettings(steps=200, batch_size=8, width=8, lr=1e-2, task="classes")
    model = train_segmenter(train, settings, seed=0)
    probabilities = predict_maps(model, test.images)
    assert probabilities.shape == (12, 7, size, size)
    assert torch.allclose(probabilities.sum(1), torch.ones(12, size, size), atol=1e-5)
    scores = class_scores(probabilities, test)
    assert scores["map"] > 0.8 and scores["mean_iou"] > 0.5, scores


def test_the_classes_task_has_its_own_cache_keys_and_no_perlin_source():
    settings = replace(TINY, segment=replace(TINY_SEGMENT, task="classes"))
    train = defective_boards(USER, 2, 32)
    assert model_key(train, settings, 0) != model_key(train, TINY, 0)
    assert "perlin" in build_sources({}, TINY) and "perlin" not in build_sources({}, settings)


@pytest.mark.slow
def test_class_benchmark_end_to_end(real_image_run, tmp_path):  # noqa: F811
    out = tmp_path / "downstream"
    args = "--n 8 --real-small 2 --seeds 0,1 --steps 4 --batch-size 4 --width 4 --test-defective 12 --test-clean 2"
    command = ["downstream", "--run", f"real={real_image_run}", *args.split(), "--out", str(out)]
    run_eval([*command, "--only", "real-small"])  # the binary report beside it, its models cached apart
    first = run_eval([*command, "--task", "classes", "--jobs", "2"])
    assert "reusing" not in first.stdout
    report = json.loads((out / "downstream-classes.json").read_text())
    sources = report["sources"]
    assert set(sources) == {"dmgr-real/local", "cut-paste", "real-small", "real-small+dmgr-real/local", "real-8"}
    assert report["settings"]["segment"]["task"] == "classes"
    for name, result in sources.items():
        assert [r["seed"] for r in result["runs"]] == [0, 1], name
        for run in result["runs"]:
            assert set(run["ap"]) == set(run["iou"]) == set(CLASS_NAMES)
            assert all(0.0 <= v <= 1.0 for v in [*run["ap"].values(), *run["iou"].values()]), (name, run)
            assert run["map"] == pytest.approx(sum(run["ap"].values()) / 6)
            assert run["mean_iou"] == pytest.approx(sum(run["iou"].values()) / 6)
        for metric in ("map", "mean_iou", "background_iou"):
            values = [r[metric] for r in result["runs"]]
            assert result[metric]["mean"] == pytest.approx(sum(values) / 2)
            assert result[metric]["std"] == pytest.approx(float(torch.tensor(values, dtype=torch.float64).std()))
        assert result["ap"]["short"]["mean"] == pytest.approx(sum(r["ap"]["short"] for r in result["runs"]) / 2)
    text = (out / "downstream-classes.md").read_text()
    assert "| source | pairs | mAP | mean IoU | background IoU |" in text
    assert "| real-small | 2 |" in text and "| source | " + " | ".join(CLASS_NAMES) + " |" in text
    assert Image.open(out / "downstream-classes-map.png").height > 100
    binary = json.loads((out / "downstream.json").read_text())["sources"]
    assert set(binary) == {"real-small"} and "pixel_ap" in binary["real-small"]
    # a rerun reuses the cached class models and reports the same numbers
    again = run_eval([*command, "--task", "classes", "--only", "real-small,dmgr-real/local"])
    assert "reusing 4 of 4 models" in again.stdout
    rerun = json.loads((out / "downstream-classes.json").read_text())["sources"]
    assert rerun["dmgr-real/local"]["runs"] == sources["dmgr-real/local"]["runs"]


def test_the_classes_task_refuses_a_run_whose_classes_are_not_the_test_boards(tmp_path, capsys):
    from dmgr.eval.downstream import _check_classes

    _check_classes(tmp_path, {"class_id": 3, "class_name": "short"})
    with pytest.raises(ValueError, match="class_id 0 is 'scratch'"):
        _check_classes(tmp_path, {"class_id": 0, "class_name": "scratch"})
    with pytest.raises(ValueError, match="defects_per_image=1"):
        _check_classes(tmp_path, {"class_id": 0, "class_name": "missinghole", "defects": [{}, {}]})
