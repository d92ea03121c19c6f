"""torch.distributed set-up: one process per accelerator (NCCL) or per CPU worker (gloo)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # workers on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(setting: str, local_rank: int) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return torch.device(setting)


def init_workers(device_setting: str) -> WorkerContext:
    """Join the torchrun process group when launched by torchrun; a single worker otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return WorkerContext(rank, world_size, local_rank, device, local_world_size)


IDLE_SAMPLE_SECONDS = 0.5
IDLE_THRESHOLD = 0.7  # a CPU idle at least this fraction of the sample counts as free


def cpu_times(stat: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """{cpu number: (idle ticks, all ticks)} since boot, from /proc/stat (idle includes iowait)."""
    times = {}
    with open(stat) as lines:
        for line in lines:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
                times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times


def idle_cpus(cpus: set[int], seconds: float = IDLE_SAMPLE_SECONDS, stat: str = "/proc/stat") -> float | None:
    """How many of `cpus` no process used over the next `seconds` (e.g. 1.0: one CPU's worth idle); None
    where /proc/stat cannot be read."""
    try:
        before = cpu_times(stat)
        time.sleep(seconds)
        after = cpu_times(stat)
    except (OSError, ValueError, IndexError):
        return None
    idle = 0.0
    for cpu in cpus & before.keys() & after.keys():
        ticks = after[cpu][1] - before[cpu][1]
        idle += (after[cpu][0] - before[cpu][0]) / ticks if ticks > 0 else 1.0
    return idle


def worker_threads(setting: int | None, local_world_size: int = 1) -> tuple[int, str]:
    """(intra-op threads for this worker, why). The `threads` setting when given, else OMP_NUM_THREADS when
    set (torchrun sets 1 per worker), else this worker's share of the CPUs this process may use
    (SLURM_CPUS_PER_TASK, else its CPU affinity), lowered to the CPUs that are idle at the start. OpenMP
    threads wait for each other at every operation, so one thread on a CPU another process keeps busy slows
    them all (2-core machine, one busy process beside: 2 threads 2.5x slower than 1), while on idle CPUs
    more threads are faster. The shard writer's thread needs no CPU of its own (under 0.05 % of one)."""
    if setting is not None:
        return setting, "threads setting"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    given = os.sched_getaffinity(0)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus, source = int(slurm), "SLURM_CPUS_PER_TASK"
    else:
        cpus, source = len(given), "CPU affinity"
    workers = max(1, local_world_size)
    share = max(1, cpus // workers)
    why = f"{cpus} CPUs from {source}, {workers} worker(s)"
    idle = idle_cpus(given)
    if idle is None:
        return share, why
    free = int(idle + 1 - IDLE_THRESHOLD)
    return max(1, min(share, free)), f"{why}, {idle:.1f} of them idle at the start"


class WorkerLost(RuntimeError):
    """Another worker of the process group stopped (its own error says why)."""


LOST = "another worker stopped (its error, above, says what to fix); rerun the same command when fixed"


def barrier(ctx: WorkerContext) -> None:
    if ctx.distributed:
        try:
            dist.barrier()
        except RuntimeError:  # gloo / NCCL: a peer closed the connection
            raise WorkerLost(LOST) from None


def gather(ctx: WorkerContext, value: Any) -> list[Any]:
    if not ctx.distributed:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(values, value)
    except RuntimeError:
        raise WorkerLost(LOST) from None
    return values


def shutdown(ctx: WorkerContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
