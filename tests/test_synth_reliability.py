"""Reliability: bad inputs refused in one line before anything is written, and a fault matrix in which
every damaged, interrupted or contended run ends as the uninterrupted run: every seed exactly once,
digests matching, the same bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from synth_support import ROOT, TINY, manifest, raw_members, read_samples, run_synth, shard_files

from dmgr.digest import sha256_file
from dmgr.models import build_unet, save_checkpoint
from dmgr.shards.locks import acquire, release
from dmgr.synth.config import ConfigError
from dmgr.synth.engine import load_engine, make_attempts, make_settings
from dmgr.synth.plan import plan_sample

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

SMALL = [*TINY, "seeds=0-2", "samples_per_shard=1", "batch_size=1"]  # 3 shards of one sample
ENV = {**os.environ, "DMGR_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def shard_manifest(out: Path) -> list[dict]:
    return manifest(out)["shards"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "run"
    run_synth([*SMALL, f"out_dir={out}"])
    return out


def assert_same_dataset(out: Path, baseline: Path) -> None:
    assert raw_members(out) == raw_members(baseline)
    assert shard_manifest(out) == shard_manifest(baseline)
    for entry in shard_manifest(out):
        assert sha256_file(out / "shards" / entry["name"]) == entry["sha256"]
    assert not list((out / "shards").glob("*.tmp-*"))
    assert not list((out / "shards").glob("*.damaged"))  # kept only until its redo is accepted


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def copy_of(baseline: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


# -- bad inputs: one line, exit 2, nothing on disk ------------------------------------------------------


def tiny_checkpoints(tmp_path: Path, classes: list[str] | None = None) -> tuple[Path, Path]:
    from omegaconf import OmegaConf

    model = OmegaConf.load(ROOT / "conf" / "model" / "tiny_random.yaml")
    g = save_checkpoint(build_unet(OmegaConf.to_container(model["global"].config)), tmp_path / "g.safetensors")
    meta = {"dmgr.classes": json.dumps(classes)} if classes else None
    local = build_unet(OmegaConf.to_container(model.local.config))
    return g, save_checkpoint(local, tmp_path / "l.safetensors", meta)


def malicious_pt(tmp_path: Path) -> Path:
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "payload": Path("/etc/passwd")}, path)  # pickles a Python object
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("device=cuda", "device='cuda': no CUDA device"),
        ("device=cuda:7", "device='cuda:7': no CUDA device"),
        ("schedule.respacing=abc", "schedule.respacing='abc': not a step count"),
        ("+seedz=1-3", "seedz='1-3': unknown setting"),
        ("+mask.colour=red", "mask.colour='red': unknown setting"),
        ("shard_prefix=../../x", "shard_prefix='../../x': a plain file-name prefix"),
        ("evil-pt", "is not a plain state dict"),
        ("pt-that-does-not-fit", "does not fit the model config"),
        ("wrong-classes", "dataset.classes=['scratch', 'dent']: the local checkpoint was trained on"),
        ("read-only", "cannot write there"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, expected, tmp_path):
    out = tmp_path / "parent" / "run"
    overrides = [*SMALL, f"out_dir={out}"]
    if case == "evil-pt":
        evil = malicious_pt(tmp_path)
        overrides += ["model.random_init=false", f"model.global.checkpoint={evil}", f"model.local.checkpoint={evil}"]
    elif case == "pt-that-does-not-fit":
        from omegaconf import OmegaConf

        tiny = OmegaConf.load(ROOT / "conf" / "model" / "tiny_random.yaml")
        wrong = build_unet({**OmegaConf.to_container(tiny["global"].config), "num_channels": 64})
        torch.save(wrong.state_dict(), tmp_path / "g.pt")
        torch.save(build_unet(OmegaConf.to_container(tiny.local.config)).state_dict(), tmp_path / "l.pt")
        overrides += ["model.random_init=false", f"model.global.checkpoint={tmp_path / 'g.pt'}",
                      f"model.local.checkpoint={tmp_path / 'l.pt'}"]
    elif case == "wrong-classes":
        g, loc = tiny_checkpoints(tmp_path, ["missinghole", "mousebite", "opencircuit", "short", "spur", "x"])
        overrides = [o for o in overrides if o != "model=tiny_random"] + [
            "model=custom", f"model.global.checkpoint={g}", f"model.local.checkpoint={loc}",
            "dataset.classes=[scratch,dent]",
        ]
    elif case == "read-only":
        (tmp_path / "parent").mkdir()
        os.chmod(tmp_path / "parent", 0o555)
        if os.geteuid() == 0:  # root ignores permission bits: a read-only bind mount instead
            subprocess.run(["mount", "--bind", "-o", "ro", tmp_path / "parent", tmp_path / "parent"], check=True)
    else:
        overrides.append(case)
    try:
        result = run_synth(overrides, check=False)
    finally:
        if case == "read-only" and os.geteuid() == 0:
            subprocess.run(["umount", tmp_path / "parent"], check=True)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert line.startswith("dmgr-synth: error: ") and expected in line, line
    assert "weights_only" not in line
    assert not out.exists()


def test_a_pt_checkpoint_is_loaded_before_out_dir_is_claimed(tmp_path):
    """A checkpoint problem found only when the weights load must not leave out_dir claimed."""
    from omegaconf import OmegaConf

    tiny = OmegaConf.load(ROOT / "conf" / "model" / "tiny_random.yaml")
    good_global = build_unet(OmegaConf.to_container(tiny["global"].config)).state_dict()
    torch.save(good_global, tmp_path / "g.pt")
    torch.save({"not": torch.zeros(2)}, tmp_path / "l.pt")
    out = tmp_path / "run"
    base = [*SMALL, "model.random_init=false", f"model.global.checkpoint={tmp_path / 'g.pt'}"]
    result = run_synth([*base, f"model.local.checkpoint={tmp_path / 'l.pt'}", f"out_dir={out}"], check=False)
    assert result.returncode == 2 and "l.pt does not fit" in one_error_line(result)
    assert not out.exists()


def test_identity_follows_checkpoint_contents_not_paths(tmp_path):
    from test_synth_config import spec_of

    g, loc = tiny_checkpoints(tmp_path)
    models = ["model=custom", f"model.global.checkpoint={g}", f"out_dir={tmp_path / 'o'}"]
    first = spec_of([*models, f"model.local.checkpoint={loc}"])
    moved = shutil.copy(loc, tmp_path / "moved.safetensors")
    assert spec_of([*models, f"model.local.checkpoint={moved}"]).identity == first.identity
    retrained = build_unet(first.model.local_net.config)
    with torch.no_grad():
        next(retrained.parameters()).add_(1.0)
    save_checkpoint(retrained, loc)  # retrained into the same path
    assert spec_of([*models, f"model.local.checkpoint={loc}"]).identity != first.identity


def test_class_names_must_match_the_local_checkpoint():
    from test_synth_config import spec_of

    with pytest.raises(ConfigError, match=r"^dataset.classes=\['scratch', 'dent'\].*trained on \['missinghole'"):
        spec_of(["model=demo", "dataset.classes=[scratch,dent]"])


# -- the fault matrix ------------------------------------------------------------------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a member's bytes, not the tar headers' checksums
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["flipped-byte", "zero-bytes", "truncated", "wrong-seeds", "deleted-shard", "changed-manifest", "bad-record",
     "malformed-manifest"],
)
def test_damage_is_redone_to_the_same_bytes(damage, baseline, tmp_path):
    out = copy_of(baseline, tmp_path)
    victim = out / "shards" / "dmgr-000001.tar"
    if damage == "flipped-byte":
        flip_byte(victim)
    elif damage == "zero-bytes":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:5000])
    elif damage == "wrong-seeds":
        shutil.copy(out / "shards" / "dmgr-000002.tar", victim)
    elif damage == "deleted-shard":
        victim.unlink()
    elif damage == "changed-manifest":
        m = manifest(out)
        m["shards"][1]["sha256"] = "0" * 64
        (out / "manifest.json").write_text(json.dumps(m))
    elif damage == "bad-record":
        (out / "records" / "dmgr-000001.tar.json").write_text("{not json")
    elif damage == "malformed-manifest":
        (out / "manifest.json").write_text('{"shards": [{"na')  # cut short by a crash
    result = run_synth([*SMALL, f"out_dir={out}"])
    logs = result.stdout + result.stderr
    if damage == "malformed-manifest":
        assert "manifest.json is unreadable" in logs and "rebuilding it from the shard records" in logs
    if damage in ("changed-manifest", "malformed-manifest"):
        assert "3 shards complete and verified, 0 made" in logs
    elif damage == "deleted-shard":
        assert "2 shards complete and verified, 1 made" in logs
    else:
        assert "dmgr-000001.tar is damaged" in logs
    assert_same_dataset(out, baseline)


def test_a_changed_shard_never_replaces_its_recorded_digest(baseline, tmp_path):
    """The record is what was written; a redo must reproduce it (here: it does, byte for byte)."""
    out = copy_of(baseline, tmp_path)
    record = json.loads((out / "records" / "dmgr-000000.tar.json").read_text())
    flip_byte(out / "shards" / "dmgr-000000.tar")
    run_synth([*SMALL, f"out_dir={out}"])
    assert json.loads((out / "records" / "dmgr-000000.tar.json").read_text()) == record
    assert shard_manifest(out)[0]["sha256"] == record["sha256"]


def test_a_redo_with_other_bytes_is_refused_and_the_record_kept(baseline, tmp_path):
    out = copy_of(baseline, tmp_path)
    record_file = out / "records" / "dmgr-000001.tar.json"
    record = json.loads(record_file.read_text())
    record["sha256"] = "f" * 64  # as if the shard had first been made elsewhere, with other bytes
    record["made_with"] = {**record["made_with"], "batch_size": 4}
    record_file.write_text(json.dumps(record))
    shard = out / "shards" / "dmgr-000001.tar"
    damaged = shard.read_bytes()
    result = run_synth([*SMALL, f"out_dir={out}"], check=False)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "made again with different bytes than its record" in line
    assert "batch_size=4 (here 1)" in line and "threads" not in line.split("differs:")[1].split(";")[0], line
    assert json.loads(record_file.read_text())["sha256"] == "f" * 64
    assert not shard.exists()
    assert (out / "shards" / "dmgr-000001.tar.damaged").read_bytes() == damaged  # not deleted: the redo failed
    assert not list((out / "shards").glob("*.tmp-*"))


def member_offset(shard: Path, name: str) -> tuple[int, int]:
    import tarfile

    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
        return member.offset_data, member.size


def rewrite_shard(shard: Path, change_json=None, mtime: int = 0) -> None:
    """The shard's members written again in order, each json passed through `change_json`."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if change_json and member.name.endswith(".json"):
                data = json.dumps(change_json(json.loads(data))).encode()
            member.size, member.mtime = len(data), mtime
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("case", ["sound", "flipped-png-byte", "other-config", "other-bytes-than-manifest"])
def test_a_shard_without_a_record_is_adopted_only_when_sound(case, baseline, tmp_path):
    """Without records/, a shard is adopted only when every member decodes, every json matches this run's
    config, and its sha256 is the one the manifest already holds; anything else is redone."""
    out = copy_of(baseline, tmp_path)
    shutil.rmtree(out / "records")
    victim = out / "shards" / "dmgr-000001.tar"
    if case != "other-bytes-than-manifest":
        (out / "manifest.json").unlink()  # nothing to compare digests with: decoding must tell
    if case == "flipped-png-byte":
        offset, size = member_offset(victim, "00000001.png")
        data = bytearray(victim.read_bytes())
        data[offset + size // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif case == "other-config":
        rewrite_shard(victim, lambda meta: {**meta, "schedule": {**meta["schedule"], "T_e": 2}})
    elif case == "other-bytes-than-manifest":
        rewrite_shard(victim, mtime=1)  # every member decodes and matches: only the manifest's digest can tell
    result = run_synth([*SMALL, f"out_dir={out}"])
    logs = result.stdout + result.stderr
    if case == "sound":
        assert "3 shards complete and verified, 0 made" in logs and "adopted" in logs
    else:
        assert "shard dmgr-000001.tar is damaged" in logs and "2 shards complete and verified, 1 made" in logs
    assert_same_dataset(out, baseline)
    for entry in shard_manifest(baseline):
        assert json.loads((out / "records" / f"{entry['name']}.json").read_text())["sha256"] == entry["sha256"]


def test_an_unreadable_run_json_is_one_line_naming_it_and_the_fix(baseline, tmp_path):
    out = copy_of(baseline, tmp_path)
    (out / "run.json").write_bytes(b"")  # a crash while it was written, on a file system without fsync
    result = run_synth([*SMALL, f"out_dir={out}"], check=False)
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"{out / 'run.json'} is unreadable" in line and "delete run.json and rerun" in line, line
    (out / "run.json").unlink()
    run_synth([*SMALL, f"out_dir={out}"])
    assert_same_dataset(out, baseline)


def start(overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "dmgr.synth"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "dmgr.synth"]
    return subprocess.Popen([*launcher, *overrides], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_two_jobs_at_once_the_second_is_refused(baseline, tmp_path):
    out = tmp_path / "run"
    overrides = [*SMALL, f"out_dir={out}"]
    first = start(overrides)
    wait_for(lambda: (out / "locks" / "worker-0000-of-0001.lock").exists())
    os.kill(first.pid, signal.SIGSTOP)  # held still, so it cannot finish before the second job starts on a busy CPU
    try:
        second = run_synth(overrides, check=False)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    line = one_error_line(second)
    assert f"worker 0 of 1 in out_dir={out} is held by pid {first.pid}" in line, line
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert_same_dataset(out, baseline)


def test_a_shard_held_by_another_job_is_neither_touched_nor_deleted(baseline, tmp_path):
    out = copy_of(baseline, tmp_path)
    (out / "shards" / "dmgr-000001.tar").unlink()
    theirs = out / "shards" / "dmgr-000001.tar.tmp-99999"
    theirs.write_bytes(b"another live job is writing this")
    lock = acquire(out / "locks" / "dmgr-000001.tar.lock", "test")
    try:
        result = run_synth([*SMALL, f"out_dir={out}"], check=False)
    finally:
        release(lock)
    assert result.returncode == 2
    assert f"shard dmgr-000001.tar is held by pid {os.getpid()}" in one_error_line(result)
    assert theirs.read_bytes() == b"another live job is writing this"
    theirs.unlink()
    run_synth([*SMALL, f"out_dir={out}"])
    assert_same_dataset(out, baseline)


def test_sigterm_abandons_the_shard_exits_non_zero_and_the_rerun_completes(baseline, tmp_path):
    out = tmp_path / "run"
    overrides = [*SMALL, f"out_dir={out}"]
    job = start(overrides)
    wait_for(lambda: len(shard_files(out)) >= 1)  # a point the test controls: one shard is final
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in one_error_line(subprocess.CompletedProcess([], 0, "", job.stderr.read()))
    assert 1 <= len(shard_files(out)) < 3 and not list((out / "shards").glob("*.tmp-*"))
    run_synth(overrides)
    assert_same_dataset(out, baseline)


@pytest.mark.parametrize("victim", ["worker", "launcher"])
def test_kill_9_in_a_torchrun_job_then_rerun_gives_every_seed_once(victim, baseline, tmp_path):
    out = tmp_path / "run"
    overrides = [*SMALL, f"out_dir={out}"]
    job = start(overrides, nproc=2)
    wait_for(lambda: len(shard_files(out)) >= 1)
    workers = [pid for pid in jobs_on(out) if pid != job.pid]
    assert len(workers) == 2
    if victim == "launcher":  # held still, so that they are certainly alive when the rerun starts
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
    os.kill(workers[0] if victim == "worker" else job.pid, signal.SIGKILL)
    job.wait(timeout=120)
    if victim == "launcher":  # the orphaned workers still hold their shards: a rerun now is refused
        assert sorted(jobs_on(out)) == sorted(workers)
        refused = run_synth(overrides, check=False)
        assert refused.returncode == 2 and "is held by pid" in one_error_line(refused)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not jobs_on(out), timeout=120)
    run_synth(overrides)
    assert_same_dataset(out, baseline)


def jobs_on(out: Path) -> list[int]:
    """Live processes of the synthesis job writing to `out` (launcher and workers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "dmgr.synth" in cmdline and f"out_dir={out}\0" in cmdline + "\0" and state != "Z":
            found.append(int(pid))
    return found


def test_full_disk_fails_cleanly_and_the_rerun_completes(baseline, tmp_path):
    if os.geteuid() != 0:
        message = "a small tmpfs needs root to mount"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    disk = tmp_path / "disk"
    disk.mkdir()
    one_shard = (baseline / "shards" / "dmgr-000000.tar").stat().st_size
    size = one_shard + 48 * 1024  # room for one shard and the small files, not for two shards
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk], check=True)
    try:
        out = disk / "run"
        overrides = [*SMALL, f"out_dir={out}"]
        result = run_synth(overrides, check=False)
        assert result.returncode == 1
        line = one_error_line(result)
        assert "No space left on device" in line, line
        assert not list((out / "shards").glob("*.tmp-*"))
        subprocess.run(["mount", "-o", "remount,size=16m", disk], check=True)
        run_synth(overrides)
        assert_same_dataset(out, baseline)
    finally:
        subprocess.run(["umount", disk], check=True)


def test_a_nonfinite_sample_is_retried_from_a_derived_seed_or_stops_the_run(tmp_path, monkeypatch):
    from test_synth_config import spec_of

    import dmgr.synth.worker as worker
    from dmgr.synth.policy import NonFiniteSample

    spec = spec_of([*(o for o in SMALL if not o.startswith("seeds=")), "seeds=0-1", f"out_dir={tmp_path / 'run'}"])
    engine = load_engine(spec, torch.device("cpu"))
    calls = []

    def flaky(engine, how, plans):  # seed 1's first attempt holds NaN
        attempts = make_attempts(engine, how, plans)
        for attempt in attempts:
            calls.append((attempt.plan.seed, attempt.plan.attempt))
            attempt.finite = attempt.finite and (attempt.plan.seed, attempt.plan.attempt) != (1, 0)
        return attempts

    monkeypatch.setattr(worker, "make_attempts", flaky)
    worker.run_worker(spec, engine, 0, 1)
    assert (1, 1) in calls
    record = json.loads((spec.out_dir / "records" / "dmgr-000001.tar.json").read_text())
    assert record["metrics"]["nonfinite_retries"] == 1
    samples = read_samples(spec.out_dir)
    assert samples["00000001"]["json"]["attempt"] == 1 and "attempt" not in samples["00000000"]["json"]
    again = make_attempts(engine, make_settings(spec), [replace(plan_sample(1, spec.dataset), attempt=1)])[0]
    assert np.array_equal(again.image, np.asarray(samples["00000001"]["png"]))  # deterministic

    def broken(engine, how, plans):
        return [replace(a, finite=False) for a in make_attempts(engine, how, plans)]

    monkeypatch.setattr(worker, "make_attempts", broken)
    stop = replace(spec, out_dir=tmp_path / "stop", nonfinite=replace(spec.nonfinite, action="stop"))
    with pytest.raises(NonFiniteSample, match="^seed 0: the image holds NaN/Inf after 1 attempt"):
        worker.run_worker(stop, engine, 0, 1)
    assert not (stop.out_dir / "shards" / "dmgr-000000.tar").exists()
    assert not list((stop.out_dir / "shards").glob("*.tmp-*"))
    acquire(stop.out_dir / "locks" / "dmgr-000000.tar.lock", "test")  # the failed shard's lock was released


def test_a_read_only_out_dir_is_refused_then_the_rerun_completes(baseline, tmp_path):
    out = copy_of(baseline, tmp_path)
    (out / "shards" / "dmgr-000001.tar").unlink()
    if os.geteuid() == 0:  # root ignores permission bits: a read-only bind mount instead
        subprocess.run(["mount", "--bind", "-o", "ro", out, out], check=True)
    else:
        for path in (out, *out.rglob("*")):
            if path.is_dir():
                os.chmod(path, 0o555)
    try:
        result = run_synth([*SMALL, f"out_dir={out}"], check=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", out], check=True)
        else:
            for path in (out, *out.rglob("*")):
                if path.is_dir():
                    os.chmod(path, 0o755)
    assert result.returncode == 2 and "cannot write there" in one_error_line(result)
    assert not (out / "shards" / "dmgr-000001.tar").exists()
    run_synth([*SMALL, f"out_dir={out}"])
    assert_same_dataset(out, baseline)
