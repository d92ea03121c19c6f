"""Sample metrics of a synthesis run: class fidelity, realism (KID), seams, diversity, background.

Everything is measured in the patch classifier's feature space against real procedural data, and the
same numbers are computed for real data itself (the floor a perfect generator would reach) and, where
the run wrote them, for the no-rectification paste baseline (`extras.paste`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmgr.data.defects import CLASS_NAMES
from dmgr.eval.classifier import JudgeNet, predict
from dmgr.eval.metrics import confusion_matrix, kid, mean_pairwise_distance, nan_mean, seam_ratio
from dmgr.eval.real import CLEAN, VALIDATION, clean_boards, defect_patches, defective_boards
from dmgr.eval.shards import SynthSet, outside_tiles
from dmgr.models.classifier import Patches
from dmgr.sampler import crop_windows
from dmgr.sampler.masks import window_support

# the numbers a sweep report shows per run (manifest "quality"), from the DMGR images
QUALITY_KEYS = ("class_accuracy", "kid_defect", "kid_background", "seam_ratio", "diversity_ratio")


@dataclass
class RealReference:
    """Held-out real data: defect patches (two halves), defect-free boards (two halves), defective boards."""

    patches_a: Patches
    patches_b: Patches
    clean_a: torch.Tensor
    clean_b: torch.Tensor
    boards: torch.Tensor


def real_reference(
    image_size: int, window: int, per_class: int = 100, boards: int = 64, jitter: int = 3
) -> RealReference:
    """Real data from the VALIDATION stream (never trained on); per_class boards give one patch per class."""
    patches = defect_patches(VALIDATION, per_class, image_size, window, jitter, seed=7)
    defect = patches.labels != CLEAN
    images, labels = patches.images[defect], patches.labels[defect]
    half = len(labels) // 2
    clean = clean_boards(VALIDATION + per_class, 2 * boards, image_size).images
    real_boards = defective_boards(VALIDATION + per_class + 2 * boards, boards, image_size).images
    none = torch.zeros(0)
    return RealReference(
        Patches(images[:half], none, labels[:half]),
        Patches(images[half:], none, labels[half:]),
        clean[:boards],
        clean[boards:],
        real_boards,
    )


def _diversity(features: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    return {name: mean_pairwise_distance(features[classes == c]) for c, name in enumerate(CLASS_NAMES)}


@dataclass
class RealFeatures:
    """Classifier features of the reference halves the synthesised sets are compared with."""

    defects: torch.Tensor  # patches_a
    background: torch.Tensor  # window-sized tiles of clean_a
    diversity: dict[str, float]  # per class, of patches_b


def class_shares(predictions: torch.Tensor, classes: torch.Tensor) -> dict:
    """The judge's labels (N,) of windows meant to hold `classes` (N,): the share read as their class, the share
    read as clean, and per class the share read as that class (nan for a class with no window)."""
    return {
        "class_accuracy": float((predictions == classes).float().mean()),
        "classified_clean": float((predictions == CLEAN).float().mean()),
        "per_class_accuracy": {
            name: float((predictions[classes == c] == c).float().mean()) if (classes == c).any() else float("nan")
            for c, name in enumerate(CLASS_NAMES)},
    }


def score_images(
    classifier: JudgeNet,
    images: torch.Tensor,
    windows: torch.Tensor,
    classes: torch.Tensor,
    window: int,
    real: RealFeatures,
) -> dict:
    """All sample metrics of images (N, 3, H, W) whose window (x, y) was meant to hold class `classes`."""
    logits, features = predict(classifier, crop_windows(images, windows, window))
    predictions = logits.argmax(1)
    _, background = predict(classifier, outside_tiles(images, windows, window))
    diversity = _diversity(features, classes)
    return {
        "count": len(images),
        **class_shares(predictions, classes),
        "confusion": confusion_matrix(classes, predictions, len(CLASS_NAMES), len(CLASS_NAMES) + 1).tolist(),
        "kid_defect": kid(features, real.defects)["mean"],
        "kid_background": kid(background, real.background)["mean"],
        "seam_ratio": seam_ratio(images, windows, window),
        "diversity": nan_mean(diversity.values()),
        "per_class_diversity": diversity,
        "diversity_ratio": nan_mean(diversity[k] / real.diversity[k] for k in diversity if real.diversity[k] > 0),
    }


def score_real(
    classifier: JudgeNet, real: RealReference, windows: torch.Tensor, window: int
) -> tuple[dict, RealFeatures]:
    """The same metrics for real data against real data (what a perfect generator would score), and
    the reference features the synthesised sets are scored against."""
    logits, features_b = predict(classifier, real.patches_b.images)
    _, features_a = predict(classifier, real.patches_a.images)
    _, background_a = predict(classifier, outside_tiles(real.clean_a, None, window))
    _, background_b = predict(classifier, outside_tiles(real.clean_b, None, window))
    boards = real.boards[: len(windows)]
    windows = windows[: len(boards)].clamp(max=boards.shape[-1] - window)  # a panel run's windows, inside one board
    diversity = _diversity(features_b, real.patches_b.labels)
    scores = {
        "count": len(real.patches_b.labels),
        "class_accuracy": float((logits.argmax(1) == real.patches_b.labels).float().mean()),
        "kid_defect": kid(features_b, features_a)["mean"],
        "kid_background": kid(background_b, background_a)["mean"],
        "seam_ratio": seam_ratio(boards, windows, window),
        "diversity": nan_mean(diversity.values()),
        "per_class_diversity": diversity,
        "diversity_ratio": 1.0,
    }
    return scores, RealFeatures(features_a, background_a, diversity)


def sample_metrics(synth: SynthSet, classifier: JudgeNet, real: RealReference) -> dict:
    """Metrics of the run's DMGR images, the real reference and (when present) the paste baseline."""
    w = synth.window_size
    real_scores, reference = score_real(classifier, real, synth.windows, w)
    sets = {"dmgr": score_images(classifier, synth.images, synth.windows, synth.classes, w, reference)}
    if "paste.png" in synth.members:
        sets["paste"] = score_images(classifier, synth.members["paste.png"], synth.windows, synth.classes, w, reference)
    sets["real"] = real_scores
    if "twin.png" in synth.members:
        height, width = synth.images.shape[2:]
        outside = ~window_support(height, width, synth.windows, w)
        change = (synth.images - synth.members["twin.png"]).abs().mean(1, keepdim=True)
        sets["dmgr"]["background_change_vs_twin"] = float(change[outside].mean())
    return sets


