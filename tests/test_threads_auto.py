"""threads=auto: the worker's share of the CPUs it was given, lowered to the CPUs idle at the start."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import dmgr.distributed as distributed
from dmgr.distributed import cpu_times, idle_cpus, worker_threads


@pytest.fixture
def cpus(monkeypatch):
    """Set the CPUs given (affinity) and the idle CPUs worker_threads sees."""
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def given(count: int, idle: float | None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)))
        monkeypatch.setattr(distributed, "idle_cpus", lambda cpus: idle)

    return given


@pytest.mark.parametrize(("count", "idle", "workers", "threads"), [
    (2, 2.0, 1, 2),  # an idle 2-core machine: both cores (the shard writer needs no CPU of its own)
    (2, 1.8, 1, 2),  # a little background activity does not cost a core
    (2, 1.0, 1, 1),  # one busy process beside: one thread, not two that wait on each other
    (2, 0.1, 1, 1),  # everything busy: still one thread
    (6, 6.0, 4, 1),  # four torchrun workers on six CPUs: one thread each
    (16, 15.5, 2, 8),  # two workers on sixteen CPUs: half each
    (16, 3.0, 2, 3),
    (6, None, 1, 6),  # no /proc/stat: the CPUs given
])
def test_auto_takes_the_share_of_the_idle_cpus(cpus, count, idle, workers, threads):
    cpus(count, idle)
    got, why = worker_threads(None, workers)
    assert got == threads
    assert f"{count} CPUs from CPU affinity, {workers} worker(s)" in why
    assert (idle is None) == ("idle" not in why)


def test_slurm_omp_and_the_setting_come_first(cpus, monkeypatch):
    cpus(32, 32.0)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "9")
    assert worker_threads(None, 2)[0] == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert worker_threads(None, 2) == (2, "OMP_NUM_THREADS")
    assert worker_threads(3, 2) == (3, "threads setting")


def test_idle_cpus_counts_the_idle_ticks_of_the_given_cpus(monkeypatch):
    samples = iter([{0: (100, 1000), 1: (500, 1000), 2: (0, 1000)},
                    {0: (200, 1100), 1: (550, 1100), 2: (100, 1100)}])
    monkeypatch.setattr(distributed, "cpu_times", lambda stat: next(samples))
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: None)
    assert idle_cpus({0, 1}) == pytest.approx(1.5)  # CPU 2 is not ours


def test_cpu_times_reads_each_cpu_line(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 10 1 5 80 4 0 0 0 0 0\ncpu1 1 1 1 1 1 1 1 1 0 0\nintr 5 0\n")
    assert cpu_times(str(stat)) == {0: (84, 100), 1: (2, 8)}
    assert idle_cpus({0}, 0, str(tmp_path / "missing")) is None


def test_a_cpu_kept_busy_is_not_idle():
    cpu = min(os.sched_getaffinity(0))
    spin = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)
        assert idle_cpus({cpu}, 0.5) < 0.3
    finally:
        spinner.kill()
        spinner.wait()
