"""A one-node Slurm cluster on loopback for the tests: munged, slurmctld and slurmd.

Needs root and Debian's slurm-wlm and munge (.ci/run installs them). `start()` returns a Cluster or
raises ClusterError carrying the daemon logs; `stop()` shuts everything down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


class ClusterError(RuntimeError):
    pass


def missing_requirements() -> str | None:
    """Why this machine cannot start a test cluster, or None when it can."""
    if os.geteuid() != 0:
        return "not running as root (slurmd and munged need root here)"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"missing {', '.join(absent)}: apt-get install slurm-wlm munge"
    return None


@dataclass
class Cluster:
    root: Path
    conf: Path
    node: str
    processes: list

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            text = path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"
            parts.append(f"--- {name} ---\n{text}")
        return "\n".join(parts)

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {result.stderr}\n{self.logs()}")
        return result


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _node_line(node: str) -> str:
    """The node's real CPUs and memory as slurmd sees them, on loopback."""
    probe = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(part.split("=", 1) for part in probe.split("\n")[0].split() if "=" in part)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    spec = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    return f"NodeName={node} NodeAddr=127.0.0.1 {spec} State=UNKNOWN"


def start(root: Path, port: int = 16817) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(exist_ok=True)
    node = "dmgrnode"
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=dmgrtest",
                "SlurmctldHost=localhost(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={port}",
                f"SlurmdPort={port + 1}",
                "AuthType=auth/munge",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "SchedulerType=sched/backfill",
                "MpiDefault=none",
                "SwitchType=switch/none",
                "ReturnToService=2",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=30",
                "MaxArraySize=1000",
                _node_line(node),
                f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
                "",
            ]
        )
    )
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket = root / "munge" / "munge.socket.2"
    cluster = Cluster(root, conf, node, [])
    munge_env = {**os.environ}
    try:
        subprocess.run(
            [_sbin("munged"), "--force", f"--key-file={key}", f"--socket={socket}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
             f"--seed-file={root / 'munge' / 'seed'}"],
            check=True, capture_output=True, text=True, env=munge_env, timeout=30,
        )
        # Slurm's auth/munge plugin talks to the default socket path; point it at ours.
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        default_socket = Path("/run/munge/munge.socket.2")
        if default_socket.is_symlink() or default_socket.exists():
            default_socket.unlink()
        default_socket.symlink_to(socket)
        for daemon, args in (("slurmctld", ["-c", "-i"]), ("slurmd", ["-N", node])):
            subprocess.run([_sbin(daemon), "-f", str(conf), *args], check=True, capture_output=True, text=True,
                           env=cluster.env, timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = cluster.run("sinfo", "-h", "-n", node, "-o", "%T", check=False).stdout.strip()
            if state.startswith(("idle", "mixed", "allocated")):
                return cluster
            time.sleep(0.5)
        raise ClusterError(f"node {node} did not come up (state {state!r})")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ClusterError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        stop(cluster)
        raise ClusterError(f"cannot start the test Slurm cluster: {exc}\n{detail}\n{cluster.logs()}") from exc


def stop(cluster: Cluster) -> None:
    subprocess.run(["scancel", "--full", "-u", "root"], env=cluster.env, capture_output=True, timeout=30)
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
        path = cluster.root / pid_file
        if path.exists():
            try:
                os.kill(int(path.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
    time.sleep(1)
