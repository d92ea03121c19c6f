"""Read a synthesis run back through webdataset, the way a user's training code would."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dmgr.export.common import is_flagged
from dmgr.images import from_uint8


@dataclass
class SynthSet:
    """A run's samples in seed order: images (N, 3, H, W) in [-1, 1], masks (N, 1, H, W) bool, windows
    (N, 2) top-left (x, y), classes (N,), and any other image members asked for (same layout)."""

    images: torch.Tensor
    masks: torch.Tensor
    windows: torch.Tensor
    classes: torch.Tensor
    window_size: int
    seeds: list[int]
    members: dict[str, torch.Tensor] = field(default_factory=dict)
    masks_by_key: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


def shard_paths(run_dir: str | Path) -> list[str]:
    """The run's shards: those the manifest lists (a finished run), else every tar under shards/."""
    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        return [str(run_dir / "shards" / s["name"]) for s in json.loads(manifest.read_text())["shards"]]
    paths = sorted(str(p) for p in (run_dir / "shards").glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no shards in {run_dir}/shards: is this a dmgr synthesis run directory?")
    return paths


def first_sample(run_dir: str | Path) -> dict:
    """The decoded first sample of a run's first shard (what the run was synthesised with)."""
    for sample in wds.WebDataset(shard_paths(run_dir)[:1], shardshuffle=False).decode("pil"):
        return sample
    raise ValueError(f"{run_dir}: the first shard holds no samples")


def geometry(sample: dict) -> tuple[int, int]:
    """(board size, window size) in image pixels of a decoded sample: the size at which real boards have the
    run's pixel scale, the model's `image_size / scale` (a native-size run's frame is larger than one board)."""
    size, _, window = frame_geometry(sample)
    return round(size / float(sample["json"].get("scale", 1.0))), window


def frame_geometry(sample: dict) -> tuple[int, tuple[int, int] | None, int]:
    """(model image size, frame (W, H) or None for a square frame of that size, window size in image pixels)
    of a decoded sample: a native-size run's frames are panels larger than the model's image size."""
    width, height = sample["png"].size
    box = sample["json"]["window_box"]
    size = int(sample["json"].get("image_size", width))
    return size, None if (width, height) == (size, size) else (width, height), box[2] - box[0]


def _mask(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("L")) > 127)[None]


def sample_metas(run_dir: str | Path) -> list[dict]:
    """The json of every sample of a run, sorted by seed (no image decoded)."""
    metas = [json.loads(s["json"]) for s in wds.WebDataset(shard_paths(run_dir), shardshuffle=False)]
    return sorted(metas, key=lambda m: m["seed"])


def read_run(
    run_dir: str | Path, images: tuple[str, ...] = (), masks: tuple[str, ...] = (), limit: int | None = None,
    include_flagged: bool = True,
) -> SynthSet:
    """Samples of a run through `webdataset.WebDataset`, sorted by seed; without `include_flagged`, only those
    the export hands the user (the seeds written flagged left out, before `limit` applies).

    `images` / `masks` name extra members to load (e.g. "twin.png", "paste.png" / "mask_gate.png");
    a sample without one of them is an error that names the synth option that writes it.
    """
    rows = []
    for sample in wds.WebDataset(shard_paths(run_dir), shardshuffle=False).decode("pil"):
        for key in (*images, *masks):
            if key not in sample:
                option = "masks" if key.startswith("mask_") else key.split(".")[0].removesuffix("_mask")
                raise KeyError(
                    f"{run_dir}: sample {sample['__key__']} has no {key}; synthesise with extras.{option}=true"
                )
        if include_flagged or not is_flagged(sample["json"]):
            rows.append(sample)
    rows.sort(key=lambda s: s["json"]["seed"])
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise ValueError(f"{run_dir}: the shards hold no samples")
    sizes = sorted({s["png"].size for s in rows})
    if len(sizes) > 1:
        raise ValueError(f"{run_dir}: frames of several sizes ({', '.join(f'{w}x{h}' for w, h in sizes)}); "
                         "the evaluation needs a run whose frames share one size")
    metas = [s["json"] for s in rows]
    boxes = torch.tensor([m["window_box"] for m in metas])
    return SynthSet(
        images=from_uint8(np.stack([np.asarray(s["png"].convert("RGB")) for s in rows])),
        masks=torch.stack([_mask(s["mask.png"]) for s in rows]),
        windows=boxes[:, :2],
        classes=torch.tensor([m["class_id"] for m in metas]),
        window_size=int(boxes[0, 2] - boxes[0, 0]),
        seeds=[m["seed"] for m in metas],
        members={k: from_uint8(np.stack([np.asarray(s[k].convert("RGB")) for s in rows])) for k in images},
        masks_by_key={k: torch.stack([_mask(s[k]) for s in rows]) for k in masks},
    )


def outside_tiles(images: torch.Tensor, windows: torch.Tensor | None, size: int) -> torch.Tensor:
    """Every size x size tile of the image grid that does not overlap the sample's window."""
    tiles = []
    height, width = images.shape[2:]
    for i, img in enumerate(images):
        for y in range(0, height - size + 1, size):
            for x in range(0, width - size + 1, size):
                if windows is not None:
                    wx, wy = windows[i].tolist()
                    if x < wx + size and wx < x + size and y < wy + size and wy < y + size:
                        continue
                tiles.append(img[:, y : y + size, x : x + size])
    return torch.stack(tiles)
