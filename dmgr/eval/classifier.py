"""The defect-patch classifier the sample metrics score with: 7 classes (six defects + clean), and its
penultimate layer as the feature space for KID and diversity.

Trained on real procedural patches (the local model's training boards), checked on held-out ones, and
cached under a name that hashes its settings, so every evaluation with the same settings uses the same
network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dmgr.data.export import LOCAL_OFFSET
from dmgr.eval.real import PATCH_CLASSES, VALIDATION, Patches, defect_patches
from dmgr.progress import progress_bar
from dmgr.schema import STRICT_SECTION, Count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierSettings:
    __pydantic_config__ = STRICT_SECTION
    image_size: Count(8) = 64
    window: Count(4) = 16
    per_class: Count() = 600  # training boards; each gives one patch per label
    validation_per_class: Count() = 100
    jitter: Count(0) = 3  # px the window centre moves off the defect centre (DMGR defects are not centred)
    steps: Count() = 1500
    batch_size: Count() = 128
    lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class PatchClassifier(nn.Module):
    def __init__(self, classes: int = len(PATCH_CLASSES), width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(3, width, 1),
            *block(width, width, 1),
            *block(width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
            *block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def augment(g: torch.Generator, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One random rotation by a multiple of 90 degrees and one random flip, the same for every
    (B, C, H, W) batch given (images and their masks move together)."""
    k = int(torch.randint(4, (1,), generator=g))
    flip = bool(torch.rand(1, generator=g) < 0.5)
    rotated = [torch.rot90(x, k, dims=(2, 3)) for x in batches]
    return tuple(x.flip(3) if flip else x for x in rotated)


@torch.no_grad()
def predict(model: PatchClassifier, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of (N, 3, w, w) patches in [-1, 1]."""
    model.eval()
    logits, features = [], []
    for chunk in images.split(batch):
        f = model.features(chunk)
        features.append(f)
        logits.append(model.head(f))
    return torch.cat(logits), torch.cat(features)


def train_classifier(
    train: Patches, settings: ClassifierSettings, progress: bool = True, classes: int = len(PATCH_CLASSES)
) -> PatchClassifier:
    with torch.random.fork_rng():  # parameter initialisation from the seed, global RNG state untouched
        torch.manual_seed(settings.seed)
        model = PatchClassifier(classes)
    g = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps)
    model.train()
    for _ in progress_bar(range(settings.steps), desc="classifier", disable=not progress, leave=False):
        idx = torch.randint(len(train.labels), (settings.batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(*augment(g, train.images[idx])), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def accuracy(model: PatchClassifier, patches: Patches) -> float:
    logits, _ = predict(model, patches.images)
    return float((logits.argmax(1) == patches.labels).float().mean())


def validation_patches(settings: ClassifierSettings) -> Patches:
    return defect_patches(
        VALIDATION, settings.validation_per_class, settings.image_size, settings.window, settings.jitter, 1
    )


def load_or_train(settings: ClassifierSettings, cache_dir: Path, progress: bool = True) -> tuple[PatchClassifier, dict]:
    """The classifier for `settings` from cache_dir, training (and caching) it on first use.

    Returns the model and its record: settings, held-out accuracy, training time.
    """
    path = Path(cache_dir) / f"classifier-{settings.key()}.safetensors"
    if path.exists():
        model = PatchClassifier()
        model.load_state_dict(load_file(path))
        record = json.loads(path.with_suffix(".json").read_text())
        log.info("classifier %s (held-out accuracy %.3f)", path, record["validation_accuracy"])
        return model.eval(), record
    start = time.perf_counter()
    log.info("training the patch classifier (%d boards per class, %d steps)", settings.per_class, settings.steps)
    train = defect_patches(
        LOCAL_OFFSET, settings.per_class, settings.image_size, settings.window, settings.jitter, settings.seed
    )
    model = train_classifier(train, settings, progress)
    record = {
        "settings": asdict(settings),
        "train_accuracy": accuracy(model, train),
        "validation_accuracy": accuracy(model, validation_patches(settings)),
        "train_seconds": round(time.perf_counter() - start, 1),
        "classes": list(PATCH_CLASSES),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(record, indent=1))
    log.info(
        "classifier trained in %.0f s: train accuracy %.3f, held-out %.3f -> %s",
        record["train_seconds"],
        record["train_accuracy"],
        record["validation_accuracy"],
        path,
    )
    return model, record
