"""Progress in logs: tqdm on a terminal, plain lines at most every LOG_EVERY_SECONDS elsewhere."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

import dmgr.progress as progress_module
from dmgr.progress import LogProgress, progress_bar

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_terminal_gets_a_tqdm_bar():
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        bar = progress_bar(range(3), desc="walk", file=terminal)
        assert isinstance(bar, tqdm)
        assert list(bar) == [0, 1, 2]
    written = os.read(master, 4096).decode()
    os.close(master)
    assert "\r" in written and "walk" in written


def test_a_file_gets_whole_lines_and_one_at_the_end(tmp_path):
    log = tmp_path / "log"
    with log.open("w") as stream:
        bar = progress_bar(range(1500), desc="classifier", file=stream)
        assert isinstance(bar, LogProgress)
        assert sum(1 for _ in bar) == 1500
    text = log.read_bytes().decode()
    assert "\r" not in text
    assert text.splitlines() == [text.strip()]
    assert text.startswith("classifier: 1500/1500 it done, 100%")


def test_a_long_run_writes_a_line_per_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module.time, "monotonic", FakeClock(step=1.0))
    log = tmp_path / "log"
    with log.open("w") as stream:
        bar = progress_bar(total=100, desc="train", unit="step", file=stream, every=30)
        for _ in range(100):
            bar.update(1)
            bar.set_postfix(loss="0.1234")
        bar.close()
    lines = log.read_bytes().decode().splitlines()
    assert len(lines) == 4  # ~100 clock seconds: lines near 30, 60, 90 and the closing one
    assert all(line.startswith("train: ") and "loss=0.1234" in line for line in lines)
    assert "left" in lines[0] and lines[-1].startswith("train: 100/100 step done")


def test_a_short_transient_bar_writes_nothing_to_a_file(tmp_path):
    log = tmp_path / "log"
    with log.open("w") as stream:
        for _ in progress_bar(range(50), desc="ddim", leave=False, file=stream):
            pass
    assert log.read_bytes().decode() == ""


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_cli_redirected_to_a_file_logs_few_lines(tmp_path, stream):
    """`python -m dmgr.data.export > log 2>&1`: a few lines, not one carriage-return update per image."""
    log = tmp_path / "log"
    with log.open("w") as handle:
        outputs = {"stdout": handle, "stderr": subprocess.STDOUT} if stream == "stdout" else \
            {"stdout": subprocess.DEVNULL, "stderr": handle}
        subprocess.run([sys.executable, "-m", "dmgr.data.export", "--out", str(tmp_path / "out"), "--size", "32",
                        "--boards", "30", "--patches-per-class", "2", "--test", "3"],
                       cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **outputs)
    text = log.read_bytes().decode()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines if " done, " in line] == ["global", "local", "test"]
    assert len(lines) <= 4


def test_a_bar_stopped_early_says_so_only_when_it_had_written(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module.time, "monotonic", FakeClock(step=10.0))
    log = tmp_path / "log"
    with log.open("w") as stream:
        quiet = progress_bar(total=100, desc="quiet", file=stream, every=1000)
        quiet.update(5)
        quiet.close()
        talking = progress_bar(total=100, desc="talking", file=stream, every=30)
        for _ in range(5):
            talking.update(1)
        talking.close()
    lines = log.read_bytes().decode().splitlines()
    assert not any(line.startswith("quiet") for line in lines)
    assert lines[-1].startswith("talking: 5/100 it stopped, 5%")
