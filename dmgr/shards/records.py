"""Per-shard records: written when a shard completes, before it becomes visible under its final name.

`out_dir/records/<shard>.json` holds the shard's sha256, size, seeds, members and the sums of its sample
metrics. Resume checks a shard against its record (a changed byte means the shard is redone), the manifest
is built from the records without re-reading any tar, and a record is never replaced by a different one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmgr.digest import sha256_file
from dmgr.shards.atomic import write_json_atomic
from dmgr.shards.manifest import manifest_entry


def record_path(shard: Path) -> Path:
    return shard.parent.parent / "records" / f"{shard.name}.json"


def read_record(shard: Path) -> dict[str, Any] | None:
    path = record_path(shard)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: matches no shard, so the shard is redone and the record rewritten


def write_record(shard: Path, record: dict[str, Any]) -> None:
    path = record_path(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def expected_digest(shard: Path) -> str | None:
    """The sha256 the shard must have: its record's, else the manifest's (a digest the run already published
    is never replaced), else None."""
    record = read_record(shard) or manifest_entry(shard) or {}
    return record.get("sha256")


def check_shard(shard: Path, record: dict[str, Any]) -> str | None:
    """None when the shard's bytes are the ones its record describes; else what differs."""
    try:
        size = shard.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != record.get("bytes"):
        return f"{size} bytes, its record says {record.get('bytes')}"
    if sha256_file(shard) != record.get("sha256"):
        return "sha256 differs from its record"
    return None
