"""The quality screen's scores of one finished real-image sample, the checks it fails, and the manifest's
summary of the reject counts that the shard records sum.

Scores (docs/evaluation.md "Quality screen"):
  fidelity        per defect: the screen classifier's probability of the requested class on the defect window
  class_margin    per defect: that probability less the highest probability of another defect class (clean
                  left out): negative when the classifier reads the window as another defect class
  mask_area       per defect: mask pixels, against the class's plausible range from the user's training masks
  mask_outside    mask pixels outside every defect window (the windows lie inside the ROI by construction)
  changed_outside pixels that differ from the input outside the mask (the real-image path promises 0)
  seam            mean colour step across the mask border, as a z-score against the input's own
                  neighbour-difference statistics (how unusual the border is for this image)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dmgr.images import from_uint8

REASONS = ("fidelity", "area", "mask_outside", "changed_outside", "seam")


def changed_outside(image: np.ndarray, given: np.ndarray, mask: np.ndarray) -> int:
    """Pixels outside `mask` (H, W) where the (H, W, 3) image differs from the input."""
    return int(((image != given).any(-1) & ~mask).sum())


def mask_outside(mask: np.ndarray, boxes: list[list[int]]) -> int:
    """Mask pixels outside every [x0, y0, x1, y1] box."""
    inside = np.zeros_like(mask)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
    return int((mask & ~inside).sum())


def _steps(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean absolute colour difference between horizontal and vertical neighbours."""
    x = image.astype(np.float32)
    return np.abs(x[:, 1:] - x[:, :-1]).mean(-1), np.abs(x[1:] - x[:-1]).mean(-1)


