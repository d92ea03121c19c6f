"""The class-aware downstream benchmark: a 7-class segmenter (6 defect classes + background) per source,
its per-class metrics on known answers, an end-to-end run on a tiny budget, and the binary benchmark's
numbers unchanged by the code path the two share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch
import torch.nn.functional as F

from dmgr.eval.classifier import augment
from dmgr.eval.downstream import DownstreamSettings, model_key, run_benchmark
from dmgr.eval.real import USER, defective_boards, heldout_boards
from dmgr.eval.segment import SegmentSettings, SegNet, detection_scores
from dmgr.eval.sources import cut_paste

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
    described = asdict(TINY)
    described["segment"] = {k: v for k, v in described["segment"].items() if k not in ("device", "task")}
    digest = hashlib.sha256(json.dumps([described, 3], sort_keys=True, default=str).encode())
    for tensor in (train.images, train.masks, train.classes):
        digest.update(tensor.contiguous().numpy().tobytes())
    assert model_key(train, TINY, 3) == digest.hexdigest()[:20]
