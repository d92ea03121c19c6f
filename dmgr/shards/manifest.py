"""The run manifest: every shard with its seeds, sample count and sha256 (from the shard records), plus
run-level facts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_manifest(out_dir: Path, records: list[dict[str, Any]], run: dict[str, Any]) -> Path:
    """records: the per-shard records (records.py) of every shard of the run, in shard order."""
    keys = ("index", "name", "samples", "first_seed", "last_seed", "bytes", "sha256")
    entries = [{key: record[key] for key in keys} for record in records]
    manifest = {"shards": entries, "num_shards": len(entries), "num_samples": sum(e["samples"] for e in entries), **run}
    path = Path(out_dir) / "manifest.json"
    write_json_atomic(path, manifest)
    return path
