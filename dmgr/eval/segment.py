"""The downstream detector: a small U-Net that segments defect pixels, trained the same way on every
source, and scored on the held-out real test boards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dmgr.data.defects import CLASS_NAMES
from dmgr.eval.classifier import augment
from dmgr.eval.metrics import auroc, average_precision, intersection_union, nan_mean
from dmgr.eval.real import Boards
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

    def __post_init__(self) -> None:
        if self.width % 4:
            fail("segment.width", self.width, "a multiple of 4 (GroupNorm groups)")


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
    )


class SegNet(nn.Module):
    """Three-level U-Net: (B, 3, H, W) in [-1, 1] -> (B, 1, H, W) defect logits (H, W divisible by 4)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _double_conv(3, w), _double_conv(w, 2 * w), _double_conv(2 * w, 4 * w)
        self.dec2, self.dec1 = _double_conv(6 * w, 2 * w), _double_conv(3 * w, w)
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def train_segmenter(train: Boards, settings: SegmentSettings, seed: int) -> SegNet:
    """The same budget for every source: `steps` batches of `batch_size` pairs drawn with replacement."""
    if len(train) == 0:
        raise ValueError("train_segmenter needs at least one (image, mask) pair")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SegNet(settings.width).to(settings.device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps)
    model.train()
    for _ in range(settings.steps):
        idx = torch.randint(len(train), (settings.batch_size,), generator=g)
        images, masks = (x.to(settings.device) for x in augment(g, train.images[idx], train.masks[idx]))
        loss = segmentation_loss(model(images), masks, settings.pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict_maps(model: SegNet, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Defect probability maps, on the CPU, of images on any device (the model's is used)."""
    device = next(model.parameters()).device
    return torch.cat([torch.sigmoid(model(chunk.to(device))).cpu() for chunk in images.split(batch)])


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
