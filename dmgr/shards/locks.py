"""Advisory `fcntl` locks on files under out_dir/locks/: one live holder per worker slot and per shard.

The kernel drops a lock when its holder dies (kill -9 included), so a lock never outlives its job. The
lock file holds a line naming the holder (pid, host, start time) for the refusal message. Lock files are
never deleted: deleting one while a job waits on it would let two jobs hold "the same" lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class LockHeld(RuntimeError):
    """Another live process holds the lock."""


def holder_line() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def acquire(path: Path, what: str) -> int:
    """Take the lock at `path` without waiting; returns its file descriptor. Raises LockHeld naming the
    holder when another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise LockHeld(f"{what} is held by {holder} ({path}): wait for that job or stop it") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_line().encode(), 0)
    except OSError:
        release(fd)
        raise
    return fd


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
