"""What every detector export writes, one image at a time: an Item (a whole frame, a tile of one, or one of the
user's real images) with its labels and its split, and the rules that decide the split and flagged samples."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dmgr.export.common import Sample

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Item:
    name: str  # file stem: the sample's key, `<key>_<x>_<y>` for a tile, `real-...` for a real image
    png: bytes  # the image, in the frame's own mode (L or RGB)
    size: tuple[int, int]  # width, height
    labels: list[tuple[int, np.ndarray]]  # (class id, bool mask of this image) per defect
    split: str  # "train" or "val"
    source: dict  # {"seed": ...} or {"real": ...}; a tile adds "frame", "offset" and "frame_size"


def split_of(identity: int | str, val: float) -> str:
    """"val" for a `val` share of identities, by a hash of the identity alone: a run that grows keeps every
    seed where it was, and a larger `val` only moves seeds from train to val."""
    digest = hashlib.sha256(f"dmgr-split:{identity}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val * 2**64 else "train"


def seed_of(sample: Sample) -> int:
    return int(sample.meta.get("seed", sample.key))


def sample_item(sample: Sample, val: float) -> Item:
    labels = [(int(defect["class_id"]), own) for defect, own in sample.defect_masks()]
    height, width = labels[0][1].shape if labels else sample.mask().shape
    seed = seed_of(sample)
    return Item(sample.key, sample.png, (width, height), labels, split_of(seed, val), {"seed": seed})


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
