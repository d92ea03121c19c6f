"""Shard names on disk and the check that a shard is complete."""

from __future__ import annotations

import tarfile
from pathlib import Path

REQUIRED_MEMBERS = ("png", "mask.png", "json")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_path(out_dir: Path, prefix: str, index: int) -> Path:
    return Path(out_dir) / "shards" / shard_name(prefix, index)


def sample_key(seed: int) -> str:
    return f"{seed:08d}"


def verify_shard(path: Path, seeds: list[int], members: tuple[str, ...] = REQUIRED_MEMBERS) -> str | None:
    """None when the tar reads to the end and holds exactly `seeds` with every member; else the reason."""
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
            for member in tar.getmembers():
                if member.isfile():
                    tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"unreadable ({exc})"
    expected = {f"{sample_key(s)}.{m}" for s in seeds for m in members}
    missing = expected - set(names)
    if missing:
        return f"{len(missing)} members missing, e.g. {sorted(missing)[0]}"
    if len(names) != len(set(names)):
        return "duplicate members"
    return None
