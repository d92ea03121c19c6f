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
from dmgr.shards.atomic import fsync_directory
from dmgr.shards.layout import damaged_path, sample_key
from dmgr.shards.locks import release
from dmgr.shards.records import expected_digest, read_record, write_record

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
            discard(tar, stream)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if lock is not None:
                release(lock)

    def _complete(self, tmp: Path, final: Path, record: dict[str, Any]) -> None:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        record = {"name": final.name, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp), **record}
        previous = read_record(final)
        expected = expected_digest(final)
        if expected not in (None, record["sha256"]):
            raise ShardWriteError(redo_mismatch(final, record, expected, previous or {}))
        if not previous:
            write_record(final, record)
        os.replace(tmp, final)
        fsync_directory(final.parent)
        damaged_path(final).unlink(missing_ok=True)  # the redo is accepted: the damaged copy has served
        self.completed.append(final)
        log.debug("completed %s", final)


def discard(tar: wds.TarWriter | None, stream: Any) -> None:
    """Close an abandoned shard's tar and file without raising (its temp file is deleted next). The tar is
    closed first: left open, its buffer would be flushed into the closed file when garbage-collected
    ("Exception ignored ... write to closed file" after a disk-full error or SIGTERM)."""
    for close in (getattr(tar, "close", None), getattr(stream, "close", None)):
        if close is not None:
            try:
                close()
            except (OSError, ValueError):
                pass


def made_differently(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key=<record's> (here <this run's>)' for each execution fact (`made_with`) that differs."""
    keys = sorted(set(before) | set(now))
    return [f"{key}={before.get(key)!r} (here {now.get(key)!r})" for key in keys if before.get(key) != now.get(key)]


def redo_mismatch(final: Path, record: dict[str, Any], expected: str, previous: dict[str, Any]) -> str:
    """One line: a redone shard's bytes differ from the digest already recorded, how the recording run
    differed from this one, and what to do."""
    kept = damaged_path(final)
    where = f"; the damaged copy is kept as {kept.name}" if kept.exists() else ""
    head = (f"{final.name} was made again with different bytes than its record (sha256 {record['sha256'][:12]} "
            f"vs {expected[:12]})")
    before = previous.get("made_with")
    if before is None:
        source = "its record" if previous else "manifest.json, the only digest left for it,"
        cause = (f"{source} does not say how it was made (batch_size, threads, device, torch): rerun with the "
                 "settings and machine of the run that began it")
    elif diffs := made_differently(before, record.get("made_with", {})):
        cause = (f"the run that recorded it differs: {', '.join(diffs)}; rerun with its settings (samples are "
                 "bit-identical only for equal batch_size, threads, device and torch build)")
    else:
        cause = ("with the same batch_size, threads, device, torch and CPU as its record: the samples are not "
                 "reproducible on this machine")
    return f"{head}: {cause}; the recorded digest is kept{where}"
