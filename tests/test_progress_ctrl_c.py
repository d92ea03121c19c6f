"""Ctrl-C (SIGINT) of a command-line job: one line on stderr, exit status 130, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dmgr.cli import INTERRUPTED, stop_on_interrupt
from tests.synth_support import ROOT, TINY

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out


def interrupt_when(cmd: list[str], ready: Callable[[], bool]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DMGR_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    # A shell without job control starts background commands with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: the job gets the disposition a terminal gives it, whatever ran the tests.
    job = subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert job.poll() is None, job.stderr.read()
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.1)
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return subprocess.CompletedProcess(cmd, job.returncode, "", stderr)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == INTERRUPTED and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def test_the_decorator_turns_keyboard_interrupt_into_one_line(capsys):
    @stop_on_interrupt("dmgr-x", "rerun to resume")
    def main(value: int) -> int:
        if value:
            raise KeyboardInterrupt
        return 7

    assert main(0) == 7
    with pytest.raises(SystemExit) as stop:
        main(1)
    assert stop.value.code == 130
    assert capsys.readouterr().err == "dmgr-x: interrupted (Ctrl-C); rerun to resume\n"


def test_ctrl_c_of_the_synthesis_job_abandons_the_shard_in_one_line(tmp_path):
    out = tmp_path / "run"
    shards = out / "shards"
    result = interrupt_when(["dmgr.synth", *TINY, "seeds=0-99", "samples_per_shard=1", "batch_size=1",
                             f"out_dir={out}"], lambda: any(shards.glob("*.tar")))
    line = one_line(result)
    assert line.startswith("dmgr-synth: interrupted (Ctrl-C)") and "rerun the same command" in line
    assert not list(shards.glob("*.tmp-*"))


def test_ctrl_c_of_a_data_command_is_one_line(tmp_path: Path):
    out = tmp_path / "data"
    result = interrupt_when(["dmgr.data.export", "--out", str(out), "--size", "32", "--boards", "100000"],
                            lambda: any((out / "global").glob("*.png")))
    assert one_line(result) == "python -m dmgr.data.export: interrupted (Ctrl-C)"
