"""The evaluation metrics on inputs whose answers are known."""

import itertools
import math

import pytest
import torch

from dmgr.eval.metrics import (
    auroc,
    average_precision,
    class_average_precision,
    class_iou,
    confusion_matrix,
    intersection_union,
    kid,
    mean_pairwise_distance,
    seam_ratio,
)
from dmgr.eval.real import Boards
from dmgr.eval.segment import detection_scores


def _normal(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift():
    a, b = _normal(400, 16, 0), _normal(400, 16, 1)
    same = kid(a, a)["mean"]  # unbiased estimator: ~0 up to subset noise, not exactly 0
    twins = kid(a, b)["mean"]
    shifted = kid(a, _normal(400, 16, 2, shift=0.5))["mean"]
    far = kid(a, _normal(400, 16, 3, shift=1.0))["mean"]
    assert abs(same) < 0.05 and abs(twins) < 0.05
    assert shifted > 20 * max(abs(same), abs(twins)) and far > 4 * shifted


def test_kid_matches_the_closed_form_on_a_tiny_set():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[2.0], [3.0]])
    k = lambda a, b: (a * b + 1) ** 3  # noqa: E731  (d = 1)
    expected = 2 * k(0, 1) / 2 + 2 * k(2, 3) / 2 - 2 * sum(k(a, b) for a in (0, 1) for b in (2, 3)) / 4
    assert kid(x, y, subsets=3)["mean"] == pytest.approx(expected)


def test_kid_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        kid(torch.zeros(1, 3), torch.zeros(5, 3))


def test_kid_subsets_follow_the_seed_and_leave_the_global_generator_alone():
    x, y = _normal(9, 3, 4), _normal(7, 3, 5, shift=0.3)
    g = torch.Generator().manual_seed(3)  # the subsets: x's then y's permutation, per subset, from this generator
    values = []
    for _ in range(5):
        a, b = x.double()[torch.randperm(9, generator=g)[:4]], y.double()[torch.randperm(7, generator=g)[:4]]
        k = lambda u, v: (u @ v.T / 3 + 1) ** 3  # noqa: E731
        off_diagonal = lambda m: (m.sum() - m.diagonal().sum()) / 12  # noqa: E731  (4 * 3 pairs)
        values.append(off_diagonal(k(a, a)) + off_diagonal(k(b, b)) - 2 * k(a, b).mean())
    torch.manual_seed(11)
    result = kid(x, y, subsets=5, subset_size=4, seed=3)
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(11)).item()
    assert result["mean"] == pytest.approx(float(torch.stack(values).mean()))
    assert result["std"] == pytest.approx(float(torch.stack(values).std()))  # the sample std over subsets


def _smooth_images(n: int, size: int = 64) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images = [torch.sin(xs / (5 + i) + i) * torch.cos(ys / (7 + i)) for i in range(n)]
    return torch.stack(images)[:, None].repeat(1, 3, 1, 1) * 0.5


def test_seam_ratio_is_about_one_untouched_and_high_for_a_pasted_square():
    images = _smooth_images(6)
    windows = torch.tensor([[10, 12], [20, 30], [5, 5], [40, 8], [30, 40], [12, 44]])
    assert seam_ratio(images, windows, 16) == pytest.approx(1.0, abs=0.35)
    pasted = images.clone()
    for img, (x, y) in zip(pasted, windows.tolist()):
        img[:, y : y + 16, x : x + 16] = img[:, y : y + 16, x : x + 16].flip(1) + 0.4  # other content, brighter
    assert seam_ratio(pasted, windows, 16) > 10


def test_mean_pairwise_distance():
    assert mean_pairwise_distance(torch.ones(5, 3)) == 0.0
    assert mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    points = torch.tensor([[0.0], [1.0], [3.0]])
    assert mean_pairwise_distance(points) == pytest.approx((1 + 3 + 2) / 3)
    assert math.isnan(mean_pairwise_distance(torch.zeros(1, 2)))


def test_confusion_matrix_counts():
    c = confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 3, 1, 2, 0]), 3, 4)
    assert c.tolist() == [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]]


def _brute_auroc(scores, labels) -> float:
    pos = [s for s, label in zip(scores, labels) if label]
    neg = [s for s, label in zip(scores, labels) if not label]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_known_values_and_brute_force():
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.full((6,), 0.3), torch.tensor([0, 1, 0, 1, 1, 0])) == 0.5
    assert math.isnan(auroc(torch.rand(4), torch.zeros(4)))
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 7, (60,), generator=g).float()  # many ties
    labels = torch.rand(60, generator=g) < 0.4
    assert auroc(scores, labels) == pytest.approx(_brute_auroc(scores.tolist(), labels.tolist()))


