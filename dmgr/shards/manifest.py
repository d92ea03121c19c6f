"""The run manifest: every shard with its seeds, sample count and sha256, plus run-level facts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dmgr.digest import sha256_file


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_manifest(out_dir: Path, shards: list[tuple[int, Path, list[int]]], run: dict[str, Any]) -> Path:
    """shards: (index, path, seeds) for every shard of the run, all complete."""
    entries = [
        {
            "index": index,
            "name": path.name,
            "samples": len(seeds),
            "first_seed": seeds[0],
            "last_seed": seeds[-1],
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        for index, path, seeds in shards
    ]
    manifest = {"shards": entries, "num_shards": len(entries), "num_samples": sum(e["samples"] for e in entries), **run}
    path = Path(out_dir) / "manifest.json"
    write_json_atomic(path, manifest)
    return path
