"""The downstream detector: a small U-Net trained the same way on every source and scored on the held-out
real test boards. Task `binary` segments defect pixels (one logit, BCE + Dice); task `classes` labels every
pixel background or one of the 6 defect classes (7 logits, cross-entropy + Dice), as a user's multi-class
segmenter trained on the shards' class labels would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dmgr.data.defects import CLASS_NAMES
from dmgr.eval.metrics import (
    auroc,
    average_precision,
    class_average_precision,
    class_iou,
    intersection_union,
    nan_mean,
)
from dmgr.eval.real import Boards
from dmgr.models.classifier import augment
from dmgr.schema import STRICT_SECTION, Count, fail


@dataclass(frozen=True)
class SegmentSettings:
    __pydantic_config__ = STRICT_SECTION
    steps: Count() = 1000
    batch_size: Count() = 16
    lr: Annotated[float, Field(gt=0)] = 3e-3
    width: Count(4) = 16  # U-Net base channels: a multiple of 4 (GroupNorm groups)
    pos_weight: Annotated[float, Field(gt=0)] = 20.0  # BCE weight of defect pixels: without it 1000 steps learn
    #   only missing holes
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5  # probability above which a pixel counts as defect (IoU)
    device: str = "cpu"  # where the segmenter trains (scores from cpu and cuda differ in float rounding)
    task: Literal["binary", "classes"] = "binary"  # defect or not; or background + one logit per defect class
    crop: Count(8) | None = 64  # each step trains on one random crop x crop of each pair (a multiple of 8, the
    #   U-Net's stride); a frame no larger than that trains whole; None: whole frames. Testing is on whole frames.

    def __post_init__(self) -> None:
        if self.width % 4:
            fail("segment.width", self.width, "a multiple of 4 (GroupNorm groups)")
        if self.crop is not None and self.crop % 8:
            fail("segment.crop", self.crop, "a multiple of 8 (the U-Net's three poolings)")


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
    )


SEGMENT_CLASSES = 1 + len(CLASS_NAMES)  # task classes: 0 background, 1 + c the defect class c


def outputs_of(task: str) -> int:
    """The U-Net's logits per pixel for a task."""
    return SEGMENT_CLASSES if task == "classes" else 1


