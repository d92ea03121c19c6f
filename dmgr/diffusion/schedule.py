"""Beta schedules and timestep respacing, following guided-diffusion's definitions.

All schedule arithmetic is float64, like guided-diffusion's numpy arrays; tensors are cast to
float32 only where a coefficient meets an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """`linear` (scaled to the step count like guided-diffusion) or `cosine` (improved DDPM)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}: use 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """The training timesteps kept by respacing, sorted ascending.

    `"250"` keeps 250 evenly strided steps; `"10,15,20"` splits the process into three equal
    sections with that many steps each; `"ddim50"` uses the integer stride giving exactly 50 steps.
    """
    if isinstance(section_counts, int):
        section_counts = str(section_counts)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(part) for part in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated like guided-diffusion: the float sums decide ties at .5
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class Diffusion:
    """A (respaced) discrete diffusion process. Index i runs 0..len-1; the network sees `timestep_map[i]`."""

    betas: torch.Tensor  # float64, per index
    alphas_cumprod: torch.Tensor  # float64, per index
    timestep_map: torch.Tensor  # long, index -> training timestep

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def abar(self, index: int) -> float:
        return float(self.alphas_cumprod[index])

    def model_timesteps(self, index: int, batch: int, device: torch.device | str) -> torch.Tensor:
        return self.timestep_map[index].to(device).expand(batch).clone()


def make_diffusion(
    diffusion_steps: int = 1000, beta_schedule_name: str = "linear", respacing: str | int | None = None
) -> Diffusion:
    """The process a model was trained with (`diffusion_steps`, schedule), respaced for sampling."""
    betas = beta_schedule(beta_schedule_name, diffusion_steps)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    kept = space_timesteps(diffusion_steps, respacing) if respacing not in (None, "") else range(diffusion_steps)
    kept_set = set(kept)
    new_betas, timestep_map, last = [], [], 1.0
    for i, abar in enumerate(alphas_cumprod.tolist()):
        if i in kept_set:
            new_betas.append(1 - abar / last)
            last = abar
            timestep_map.append(i)
    spaced = torch.tensor(new_betas, dtype=torch.float64)
    return Diffusion(
        betas=spaced,
        alphas_cumprod=torch.cumprod(1 - spaced, dim=0),
        timestep_map=torch.tensor(timestep_map, dtype=torch.long),
    )
