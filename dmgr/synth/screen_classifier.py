"""The quality screen's patch classifier, trained on the user's own data: the local model's training patches
(DATA_ROOT/local/<class>/NAME.png, one label per class) plus clean windows cut from the defect-free images
(one more label, `clean`). Its record also holds each class's plausible mask area, from the training masks, and
its probability of the right class on each held-out user defect (`held_out_fidelity`: how well it reads defects it
did not learn from, which calibrates the screen's class check).

Cached under a name that hashes every input of it (the patches' and images' contents, the geometry its clean
windows are cut with, the classes and the training settings), so the synthesis job and
`python -m dmgr.synth.screen_ahead` (train it ahead, once for every worker) share it.

A cache entry that cannot be read (a truncated file, a damaged or missing record) is set aside as
`<name>.damaged` with one warning and trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from safetensors.torch import load_file, save_file

from dmgr.data.dataset import mask_path
from dmgr.images import decode_mask, from_uint8, list_images, load_rgb, resize_center_crop
from dmgr.models.classifier import PatchClassifier, Patches, accuracy, predict, train_classifier
from dmgr.schema import STRICT_SECTION, Count
from dmgr.shards.atomic import write_json_atomic
from dmgr.synth.backgrounds import Backgrounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScreenClassifierSettings:
    __pydantic_config__ = STRICT_SECTION
    window: Count(4) = 16
    steps: Count() = 800
    batch_size: Count() = 128
    lr: float = 2e-3
    clean_per_image: Count() = 4  # clean windows cut from each defect-free image (inside its ROI)
    validation_every: Count(2) = 10  # every 10th patch of each label is held out for the accuracy check
    area_quantile: Annotated[float, Field(ge=0, le=0.5)] = 0.01  # a class's plausible mask area: [q, 1 - q]
    #   quantiles of its training masks
    seed: int = 0


@dataclass
class ScreenClassifier:
    model: PatchClassifier
    classes: tuple[str, ...]  # the defect classes; label len(classes) is clean
    area_ranges: dict[str, tuple[float, float]]  # per class, at the window size
    record: dict
    digest: str = ""  # sha256 of the weights file
    held_out_fidelity: tuple[float, ...] = ()  # its probability of the right class on each held-out user defect


def class_files(data_root: Path, classes: tuple[str, ...]) -> dict[str, list[Path]]:
    """Per class, the training patches under DATA_ROOT/local/<class>/ (each needs its NAME.mask.png)."""
    files = {c: list_images(Path(data_root) / "local" / c, recursive=False) for c in classes}
    for c, paths in files.items():
        if not paths:
            raise FileNotFoundError(f"no training patches under {Path(data_root) / 'local' / c}/")
        missing = [p for p in paths if not mask_path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{mask_path(missing[0])} missing: every training patch needs its mask")
    return files


def data_digest(data_root: Path, classes: tuple[str, ...]) -> str:
    """sha256 over the class names and every training patch's and mask's name and bytes."""
    digest = hashlib.sha256(json.dumps(list(classes)).encode())
    for c, paths in class_files(data_root, classes).items():
        for p in paths:
            for f in (p, mask_path(p)):
                digest.update(f"{c}/{f.name}\0".encode() + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def read_patch(path: Path, window: int, nearest: bool = False) -> np.ndarray:
    """A patch (or, `nearest`, its mask) as (window, window[, 3]) uint8, resized and centre-cropped to the window."""
    img = decode_mask(path.read_bytes()) if nearest else load_rgb(path)
    if img.size != (window, window):
        img = resize_center_crop(img, window, nearest=nearest)
    return np.asarray(img)


def area_ranges(data_root: Path, classes: tuple[str, ...], window: int, q: float) -> dict[str, tuple[float, float]]:
    """Per class, the [q, 1 - q] quantiles of its training masks' areas (pixels at the window size)."""
    ranges = {}
    for c, paths in class_files(data_root, classes).items():
        areas = np.array([(read_patch(mask_path(p), window, nearest=True) > 0).sum() for p in paths], dtype=np.float64)
        ranges[c] = (float(np.quantile(areas, q)), float(np.quantile(areas, 1 - q)))
    return ranges


