"""Where sampling noise comes from: per-sample generators, or recorded tensors replayed in order.

No global RNG is touched while sampling: every draw goes through one of these objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class NoiseSource(Protocol):
    def draw(self, like: torch.Tensor, role: str) -> torch.Tensor:
        """Standard normal noise shaped like `like`; `role` names the draw ("undo_x", "undo_crop", ...)."""
        ...


class PerSampleNoise:
    """One generator per sample: sample i's draws never depend on its batch-mates."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def draw(self, like: torch.Tensor, role: str) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} but {len(self.generators)} generators")
        return torch.stack(
            [
                torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype).to(like.device)
                for g in self.generators
            ]
        )


class ReplayNoise:
    """Replays recorded draws per role, in order (used to reproduce a reference run)."""

    def __init__(self, **recorded: Sequence[torch.Tensor]):
        self.queues = {role: list(tensors) for role, tensors in recorded.items()}

    def draw(self, like: torch.Tensor, role: str) -> torch.Tensor:
        queue = self.queues.get(role)
        if not queue:
            raise RuntimeError(f"no recorded noise left for {role!r}")
        return queue.pop(0).reshape(like.shape).to(like)


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def initial_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """x_T for each sample from its own generator: shape is per sample, e.g. (3, 256, 256)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device) for g in generators]).to(device)