def seam_z(image: np.ndarray, given: np.ndarray, mask: np.ndarray) -> float:
    """(mean step of the image across the mask border - mean step of the input) / std of the input's steps.
    0 for an empty mask (the area score rejects those)."""
    dx, dy = _steps(image)
    border = np.concatenate([dx[mask[:, 1:] != mask[:, :-1]], dy[mask[1:] != mask[:-1]]])
    if border.size == 0:
        return 0.0
    bx, by = _steps(given)
    steps = np.concatenate([bx.ravel(), by.ravel()])
    return float((border.mean() - steps.mean()) / (steps.std() + 1e-6))


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, image: np.ndarray, box: list[int],
                        size: int | None = None) -> torch.Tensor:
    """The classifier's probabilities (every label) on the window `box` of the (H, W, 3) uint8 image, resized
    to `size` model pixels when given and different (dataset.scale != 1). One window per call, so the score
    never depends on how samples were batched."""
    x0, y0, x1, y1 = box
    window = from_uint8(np.ascontiguousarray(image[None, y0:y1, x0:x1]))
    if size is not None and window.shape[-2:] != (size, size):
        window = F.interpolate(window, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return torch.softmax(model(window), 1)[0]


def class_margin(probs: torch.Tensor, class_id: int, classes: int) -> float:
    """probs[class_id] less the highest probability of another of the first `classes` labels (the defect
    classes; the clean label after them is left out)."""
    others = torch.cat([probs[:class_id], probs[class_id + 1:classes]])
    return float(probs[class_id] - others.max()) if len(others) else float(probs[class_id])


def fidelity_threshold(min_fidelity: float, quantile: float | None, held_out: tuple[float, ...]) -> float:
    """The class check's threshold: min_fidelity, lowered to the `quantile` of the classifier's probabilities
    of the right class on the user's held-out defects, so that a classifier that misreads real defects it did not
    learn from (few defects per class) rejects a sample only when it reads it worse than those; None: min_fidelity."""
    if quantile is None or not held_out:
        return min_fidelity
    return min(min_fidelity, float(np.quantile(np.asarray(held_out), quantile)))


def failed_checks(scores: dict, ranges: list[tuple[float, float]], thresholds: dict) -> list[str]:
    """The checks (a subset of REASONS) a sample fails; empty when it passes. The class check ("fidelity")
    fails on a defect whose class probability is below min_fidelity or, when min_class_margin is set, whose
    class margin is below it."""
    reasons = []
    margin = thresholds.get("min_class_margin")
    if any(p < thresholds["min_fidelity"] for p in scores["fidelity"]) or (
            margin is not None and any(m < margin for m in scores.get("class_margin", ()))):
        reasons.append("fidelity")
    if any(not lo <= a <= hi for a, (lo, hi) in zip(scores["mask_area"], ranges)):
        reasons.append("area")
    if scores["mask_outside"] > thresholds["max_mask_outside"]:
        reasons.append("mask_outside")
    if scores["changed_outside"] > thresholds["max_changed_outside"]:
        reasons.append("changed_outside")
    if scores["seam"] > thresholds["max_seam"]:
        reasons.append("seam")
    return reasons


def three_channels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) of an RGB or a grey (H, W) uint8 image: the screen reads grey samples as the channels equal."""
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def screen_scores(classifier, attempt, window_size: int, thresholds: dict) -> tuple[dict, list[str]]:
    """(scores, failed checks) of one real-image attempt (a dmgr.synth.engine.Attempt) by the screen's
    `classifier` (a dmgr.synth.screen_classifier.ScreenClassifier: model, classes, area_ranges)."""
    image, given = three_channels(attempt.image), three_channels(attempt.given)
    model, classes = classifier.model, classifier.classes
    defects = attempt.defects
    ids = [classes.index(d.defect.class_name) for d in defects]
    probs = [class_probabilities(model, image, d.window_box, window_size) for d in defects]
    scores = {
        "fidelity": [round(float(p[k]), 6) for p, k in zip(probs, ids)],
        "class_margin": [round(class_margin(p, k, len(classes)), 6) for p, k in zip(probs, ids)],
        "mask_area": [d.mask_area for d in defects],
        "mask_outside": mask_outside(attempt.mask, [d.window_box for d in defects]),
        "changed_outside": changed_outside(image, given, attempt.mask),
        "seam": round(seam_z(image, given, attempt.mask), 4),
    }
    ranges = [classifier.area_ranges[d.defect.class_name] for d in defects]
    return scores, failed_checks(scores, ranges, thresholds)


def attempt_rank(scores: dict, reasons: list[str]) -> tuple[int, float]:
    """The order of a seed's rejected attempts, best first: the fewest failed checks, then the highest
    fidelity of its weakest defect (screen.on_exhausted=best writes the first of that order)."""
    return len(reasons), -min(scores["fidelity"], default=0.0)


def screen_summary(total: dict[str, float], skipped_seeds: list[int]) -> dict:
    """The manifest's `screen` block from the summed records: reject rates per reason and per class (of the
    attempts the screen scored), and the cost: images generated per accepted image."""
    scored = max(total.get("screen_scored", 0), 1)
    accepted = total.get("screen_accepted", 0)
    by_class = {}
    for key, attempts in sorted(total.items()):
        if key.startswith("screen_class_attempts."):
            name = key.split(".", 1)[1]
            rejected = total.get(f"screen_class_rejected.{name}", 0)
            by_class[name] = {"attempts": int(attempts), "rejected": int(rejected),
                              "reject_rate": round(rejected / max(attempts, 1), 4)}
    return {
        "seeds": int(total.get("screen_seeds", 0)),
        "images_generated": int(total.get("screen_generated", 0)),
        "attempts_scored": int(total.get("screen_scored", 0)),
        "rejected": int(total.get("screen_rejected", 0)),
        "reject_rate": round(total.get("screen_rejected", 0) / scored, 4),
        "accepted": int(accepted),
        "flagged": int(total.get("screen_flagged", 0)),
        "skipped": int(total.get("screen_skipped", 0)),
        "skipped_seeds": skipped_seeds,
        "generated_per_accepted": round(total.get("screen_generated", 0) / accepted, 4) if accepted else None,
        "reject_rate_by_reason": {r: round(total.get(f"screen_reason.{r}", 0) / scored, 4) for r in REASONS},
        "by_class": by_class,
    }
