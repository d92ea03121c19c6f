"""Evaluation metrics as plain functions of tensors: kernel distance, seams, diversity, detection scores."""

from __future__ import annotations

import math
import warnings

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_confusion_matrix,
)
from torchmetrics.image.kid import KernelInceptionDistance


def kid(x: torch.Tensor, y: torch.Tensor, subsets: int = 50, subset_size: int = 100, seed: int = 0) -> dict:
    """Kernel Inception Distance between feature sets x (n, d) and y (m, d), in any feature space.

    The unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018),
    averaged over `subsets` random subsets of min(subset_size, n, m) rows each; returns mean and std.
    Two samples of one distribution give ~0 (it can go slightly negative); a shift makes it grow.
    """
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"kid needs at least 2 feature rows on each side, got {len(x)} and {len(y)}")
    with warnings.catch_warnings():  # its note that it keeps every feature row: ours are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(torch.nn.Identity(), subsets, size, sync_on_compute=False)
    metric.update(x.double(), real=True)
    metric.update(y.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # it draws the subsets from the global generator: seed it, then restore
        torch.manual_seed(seed)
        mean, std = metric.compute()
    # torchmetrics reports the population std over subsets; ours has been the sample std
    return {"mean": float(mean), "std": float(std) * math.sqrt(subsets / (subsets - 1)) if subsets > 1 else 0.0}


def _gray(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean(dim=1)


def _across(img: torch.Tensor, x: int, y: int, size: int, shift: int) -> list[torch.Tensor]:
    """Squared differences across the window's four edges moved by `shift` px (edges outside dropped)."""
    height, width = img.shape
    out = []
    for col in (x + shift, x + size + shift):
        if 1 <= col < width:
            out.append((img[y : y + size, col] - img[y : y + size, col - 1]) ** 2)
    for row in (y + shift, y + size + shift):
        if 1 <= row < height:
            out.append((img[row, x : x + size] - img[row - 1, x : x + size]) ** 2)
    return out


def seam_energies(
    images: torch.Tensor, windows: torch.Tensor, size: int, offsets: tuple[int, ...] = (2, 3)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,), (B,): gradient energy across each window's border, and across parallel lines nearby.

    images (B, C, H, W); windows (B, 2) top-left (x, y); size the window side. The energy across a
    vertical line at column c is the mean of (I[:, c] - I[:, c - 1])^2 over the window's rows, likewise
    for rows. The border lines are the window's four edges; the nearby lines are the edges moved
    `offsets` pixels in and out (kept inside the image).
    """
    gray = _gray(images)
    border, nearby = [], []
    for img, (x, y) in zip(gray, windows.tolist()):
        border.append(torch.cat(_across(img, x, y, size, 0)).mean())
        nearby.append(torch.cat([t for o in offsets for s in (o, -o) for t in _across(img, x, y, size, s)]).mean())
    return torch.stack(border), torch.stack(nearby)


def seam_ratio(images: torch.Tensor, windows: torch.Tensor, size: int) -> float:
    """Gradient energy across the window borders over that across lines nearby, pooled over the set.

    Untouched images score ~1; a pasted patch whose content does not continue its surroundings leaves
    a frame and scores well above 1. Pooled (ratio of sums), so flat images cannot blow it up.
    """
    border, nearby = seam_energies(images, windows, size)
    return float(border.sum() / nearby.sum().clamp(min=1e-12))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of rows (the diversity of a set; 0 for identical rows)."""
    if len(features) < 2:
        return float("nan")
    distances = torch.cdist(features.double(), features.double())
    n = len(features)
    return float(distances.sum() / (n * (n - 1)))


def nan_mean(values) -> float:
    """Mean of the values that are not nan; nan when none is."""
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """(rows, columns) int64 counts: entry [t, p] counts samples of target t predicted as p."""
    square = multiclass_confusion_matrix(predictions.long(), targets.long(), max(rows, columns))
    return square[:rows, :columns]


def _unit(scores: torch.Tensor) -> torch.Tensor:
    """Scores as float64 in [0, 1]: torchmetrics reads others as logits, and its sigmoid ties large ones
    (sigmoid(40) == sigmoid(50) == 1.0), so those are replaced by their dense ranks (same order, same ties)."""
    scores = scores.flatten().double()
    if scores.min() < 0 or scores.max() > 1:
        scores = torch.unique(scores, return_inverse=True)[1].double() / len(scores)
    return scores


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (ties counted half); nan without both labels present."""
    labels = labels.flatten().long()
    if labels.all() or not labels.any():
        return float("nan")
    return float(binary_auroc(_unit(scores), labels))


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision (area under precision-recall, step-wise, as scikit-learn computes it)."""
    labels = labels.flatten().long()
    if not labels.any():
        return float("nan")
    return float(binary_average_precision(_unit(scores), labels))


def intersection_union(prediction: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Pixel counts (|P & T|, |P | T|) of two bool masks."""
    prediction, target = prediction.bool(), target.bool()
    return int((prediction & target).sum()), int((prediction | target).sum())


def class_average_precision(probabilities: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """One-vs-rest average precision per class over every pixel: probabilities (N, C, H, W), targets (N, 1, H, W)
    class ids in 0..C-1. Entry c scores probabilities[:, c] against targets == c (nan when no pixel is c)."""
    return [average_precision(probabilities[:, c], targets == c) for c in range(probabilities.shape[1])]


def class_iou(predicted: torch.Tensor, targets: torch.Tensor, classes: int) -> list[float]:
    """Intersection over union per class of two (N, 1, H, W) class-id maps, from pixel counts pooled over
    the set; nan for a class that neither map holds."""
    ious = []
    for c in range(classes):
        inter, union = intersection_union(predicted == c, targets == c)
        ious.append(inter / union if union else float("nan"))
    return ious
