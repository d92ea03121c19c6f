"""The run's state files and shard writing under failure: durable atomic writes, no temp file left behind,
an abandoned shard closed quietly, a json that does not depend on batch-mates, a warning for long shards."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synth_support import TINY

from dmgr.shards import ShardWriter
from dmgr.shards.atomic import write_json_atomic
from dmgr.shards.manifest import write_manifest
from dmgr.shards.records import record_path, write_record

RECORD = {"index": 0, "name": "x.tar", "samples": 1, "first_seed": 0, "last_seed": 0, "bytes": 3, "sha256": "ab"}


def write_state(kind: str, out: Path) -> Path:
    """Write one state file the way the job does; returns its path."""
    if kind == "record":
        write_record(out / "shards" / "x.tar", RECORD)
        return record_path(out / "shards" / "x.tar")
    if kind == "manifest":
        return write_manifest(out, [RECORD], {"identity": "abc"})
    write_json_atomic(out / "run.json", {"identity": "abc"})
    return out / "run.json"


@pytest.mark.parametrize("kind", ["record", "manifest", "run.json"])
def test_state_files_are_fsynced_before_and_after_the_rename(kind, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = write_state(kind, tmp_path)
    assert json.loads(path.read_text())
    assert path.stat().st_ino in synced  # the file's bytes, before it is renamed into place
    assert path.parent.stat().st_ino in synced  # the rename itself
    assert synced.index(path.stat().st_ino) < synced.index(path.parent.stat().st_ino)


@pytest.mark.parametrize("kind", ["record", "manifest", "run.json"])
def test_a_failed_state_write_keeps_the_old_file_and_leaves_no_temp_file(kind, tmp_path, monkeypatch):
    path = write_state(kind, tmp_path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_state(kind, tmp_path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_an_abandoned_shard_is_closed_without_an_ignored_exception(tmp_path, monkeypatch):
    """A shard abandoned mid-write (SIGTERM, disk full) must not leave a tar stream that, collected later,
    writes into its closed file ('Exception ignored ... write to closed file' after the one-line error)."""
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    writer = ShardWriter()
    writer.open(tmp_path / "shards" / "x.tar")
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    writer.put({"seed": 0, "png": image, "json": {"seed": 0}})
    deadline = time.time() + 60
    while not (writer.queue.empty() and list((tmp_path / "shards").glob("x.tar.tmp-*"))):
        assert time.time() < deadline, "the writer never started the shard"
        time.sleep(0.01)
    writer.abort()
    del writer
    gc.collect()
    assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in ignored] == []
    assert list((tmp_path / "shards").iterdir()) == []


@pytest.fixture(scope="module")
def tiny_engine():
    from test_synth_config import spec_of

    from dmgr.synth.engine import load_engine

    spec = spec_of([*TINY, "seeds=0-1", "samples_per_shard=2", "batch_size=1", "out_dir=/nonexistent/x"])
    return spec, load_engine(spec, torch.device("cpu"))


def test_float_diagnostics_in_the_json_do_not_carry_batch_dependent_digits(tiny_engine):
    """final_loss's last digits depend on the batch's kernels; the json keeps 4 significant digits, so that a
    shard redone with another batch_size can reproduce its recorded bytes."""
    from dmgr.synth.engine import make_attempts, make_settings
    from dmgr.synth.plan import plan_sample
    from dmgr.synth.record import attempt_json

    spec, engine = tiny_engine
    attempt = make_attempts(engine, make_settings(spec), [plan_sample(0, spec.dataset)])[0]
    meta = attempt_json(spec, engine.digests, attempt)
    assert meta["final_loss"] > 0
    assert meta["final_loss"] == float(f"{meta['final_loss']:.4g}")


def test_a_long_shard_is_warned_about_naming_samples_per_shard(tiny_engine, tmp_path, monkeypatch, caplog):
    from dataclasses import replace

    import dmgr.synth.worker as worker

    spec, engine = tiny_engine
    spec = replace(spec, out_dir=tmp_path / "run")
    assert worker.long_shard_warning(replace(spec, samples_per_shard=1000), "x.tar", 0.01) is None
    warning = worker.long_shard_warning(replace(spec, samples_per_shard=1000), "x.tar", 6.0)
    assert "samples_per_shard=1000" in warning and "samples_per_shard=100 " in warning
    monkeypatch.setattr(worker, "LONG_SHARD_SECONDS", 0.0)  # any shard is long: the run must say so
    with caplog.at_level(logging.WARNING, logger="dmgr"):
        worker.run_worker(spec, engine, 0, 1)
    warned = [r.getMessage() for r in caplog.records if "a preemption or crash loses" in r.getMessage()]
    assert len(warned) == 1 and "samples_per_shard=2" in warned[0], warned
