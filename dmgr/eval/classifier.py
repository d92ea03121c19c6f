"""The evaluation's judge: the defect-patch classifier the sample metrics score with, independent of the quality
screen that selects samples.

It shares neither data nor code with the screen (`dmgr.models.classifier`, trained on the user's patches):
its own architecture (a pre-activation residual network with GroupNorm and GELU, average- and max-pooled),
its own training loop (warm-up and cosine decay, label smoothing, shifts besides the dihedral group), and its
own board stream, JUDGE + i, which no local model, screen, cut-paste source or user board reads. It is checked
on the VALIDATION stream and cached under a name that hashes its settings. Its 7 classes are the six defects and
`clean`; its pooled features are the space of KID and diversity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dmgr.eval.real import JUDGE, PATCH_CLASSES, VALIDATION, defect_patches
from dmgr.models.classifier import Patches
from dmgr.progress import progress_bar
from dmgr.schema import STRICT_SECTION, Count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierSettings:
    __pydantic_config__ = STRICT_SECTION
    image_size: Count(8) = 64
    window: Count(4) = 16
    per_class: Count() = 600  # JUDGE boards; each gives one patch per label
    validation_per_class: Count() = 100
    jitter: Count(0) = 3  # px the window centre moves off the defect centre (DMGR defects are not centred)
    steps: Count() = 1500
    batch_size: Count() = 128
    lr: float = 5e-3
    width: Count(8) = 32
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, cin), nn.GELU(), nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.GroupNorm(8, cout), nn.GELU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        )
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class JudgeNet(nn.Module):
    """Pre-activation residual network: stem, three stages (w, 2w, 4w; stride 1, 2, 2), GroupNorm + GELU,
    average- and max-pooled features (8w), dropout, a linear head."""

    def __init__(self, classes: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.stages = nn.Sequential(_Residual(width, width, 1), _Residual(width, 2 * width, 2),
                                    _Residual(2 * width, 4 * width, 2), nn.GroupNorm(8, 4 * width), nn.GELU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * width, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _jitter(g: torch.Generator, images: torch.Tensor) -> torch.Tensor:
    """Per batch: a dihedral transform and a circular shift of up to 2 px (the judge's own augmentation)."""
    images = torch.rot90(images, int(torch.randint(4, (1,), generator=g)), dims=(2, 3))
    if bool(torch.rand(1, generator=g) < 0.5):
        images = images.transpose(2, 3)
    dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
    return torch.roll(images, (dy, dx), dims=(2, 3))


def train_judge(train: Patches, settings: ClassifierSettings, progress: bool = True) -> JudgeNet:
    """AdamW with a short warm-up and cosine decay, label smoothing 0.1, batches drawn with replacement. Every
    draw (initialisation, dropout, batches) comes from the seed; the global RNG state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        model = JudgeNet(len(PATCH_CLASSES), settings.width)
        g = torch.Generator().manual_seed(settings.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.05)
        warm = max(settings.steps // 20, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min((k + 1) / warm, 0.5 * (1 + math.cos(math.pi * k / settings.steps))))
        model.train()
        for _ in progress_bar(range(settings.steps), desc="judge", disable=not progress, leave=False):
            idx = torch.randint(len(train.labels), (settings.batch_size,), generator=g)
            logits = model(_jitter(g, train.images[idx]))
            loss = nn.functional.cross_entropy(logits, train.labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: JudgeNet, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of (N, 3, w, w) patches in [-1, 1]."""
    model.eval()
    features = torch.cat([model.features(chunk) for chunk in images.split(batch)]) if len(images) else None
    if features is None:
        return torch.zeros(0, len(PATCH_CLASSES)), torch.zeros(0, 8 * model.stem.out_channels)
    return model.head(features), features


def accuracy(model: JudgeNet, patches: Patches) -> float:
    logits, _ = predict(model, patches.images)
    return float((logits.argmax(1) == patches.labels).float().mean())


def training_patches(settings: ClassifierSettings) -> Patches:
    s = settings
    return defect_patches(JUDGE, s.per_class, s.image_size, s.window, s.jitter, s.seed)


def validation_patches(settings: ClassifierSettings) -> Patches:
    return defect_patches(
        VALIDATION, settings.validation_per_class, settings.image_size, settings.window, settings.jitter, 1
    )


def load_or_train(settings: ClassifierSettings, cache_dir: Path, progress: bool = True) -> tuple[JudgeNet, dict]:
    """The judge for `settings` from cache_dir, training (and caching) it on first use; returns it and its
    record (settings, held-out accuracy, training time)."""
    path = Path(cache_dir) / f"judge-{settings.key()}.safetensors"
    if path.exists():
        model = JudgeNet(len(PATCH_CLASSES), settings.width)
        model.load_state_dict(load_file(path))
        record = json.loads(path.with_suffix(".json").read_text())
        log.info("judge %s (held-out accuracy %.3f)", path, record["validation_accuracy"])
        return model.eval(), record
    start = time.perf_counter()
    log.info("training the judge (%d JUDGE boards per class, %d steps)", settings.per_class, settings.steps)
    train = training_patches(settings)
    model = train_judge(train, settings, progress)
    record = {
        "settings": asdict(settings),
        "stream": JUDGE,
        "train_accuracy": accuracy(model, train),
        "validation_accuracy": accuracy(model, validation_patches(settings)),
        "train_seconds": round(time.perf_counter() - start, 1),
        "classes": list(PATCH_CLASSES),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1))  # first: the weights' name says "done"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    log.info("judge trained in %.0f s: train accuracy %.3f, held-out %.3f -> %s", record["train_seconds"],
             record["train_accuracy"], record["validation_accuracy"], path)
    return model, record
