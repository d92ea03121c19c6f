"""torch.distributed set-up: one process per accelerator (NCCL) or per CPU worker (gloo)."""

from __future__ import annotations

import os
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


def worker_threads(setting: int | None, local_world_size: int = 1) -> tuple[int, str]:
    """(intra-op threads for this worker, why). The `threads` setting when given, else OMP_NUM_THREADS when
    set (torchrun sets 1 per worker), else the CPUs this process may use (SLURM_CPUS_PER_TASK, else its
    CPU affinity) shared among the node's workers, less one per worker for its shard-writer thread: more
    threads than free cores thrash, and on a shared 2-core machine one thread is 4x faster than two."""
    if setting is not None:
        return setting, "threads setting"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus, source = int(slurm), "SLURM_CPUS_PER_TASK"
    else:
        cpus, source = len(os.sched_getaffinity(0)), "CPU affinity"
    workers = max(1, local_world_size)
    threads = max(1, (cpus - workers) // workers)
    return threads, f"{cpus} CPUs from {source}, {workers} worker(s), one CPU each kept for the shard writer"


def barrier(ctx: WorkerContext) -> None:
    if ctx.distributed:
        dist.barrier()


def gather(ctx: WorkerContext, value: Any) -> list[Any]:
    if not ctx.distributed:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def shutdown(ctx: WorkerContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