def test_average_precision_known_values():
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 1, 0, 0])) == 1.0
    # precision 1 at recall 0.5, then 2/3 at recall 1
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # tied scores form one threshold: both at once, precision 1/2
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)


def test_scores_outside_the_unit_interval_keep_their_order():
    scores, labels = torch.tensor([40.0, 50.0, 60.0, -45.0]), torch.tensor([0, 1, 1, 0])
    assert auroc(scores, labels) == 1.0 and average_precision(scores, labels) == 1.0  # sigmoid would tie 40, 50, 60
    assert auroc(torch.tensor([-3.0, 7.0, 7.0]), torch.tensor([0, 1, 0])) == pytest.approx(0.75)


def test_intersection_union():
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    a[:2, :2] = True
    b[1:3, 1:3] = True
    assert intersection_union(a, b) == (1, 7)


def test_detection_scores_of_a_perfect_and_an_empty_prediction():
    masks = torch.zeros(8, 1, 16, 16, dtype=torch.bool)
    classes = torch.tensor([0, 1, 2, 3, 4, 5, -1, -1])
    for i in range(6):
        masks[i, 0, 2 + i : 5 + i, 3:6] = True
    test = Boards(torch.zeros(8, 3, 16, 16), masks, classes)
    perfect = detection_scores(masks.float(), test)
    assert perfect["pixel_auroc"] == 1.0 and perfect["pixel_ap"] == 1.0 and perfect["image_auroc"] == 1.0
    assert perfect["mean_iou"] == 1.0 and set(perfect["iou"].values()) == {1.0}
    nothing = detection_scores(torch.zeros(8, 1, 16, 16), test)
    assert nothing["pixel_auroc"] == 0.5 and nothing["image_auroc"] == 0.5 and nothing["mean_iou"] == 0.0


def _class_maps() -> torch.Tensor:
    """(4, 1, 8, 8) ids: background 0, a 2x3 block of class 1 and a 3x3 block of class 2 on each of two images."""
    targets = torch.zeros(4, 1, 8, 8, dtype=torch.long)
    targets[:2, 0, 1:3, 1:4] = 1
    targets[1:3, 0, 4:7, 4:7] = 2
    return targets


def test_class_metrics_of_a_perfect_prediction():
    targets = _class_maps()
    onehot = torch.nn.functional.one_hot(targets[:, 0], 4).permute(0, 3, 1, 2).float()
    assert class_average_precision(onehot, targets)[:3] == [1.0, 1.0, 1.0]
    assert math.isnan(class_average_precision(onehot, targets)[3])  # no pixel of class 3
    ious = class_iou(targets, targets, 4)
    assert ious[:3] == [1.0, 1.0, 1.0] and math.isnan(ious[3])


def test_class_metrics_of_two_swapped_classes():
    targets = _class_maps()
    swapped = torch.where(targets == 1, 2, torch.where(targets == 2, 1, targets))
    onehot = torch.nn.functional.one_hot(swapped[:, 0], 3).permute(0, 3, 1, 2).float()
    ious = class_iou(swapped, targets, 3)
    assert ious[1] == 0.0 and ious[2] == 0.0 and ious[0] == 1.0
    # every class-1 pixel scores 0 for class 1, tied with every pixel but the class-2 ones (scored 1): AP is
    # the precision of calling all pixels class 1, its share of the pixels
    ap = class_average_precision(onehot, targets)
    total = targets.numel()
    assert ap[0] == 1.0
    assert ap[1] == pytest.approx(int((targets == 1).sum()) / total)
    assert ap[2] == pytest.approx(int((targets == 2).sum()) / total)


def test_class_iou_counts_pooled_pixels():
    targets = _class_maps()
    predicted = targets.clone()
    predicted[0, 0, 1, 1:4] = 0  # 3 of the 12 class-1 pixels read as background
    ious = class_iou(predicted, targets, 3)
    assert ious[1] == pytest.approx(9 / 12)
    assert ious[0] == pytest.approx((targets.numel() - 12 - 18) / (targets.numel() - 12 - 18 + 3))
    assert ious[2] == 1.0
