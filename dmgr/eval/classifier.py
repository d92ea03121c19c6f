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

from safetensors.torch import load_file, save_file

from dmgr.data.export import LOCAL_OFFSET
from dmgr.eval.real import PATCH_CLASSES, VALIDATION, defect_patches
from dmgr.models.classifier import PatchClassifier, Patches, accuracy, train_classifier
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
        model = PatchClassifier(len(PATCH_CLASSES))
        model.load_state_dict(load_file(path))
        record = json.loads(path.with_suffix(".json").read_text())
        log.info("classifier %s (held-out accuracy %.3f)", path, record["validation_accuracy"])
        return model.eval(), record
    start = time.perf_counter()
    log.info("training the patch classifier (%d boards per class, %d steps)", settings.per_class, settings.steps)
    train = defect_patches(
        LOCAL_OFFSET, settings.per_class, settings.image_size, settings.window, settings.jitter, settings.seed
    )
    model = train_classifier(train, len(PATCH_CLASSES), steps=settings.steps, batch_size=settings.batch_size,
                             lr=settings.lr, seed=settings.seed, progress=progress)
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
