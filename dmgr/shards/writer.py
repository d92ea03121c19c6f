"""A writer thread that encodes PNGs and writes tar shards, off the sampling thread.

A shard is written to `<name>.tmp-<pid>` and renamed to its final name only after it is complete
and flushed to disk, so a visible shard is never partial.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

import webdataset as wds

from dmgr.shards.layout import sample_key

log = logging.getLogger(__name__)


class ShardWriter:
    """`open(path)`, `put(sample)` ..., `close()` per shard; `finish()` at the end.

    A sample is a dict: seed (int) plus members, e.g. {"png": PIL image, "mask.png": PIL image, "json": dict}.
    The queue is bounded, so the sampler waits only when the disk is slower than sampling.
    """

    def __init__(self, max_queue: int = 16):
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.completed: list[Path] = []
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _send(self, item: tuple) -> None:
        while True:
            if self.error is not None:
                raise RuntimeError(f"shard writer failed: {self.error}") from self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def open(self, path: Path) -> None:
        self._send(("open", Path(path)))

    def put(self, sample: dict[str, Any]) -> None:
        self._send(("sample", sample))

    def close(self) -> None:
        self._send(("close", None))

    def finish(self) -> list[Path]:
        self._send(("stop", None))
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"shard writer failed: {self.error}") from self.error
        return self.completed

    def _run(self) -> None:
        stream = tar = final = tmp = None
        try:
            while True:
                kind, payload = self.queue.get()
                if kind == "open":
                    final = payload
                    final.parent.mkdir(parents=True, exist_ok=True)
                    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
                    stream = open(tmp, "wb")
                    tar = wds.TarWriter(stream, mtime=0)
                elif kind == "sample":
                    sample = dict(payload)
                    sample["__key__"] = sample_key(sample.pop("seed"))
                    tar.write(sample)
                elif kind == "close":
                    tar.close()  # also closes the stream
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                    os.replace(tmp, final)
                    self.completed.append(final)
                    log.debug("completed %s", final)
                    stream = tar = tmp = None
                elif kind == "stop":
                    return
        except BaseException as exc:  # noqa: BLE001 - reported to the sampling thread
            self.error = exc
            if stream is not None:
                stream.close()
            if tmp is not None and tmp.exists():
                tmp.unlink()