def clean_windows(backgrounds: Backgrounds, window: int, per_image: int, seed: int) -> np.ndarray:
    """(N, w, w, 3) uint8 windows of the defect-free images, corners drawn uniformly inside each ROI (in image
    pixels, windows of `backgrounds.geometry.window` px resized to `window` when dataset.scale != 1)."""
    rng = np.random.default_rng(seed)
    side = backgrounds.geometry.window
    out = []
    for i in range(len(backgrounds)):
        image, corners = backgrounds.image(i), backgrounds.allowed_corners(i)
        ys, xs = np.nonzero(corners)
        for j in rng.integers(len(xs), size=per_image):
            x, y = int(xs[j]), int(ys[j])
            patch = image[y : y + side, x : x + side]
            if side != window:
                patch = np.asarray(Image.fromarray(patch).resize((window, window), Image.BILINEAR))
            out.append(patch)
    return np.stack(out)


def defect_patches(data_root: Path, classes: tuple[str, ...], window: int) -> Patches:
    """Every training patch of the classes, labels 0..C-1."""
    images, labels = [], []
    for k, paths in enumerate(class_files(data_root, classes).values()):
        images += [read_patch(p, window) for p in paths]
        labels += [k] * len(paths)
    return Patches(from_uint8(np.stack(images)), torch.zeros(0), torch.tensor(labels))


def held_out(labels: torch.Tensor, every: int) -> torch.Tensor:
    """The held-out slice: every `every`-th patch of each label, its first included."""
    rank = torch.zeros(len(labels), dtype=torch.long)
    for k in labels.unique():
        idx = (labels == k).nonzero()[:, 0]
        rank[idx] = torch.arange(len(idx))
    return rank % every == 0


def held_out_defects(data_root: Path, classes: tuple[str, ...], settings: ScreenClassifierSettings) -> Patches:
    """The defect patches the classifier is not trained on (its held-out slice without the clean windows)."""
    defects = defect_patches(data_root, classes, settings.window)
    held = held_out(defects.labels, settings.validation_every)
    return Patches(defects.images[held], defects.masks, defects.labels[held])


def user_patches(
    data_root: Path, classes: tuple[str, ...], backgrounds: Backgrounds, settings: ScreenClassifierSettings
) -> tuple[Patches, Patches]:
    """(train, held-out) patches: labels 0..C-1 the classes, C clean."""
    defects = defect_patches(data_root, classes, settings.window)
    clean = from_uint8(clean_windows(backgrounds, settings.window, settings.clean_per_image, settings.seed))
    x = torch.cat([defects.images, clean])
    y = torch.cat([defects.labels, torch.full((len(clean),), len(classes))])
    held = held_out(y, settings.validation_every)
    empty = torch.zeros(0)
    return Patches(x[~held], empty, y[~held]), Patches(x[held], empty, y[held])


def own_class_probabilities(model: PatchClassifier, patches: Patches, classes: int) -> list[float]:
    """The model's probability of each defect patch's own label (clean patches left out), rounded to 6 places."""
    defects = patches.labels < classes
    logits, _ = predict(model, patches.images[defects])
    chosen = torch.softmax(logits, 1).gather(1, patches.labels[defects][:, None])[:, 0]
    return [round(float(p), 6) for p in chosen]


