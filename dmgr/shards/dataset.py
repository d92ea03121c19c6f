"""A streaming reader of a run's shards for training code: `dmgr.shards.dataset(urls)`.

    loader = torch.utils.data.DataLoader(dataset(urls, shuffle=1000), batch_size=16, num_workers=4,
                                         collate_fn=collate)

Shards are split between nodes (torch.distributed ranks) and DataLoader workers the webdataset way
(`split_by_node`, `split_by_worker`): each sample is read once per epoch when every worker gets at
least one shard. Decoding is done here (PIL), not by webdataset's `.decode()`, so a damaged sample raises an
error naming its key and shard, or is skipped with a warning by `handler=webdataset.warn_and_continue`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image


class SampleError(ValueError):
    pass


def shard_urls(run: str | Path) -> list[str]:
    """The shard paths of a finished run directory (those its manifest lists)."""
    run = Path(run)
    manifest = run / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{run}: no manifest.json (not a finished dmgr synthesis run)")
    return [str(run / "shards" / s["name"]) for s in json.loads(manifest.read_text())["shards"]]


def decode_sample(sample: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Raw webdataset sample -> (image (3, H, W) float in [0, 1], mask (1, H, W) float in {0, 1}, metadata)."""
    where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
    try:
        with Image.open(io.BytesIO(sample["png"])) as img:
            image = np.asarray(img.convert("RGB"))
        with Image.open(io.BytesIO(sample["mask.png"])) as img:
            mask = np.asarray(img.convert("L")) > 127
        meta = json.loads(sample["json"])
    except KeyError as exc:
        raise SampleError(f"{where}: no {exc.args[0]} member") from None
    except Exception as exc:  # noqa: BLE001 - a damaged member, named
        raise SampleError(f"{where}: cannot decode ({type(exc).__name__}: {exc})") from None
    meta = {**meta, "__key__": sample["__key__"], "__url__": sample.get("__url__")}
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255)
    m = torch.from_numpy(mask.copy())[None].float()
    return x, m, meta


def dataset(urls: str | Sequence[str] | Path, shuffle: int = 0, seed: int = 0, resampled: bool = False,
            handler: Callable = wds.reraise_exception) -> wds.WebDataset:
    """A webdataset pipeline yielding (image, mask, metadata) from shard urls (a brace pattern, a list, or a
    finished run directory).

    shuffle > 0 shuffles the shard order (per epoch, seeded) and samples in a buffer of that many;
    resampled=True draws shards with replacement, endlessly (use with `.with_epoch(n)` for multi-node DDP).
    """
    if isinstance(urls, Path) or (isinstance(urls, str) and Path(urls).is_dir()):
        urls = shard_urls(urls)
    pipeline = wds.WebDataset(
        urls if isinstance(urls, str) else list(urls),
        shardshuffle=100 if shuffle > 0 and not resampled else False,
        resampled=resampled,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        seed=seed,
        handler=handler,
        empty_check=False,  # a DataLoader worker left without a shard (more workers than shards) yields nothing
    )
    if shuffle > 0:
        pipeline = pipeline.shuffle(shuffle, seed=seed)
    return pipeline.map(decode_sample, handler=handler)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, dict]]
            ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor], list[dict]]:
    """Stack images and masks when they share one size; frames of different sizes (real images at their
    own size) stay lists of tensors, as detection models take them. Metadata stays a list of dicts (their
    `defects` lists differ in length)."""
    images, masks, metas = zip(*batch)
    if len({x.shape for x in images}) > 1:
        return list(images), list(masks), list(metas)
    return torch.stack(images), torch.stack(masks), list(metas)
