"""A small patch classifier and its training loop, shared by the synthesis screen (trained on the user's data)
and the evaluation (trained on the procedural domain's held-out stream). Only the code is shared: each trains
its own weights from its own data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dmgr.progress import progress_bar


@dataclass
class Patches:
    """Window-sized crops: images (N, 3, w, w) in [-1, 1], masks (N, 1, w, w) (or empty), integer labels (N,)."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor


class PatchClassifier(nn.Module):
    def __init__(self, classes: int, width: int = 32):
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
    train: Patches, classes: int, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = True
) -> PatchClassifier:
    """AdamW with a one-cycle schedule on `steps` augmented batches drawn with replacement, all from `seed`."""
    with torch.random.fork_rng():  # parameter initialisation from the seed, global RNG state untouched
        torch.manual_seed(seed)
        model = PatchClassifier(classes)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for _ in progress_bar(range(steps), desc="classifier", disable=not progress, leave=False):
        idx = torch.randint(len(train.labels), (batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(*augment(g, train.images[idx])), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def accuracy(model: PatchClassifier, patches: Patches) -> float:
    logits, _ = predict(model, patches.images)
    return float((logits.argmax(1) == patches.labels).float().mean())