def classifier_key(data: str, backgrounds: Backgrounds, classes: tuple[str, ...],
                   settings: ScreenClassifierSettings) -> str:
    """A digest of every input of the classifier: its training patches (`data`), the defect-free images and
    the geometry the clean windows are cut with (the backgrounds' digest holds image_size, window_size and
    scale, the geometry adds the margin), the classes, and the training settings."""
    text = json.dumps([data, backgrounds.digest, asdict(backgrounds.geometry), list(classes), asdict(settings)],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _area_ranges(record: dict) -> dict[str, tuple[float, float]]:
    return {c: (float(lo), float(hi)) for c, (lo, hi) in record["area_ranges"].items()}


def _cached(path: Path, classes: tuple[str, ...], key: str) -> tuple[PatchClassifier, dict] | None:
    """(model, record) of the cache entry at `path`, or None when there is none. An entry that cannot be used
    (truncated weights, a damaged or missing record) is set aside as `<name>.damaged` with one warning."""
    if not path.exists():
        return None
    meta = path.with_suffix(".json")
    try:
        record = json.loads(meta.read_text())
        if not isinstance(record, dict) or record.get("key") != key:
            raise ValueError(f"{meta.name} is not this classifier's record")
        _area_ranges(record), float(record["validation_accuracy"])
        model = PatchClassifier(len(classes) + 1)
        model.load_state_dict(load_file(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is retrained, named in one line
        for f in (path, meta):
            try:
                os.replace(f, f.with_name(f"{f.name}.damaged"))
            except OSError:
                pass
        reason = str(exc).splitlines()[0][:120] if str(exc) else ""
        log.warning("screen classifier cache %s is unusable (%s%s): set aside as %s.damaged, training it again",
                    path, type(exc).__name__, f": {reason}" if reason else "", path.name)
        return None
    return model, record


def load_screen_classifier(
    data_root: Path,
    classes: tuple[str, ...],
    backgrounds: Backgrounds,
    settings: ScreenClassifierSettings,
    cache_dir: Path,
    data: str | None = None,
    progress: bool = True,
) -> ScreenClassifier:
    """The screen classifier for these inputs and settings from cache_dir, trained (and cached) on first use.
    `data` is data_digest(data_root, classes) when the caller already has it."""
    data = data or data_digest(data_root, classes)
    key = classifier_key(data, backgrounds, classes, settings)
    path = Path(cache_dir) / f"screen-classifier-{key}.safetensors"
    cached = _cached(path, classes, key)
    if cached is not None:
        model, record = cached
        log.info("screen classifier %s (held-out accuracy %.3f)", path, record["validation_accuracy"])
        if "held_out_fidelity" not in record:  # an entry written without it: computed once and kept
            held = held_out_defects(data_root, classes, settings)
            record = {**record, "held_out_fidelity": own_class_probabilities(model, held, len(classes))}
            write_json_atomic(path.with_suffix(".json"), record)
    else:
        start = time.perf_counter()
        train, held = user_patches(data_root, classes, backgrounds, settings)
        log.info("training the screen classifier on %d patches (%d steps)", len(train.labels), settings.steps)
        model = train_classifier(train, len(classes) + 1, steps=settings.steps, batch_size=settings.batch_size,
                                 lr=settings.lr, seed=settings.seed, progress=progress)
        record = {
            "key": key,
            "settings": asdict(settings),
            "classes": [*classes, "clean"],
            "data_root": str(data_root),
            "data_digest": data,
            "backgrounds_digest": backgrounds.digest,
            "patches": {"train": len(train.labels), "held_out": len(held.labels)},
            "train_accuracy": accuracy(model, train),
            "validation_accuracy": accuracy(model, held),
            "held_out_fidelity": own_class_probabilities(model, held, len(classes)),
            "area_ranges": area_ranges(data_root, classes, settings.window, settings.area_quantile),
            "train_seconds": round(time.perf_counter() - start, 1),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # several workers may train it at once
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        write_json_atomic(path.with_suffix(".json"), record)
        tmp.replace(path)  # the weights last: a present .safetensors always has its record
        log.info("screen classifier trained in %.0f s: held-out accuracy %.3f -> %s",
                 record["train_seconds"], record["validation_accuracy"], path)
    ranges = _area_ranges(record)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ScreenClassifier(model.eval(), tuple(classes), ranges, record, digest, tuple(record["held_out_fidelity"]))

