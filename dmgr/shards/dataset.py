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
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import braceexpand
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


class ShardDataset(wds.DataPipeline, wds.FluidInterface):
    """The reader's pipeline (webdataset's fluid interface: `.batched`, `.with_epoch`, ...) with a
    `set_epoch(epoch)` as torch's DistributedSampler has: the shuffles are seeded by (seed, epoch)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.state = _Epoch(seed)  # shared with the shuffle stages and with the copies `.map(...)` etc. make

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (before iterating the DataLoader, so that its workers get it)."""
        self.state.epoch = int(epoch)


class _Epoch:
    def __init__(self, seed: int) -> None:
        self.seed, self.epoch = seed, 0

    def rng(self, stream: str) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{stream}")


class _ShardList(wds.PipelineStage):
    """The shard urls, the same order on every rank and worker: as listed, or shuffled by (seed, epoch)."""

    def __init__(self, urls: list[str], owner: _Epoch | None = None) -> None:
        self.urls, self.owner = urls, owner

    def run(self) -> Iterator[dict]:
        urls = list(self.urls)
        if self.owner is not None:
            self.owner.rng("shards").shuffle(urls)
        return iter([{"url": url} for url in urls])


class _SampleShuffle(wds.PipelineStage):
    """A shuffle buffer of `size` samples, seeded by (seed, epoch, node rank, worker) at each iteration."""

    def __init__(self, size: int, owner: _Epoch) -> None:
        self.size, self.owner = size, owner

    def run(self, src: Iterator) -> Iterator:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        return _buffer_shuffle(src, self.size, self.owner.rng(f"samples/{rank}/{worker}"))


def _buffer_shuffle(src: Iterator, size: int, rng: random.Random) -> Iterator:
    buffer = []
    for item in src:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _expand(urls: str | Sequence[str] | Path) -> list[str]:
    if isinstance(urls, Path) or (isinstance(urls, str) and Path(urls).is_dir()):
        return shard_urls(urls)
    return list(braceexpand.braceexpand(urls)) if isinstance(urls, str) else [str(u) for u in urls]


def dataset(urls: str | Sequence[str] | Path, shuffle: int = 0, seed: int = 0, resampled: bool = False,
            handler: Callable = wds.reraise_exception) -> ShardDataset:
    """A webdataset pipeline yielding (image, mask, metadata) from shard urls (a brace pattern, a list, or a
    finished run directory).

    shuffle > 0 shuffles the shard order and the samples (in a buffer of that many), seeded by (seed, epoch):
    call `.set_epoch(epoch)` before each epoch, as with torch's DistributedSampler, for another order per
    epoch; a given (seed, epoch) always gives the same order. resampled=True draws shards with replacement,
    endlessly (use with `.with_epoch(n)` for multi-node DDP).
    """
    urls = _expand(urls)
    pipeline = ShardDataset(seed=seed)
    if resampled:
        pipeline.append(wds.ResampledShards(urls, seed=seed, deterministic=True))
    else:
        pipeline.append(_ShardList(urls, pipeline.state if shuffle > 0 else None))
    pipeline.append(wds.split_by_node)
    pipeline.append(wds.split_by_worker)
    pipeline.append(wds.tarfile_to_samples(handler=handler))
    if shuffle > 0:
        pipeline.append(_SampleShuffle(shuffle, pipeline.state))
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