class SegNet(nn.Module):
    """Three-level U-Net, fully convolutional: (B, 3, H, W) in [-1, 1] -> (B, outputs, H, W) logits for any
    H, W (a side that is not a multiple of 4 is padded by edge replication for the network and cut back)."""

    def __init__(self, width: int = 16, outputs: int = 1):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _double_conv(3, w), _double_conv(w, 2 * w), _double_conv(2 * w, 4 * w)
        self.dec2, self.dec1 = _double_conv(6 * w, 2 * w), _double_conv(3 * w, w)
        self.out = nn.Conv2d(w, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % 4 or width % 4:
            padded = F.pad(x, (0, -width % 4, 0, -height % 4), mode="replicate")
            return self.forward(padded)[..., :height, :width]
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.out(d1)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy with defect pixels weighted `pos_weight`, plus soft Dice (defect pixels are
    well under 1% of a board)."""
    target = masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight))
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def class_segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy of (B, C, H, W) logits against (B, 1, H, W) class ids with every defect class weighted
    `pos_weight` against background (class 0), plus soft Dice of the defect pixels pooled over the defect
    classes (the binary loss's Dice when one class is the only defect)."""
    weight = torch.full((logits.shape[1],), pos_weight, device=logits.device)
    weight[0] = 1.0
    target = targets[:, 0].long()
    ce = F.cross_entropy(logits, target, weight=weight)
    prob = torch.softmax(logits, 1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    dice = 1 - (2 * (prob * onehot).sum() + 1) / (prob.sum() + onehot.sum() + 1)
    return ce + dice


def class_maps(boards: Boards) -> torch.Tensor:
    """(N, 1, H, W) int64 targets of the classes task: 1 + the board's class id under its mask, 0 elsewhere."""
    if bool(((boards.classes < 0) & boards.masks.flatten(1).any(1)).any()):
        raise ValueError("the classes task needs a class id (>= 0) for every board with a defect mask")
    return torch.where(boards.masks, (boards.classes + 1).view(-1, 1, 1, 1), 0).long()


def _targets(train: Boards, task: str) -> torch.Tensor:
    return class_maps(train) if task == "classes" else train.masks


def _loss(logits: torch.Tensor, targets: torch.Tensor, settings: SegmentSettings) -> torch.Tensor:
    if settings.task == "classes":
        return class_segmentation_loss(logits, targets, settings.pos_weight)
    return segmentation_loss(logits, targets, settings.pos_weight)


def random_crops(g: torch.Generator, images: torch.Tensor, targets: torch.Tensor, size: int | None):
    """One uniformly placed size x size crop of each (image, target) pair; whole frames when they are no larger
    (then nothing is drawn from g)."""
    height, width = images.shape[2:]
    if size is None or (height <= size and width <= size):
        return images, targets
    ch, cw = min(size, height), min(size, width)
    ys = torch.randint(height - ch + 1, (len(images),), generator=g).tolist()
    xs = torch.randint(width - cw + 1, (len(images),), generator=g).tolist()
    pick = [(slice(None), slice(y, y + ch), slice(x, x + cw)) for y, x in zip(ys, xs)]
    return torch.stack([im[p] for im, p in zip(images, pick)]), torch.stack([t[p] for t, p in zip(targets, pick)])


def train_segmenter(train: Boards, settings: SegmentSettings, seed: int) -> SegNet:
    """The same budget for every source: `steps` batches of `batch_size` pairs drawn with replacement, each
    pair cut to a random `crop` (frames larger than the crop see the same pixels per step as small ones)."""
    if len(train) == 0:
        raise ValueError("train_segmenter needs at least one (image, mask) pair")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SegNet(settings.width, outputs_of(settings.task)).to(settings.device)
    targets = _targets(train, settings.task)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps)
    model.train()
    for _ in range(settings.steps):
        idx = torch.randint(len(train), (settings.batch_size,), generator=g)
        pairs = random_crops(g, train.images[idx], targets[idx], settings.crop)
        images, target = (x.to(settings.device) for x in augment(g, *pairs))
        loss = _loss(model(images), target, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict_maps(model: SegNet, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Probability maps, on the CPU, of images on any device (the model's is used): (N, 1, H, W) defect
    probabilities of a one-logit model, (N, C, H, W) class probabilities (softmax) of a C-logit one."""
    device = next(model.parameters()).device
    normalise = torch.sigmoid if model.out.out_channels == 1 else lambda logits: torch.softmax(logits, 1)
    return torch.cat([normalise(model(chunk.to(device))).cpu() for chunk in images.split(batch)])


def detection_scores(probabilities: torch.Tensor, test: Boards, threshold: float = 0.5) -> dict:
    """Pixel AUROC and AP over every test pixel, image AUROC (score: the max of the 3x3-averaged map;
    defective boards against clean ones), and IoU at `threshold` per defect class (pooled pixel counts)."""
    image_scores = F.avg_pool2d(probabilities, 3, 1, 1).amax(dim=(1, 2, 3))
    defective = test.classes >= 0
    scores = {
        "pixel_auroc": auroc(probabilities, test.masks),
        "pixel_ap": average_precision(probabilities, test.masks),
        "image_auroc": auroc(image_scores, defective),
    }
    predicted = probabilities > threshold
    ious = {}
    for c, name in enumerate(CLASS_NAMES):
        pick = test.classes == c
        if pick.any():
            inter, union = intersection_union(predicted[pick], test.masks[pick])
            ious[name] = inter / union if union else float("nan")
    scores["iou"] = ious
    scores["mean_iou"] = nan_mean(ious.values())
    return scores


def class_scores(probabilities: torch.Tensor, test: Boards) -> dict:
    """The classes task's scores of (N, 7, H, W) softmax maps: per defect class the one-vs-rest pixel AP of
    its probability and the IoU of the argmax map (pooled pixel counts), their means over the defect
    classes (`map`, `mean_iou`), and the background's IoU."""
    targets = class_maps(test)
    ap = class_average_precision(probabilities, targets)[1:]
    iou = class_iou(probabilities.argmax(1, keepdim=True), targets, probabilities.shape[1])
    return {
        "map": nan_mean(ap),
        "mean_iou": nan_mean(iou[1:]),
        "background_iou": iou[0],
        "ap": dict(zip(CLASS_NAMES, ap)),
        "iou": dict(zip(CLASS_NAMES, iou[1:])),
    }


def score(probabilities: torch.Tensor, test: Boards, settings: SegmentSettings) -> dict:
    """The task's scores of a model's probability maps on the test boards."""
    if settings.task == "classes":
        return class_scores(probabilities, test)
    return detection_scores(probabilities, test, settings.threshold)