def quality_block(sets: dict) -> dict[str, float]:
    """The flat numbers the manifest's `quality` holds (and the sweep report tabulates)."""
    return {key: sets["dmgr"][key] for key in QUALITY_KEYS}


def class_reading(judge: JudgeNet, windows: torch.Tensor, classes: torch.Tensor) -> dict:
    """How the judge reads samples' defect windows (N, 3, w, w) of the given classes (N,): the share it reads as
    their own class, the share it reads as clean, and per class the share read as that class."""
    shares = class_shares(predict(judge, windows)[0].argmax(1), classes)
    return {"samples": len(windows), "class_accuracy": round(shares["class_accuracy"], 4),
            "read_as_clean": round(shares["classified_clean"], 4),
            "classes": {name: round(v, 4) for name, v in shares["per_class_accuracy"].items() if not math.isnan(v)}}


def screen_agreement(judge: JudgeNet, screen: torch.nn.Module, synth: SynthSet) -> dict:
    """How often the judge and the run's screen classifier read a synthesised window as the same label (six
    classes + clean), and each one's class accuracy there: the judge is independent, the screen selected."""
    crops = crop_windows(synth.images, synth.windows, synth.window_size)
    judged = predict(judge, crops)[0].argmax(1)
    with torch.no_grad():
        screened = torch.cat([screen.eval()(c) for c in crops.split(512)]).argmax(1)
    return {"agreement": float((judged == screened).float().mean()),
            "judge_class_accuracy": float((judged == synth.classes).float().mean()),
            "screen_class_accuracy": float((screened == synth.classes).float().mean()),
            "windows": len(crops)}
