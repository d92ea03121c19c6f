"""A writer thread that encodes PNGs and writes tar shards, off the sampling thread.

A shard is written to `<name>.tmp-<pid>`, flushed to disk, its record written (records.py), and only then
renamed to its final name, so a visible shard is never partial and always has a record. The shard's lock
(locks.py), taken by the caller, is released once the shard is final or abandoned.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import webdataset as wds

from dmgr.digest import sha256_file
from dmgr.shards.layout import sample_key
from dmgr.shards.locks import release
from dmgr.shards.records import read_record, write_record

log = logging.getLogger(__name__)


class ShardWriteError(RuntimeError):
    """Writing a shard failed (disk full, read-only, a record that disagrees): the shard was abandoned."""


class ShardWriter:
    """`open(path, lock)`, `put(sample)` ..., `close(record)` per shard; `finish()` at the end, or
    `abort()` to abandon the current shard (its temp file is removed).

    A sample is a dict: seed (int) plus members, e.g. {"png": PIL image, "mask.png": PIL image, "json": dict}.
    The queue is bounded, so the sampler waits only when the disk is slower than sampling.
    """

    def __init__(self, max_queue: int = 16):
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.aborting = False
        self.completed: list[Path] = []
        self.waited = 0.0  # seconds the sampling thread spent blocked on a full queue or on `finish`
        self.cpu_seconds = 0.0  # CPU time of the writer thread (encoding, tar, digest), set when it stops
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _raise_error(self) -> None:
        error = self.error
        detail = error if isinstance(error, ShardWriteError) else f"{type(error).__name__}: {error}"
        raise ShardWriteError(f"writing a shard failed, the shard was abandoned: {detail}") from error

    def _send(self, item: tuple) -> None:
        start = time.perf_counter()
        try:
            self._put(item)
        finally:
            self.waited += time.perf_counter() - start

    def _put(self, item: tuple) -> None:
        while True:
            if self.error is not None:
                self._raise_error()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def open(self, path: Path, lock: int | None = None) -> None:
        self._send(("open", (Path(path), lock)))

    def put(self, sample: dict[str, Any]) -> None:
        self._send(("sample", sample))

    def close(self, record: dict[str, Any] | None = None) -> None:
        self._send(("close", record or {}))

    def finish(self) -> list[Path]:
        self._send(("stop", None))
        start = time.perf_counter()
        self.thread.join()
        self.waited += time.perf_counter() - start
        if self.error is not None:
            self._raise_error()
        return self.completed

    def abort(self) -> None:
        """Abandon the shard being written (temp file removed, lock released) and stop the thread."""
        self.aborting = True
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(("stop", None))
        self.thread.join(timeout=60)

    def _run(self) -> None:
        stream = tar = final = tmp = lock = None
        try:
            while not self.aborting:
                kind, payload = self.queue.get()
                if self.aborting or kind == "stop":
                    break
                if kind == "open":
                    final, lock = payload
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
                    stream = tar = None
                    self._complete(tmp, final, payload)
                    tmp = None
                    if lock is not None:
                        release(lock)
                        lock = None
        except BaseException as exc:  # noqa: BLE001 - reported to the sampling thread
            self.error = exc
        finally:
            self.cpu_seconds = time.thread_time()
            if stream is not None:
                stream.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if lock is not None:
                release(lock)

    def _complete(self, tmp: Path, final: Path, record: dict[str, Any]) -> None:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        record = {"name": final.name, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp), **record}
        previous = read_record(final)
        if previous and previous.get("sha256") not in (None, record["sha256"]):
            raise ShardWriteError(
                f"{final.name} was made again with different bytes than its record (sha256 {record['sha256'][:12]} "
                f"vs {previous['sha256'][:12]}): the samples are not reproducible here (another torch build, "
                "device or thread count?); the recorded digest is kept - finish the run where it began"
            )
        if not previous:
            write_record(final, record)
        os.replace(tmp, final)
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.completed.append(final)
        log.debug("completed %s", final)
