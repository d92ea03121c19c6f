"""The Slurm array job and the submitit sweep launcher against a real one-node Slurm cluster.

CI (`.ci/run`, as root) installs slurm-wlm and munge; the cluster starts on loopback for this module
and is shut down after it. Without root or the packages, outside CI, the module is skipped with the
reason; under CI that is a failure, and so is a cluster that does not start (with the daemon logs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import ClusterError, missing_requirements, start, stop
from synth_support import ROOT, TINY, manifest, raw_members, run_synth

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

OVERRIDES = [*TINY, "seeds=0-3", "samples_per_shard=1", "batch_size=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests but cannot: {reason}")
        pytest.skip(f"Slurm tests need root with slurm-wlm and munge installed ({reason}); CI runs them")
    try:
        cluster = start(tmp_path_factory.mktemp("slurm"))
    except ClusterError as exc:
        pytest.fail(str(exc))
    yield cluster
    stop(cluster)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_synth([*OVERRIDES, f"out_dir={out}"])
    return out


def test_array_job_gives_the_single_process_shards(cluster, single_run, tmp_path):
    out = tmp_path / "array"
    logs = tmp_path / "logs"
    logs.mkdir()
    submit = [
        "sbatch", "--array=0-1", "--wait", "--gres=none", "--cpus-per-task=1", f"--output={logs}/task-%A_%a.log",
        f"--export=ALL,DMGR_PYTHON={sys.executable},DMGR_NO_PROGRESS=1,OMP_NUM_THREADS=1",
        f"--chdir={ROOT}", str(ROOT / "jobs" / "slurm_array.sbatch"), *OVERRIDES, f"out_dir={out}",
    ]
    result = cluster.run(*submit, timeout=900, check=False)
    task_logs = sorted(logs.glob("task-*.log"))
    text = "\n".join(p.read_text() for p in task_logs)
    assert result.returncode == 0, f"{result.stderr}\n{text}\n{cluster.logs()}"
    assert len(task_logs) == 2, "one log per array task"
    assert "task 0/2" in text and "task 1/2" in text
    assert raw_members(out) == raw_members(single_run)
    assert manifest(out)["num_samples"] == 4

    # Resubmitting is safe: every shard is found complete and nothing is redone.
    again = cluster.run(*submit, timeout=900, check=False)
    assert again.returncode == 0, again.stderr
    resubmitted = "\n".join(p.read_text() for p in sorted(logs.glob("task-*.log")) if p not in task_logs)
    assert resubmitted.count("complete and verified, 0 made") == 2, resubmitted
    assert raw_members(out) == raw_members(single_run)


def test_submitit_launcher_runs_a_sweep_on_the_cluster(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "dmgr.synth", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
        "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null",
        "hydra.launcher.timeout_min=20", *TINY, "seeds=0-1", "samples_per_shard=2",
        "schedule.T_e=2,3", "out_dir=${hydra:runtime.output_dir}/run",
    ]
    env = {**cluster.env, "DMGR_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{cluster.logs()}"
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert [r["status"] for r in results] == ["done", "done"], results
    for r in results:
        assert manifest(Path(r["out_dir"]))["num_samples"] == 2
        assert Path(r["out_dir"]).parent.parent == sweep
    assert len(list((sweep / ".submitit").glob("*"))) >= 2, "the points ran as Slurm jobs"
    report = subprocess.run([sys.executable, "-m", "dmgr.sweep", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert (sweep / "report.csv").read_text().count("\n") == 3
