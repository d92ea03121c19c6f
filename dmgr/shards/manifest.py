"""The run manifest: every shard with its seeds, sample count and sha256 (from the shard records), plus
run-level facts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmgr.shards.atomic import write_json_atomic

__all__ = ["manifest_entry", "read_manifest", "write_json_atomic", "write_manifest"]


def read_manifest(out_dir: Path) -> tuple[dict[str, Any], str | None]:
    """(the manifest, None), ({}, None) when there is none, or ({}, why) when it is unreadable."""
    path = Path(out_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:
        return {}, f"{type(exc).__name__}: {exc}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
        return {}, "not a dmgr manifest"
    return manifest, None


def manifest_entry(shard: Path) -> dict[str, Any] | None:
    """The manifest's entry for a shard (out_dir/shards/<name>), or None when the manifest is missing,
    unreadable or does not list it."""
    manifest, _ = read_manifest(Path(shard).parent.parent)
    for entry in manifest.get("shards", []):
        if isinstance(entry, dict) and entry.get("name") == Path(shard).name:
            return entry
    return None


def write_manifest(out_dir: Path, records: list[dict[str, Any]], run: dict[str, Any]) -> Path:
    """records: the per-shard records (records.py) of every shard of the run, in shard order."""
    keys = ("index", "name", "samples", "first_seed", "last_seed", "bytes", "sha256")
    entries = [{key: record[key] for key in keys} for record in records]
    manifest = {"shards": entries, "num_shards": len(entries), "num_samples": sum(e["samples"] for e in entries), **run}
    path = Path(out_dir) / "manifest.json"
    write_json_atomic(path, manifest)
    return path
