"""The shared export driver: read a finished run shard by shard (webdataset), write per-sample files,
record each finished shard in OUT/.parts/, and verify those records on a rerun."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import webdataset as wds
from PIL import Image

from dmgr import __version__
from dmgr.digest import sha256_file

PARTS = ".parts"


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class Run:
    path: Path
    classes: list[str]
    shards: list[dict]  # manifest entries: name, samples, sha256
    manifest: dict = field(default_factory=dict, compare=False)  # the whole manifest.json (config, backgrounds)

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}


def open_run(run: str | Path) -> Run:
    path = Path(run)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise ExportError(f"RUN={run}: no manifest.json; give a finished synthesis run's out_dir (a rerun of the "
                          "synthesis command finishes an interrupted one)")
    try:
        data = json.loads(manifest.read_text())
        classes = [str(c) for c in data["config"]["dataset"]["classes"]]
        shards = list(data["shards"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ExportError(f"{manifest}: unreadable ({type(exc).__name__}); a rerun of the synthesis command "
                          "rebuilds it") from None
    return Run(path.resolve(), classes, shards, data)


@dataclass(frozen=True)
class Sample:
    key: str
    png: bytes
    mask_png: bytes
    meta: dict
    input_png: bytes | None
    twin_png: bytes | None = None

    def mask(self) -> np.ndarray:
        with Image.open(io.BytesIO(self.mask_png)) as img:
            return np.asarray(img.convert("L")) > 127

    def defect_masks(self) -> list[tuple[dict, np.ndarray]]:
        """(defect, its mask) per defect: the union mask inside the defect's window (windows never overlap)."""
        union = self.mask()
        out = []
        for d in self.meta.get("defects") or [self.meta]:
            x0, y0, x1, y1 = d["window_box"]
            own = np.zeros_like(union)
            own[y0:y1, x0:x1] = union[y0:y1, x0:x1]
            out.append((d, own))
        return out


def read_shard(path: Path) -> Iterator[Sample]:
    for raw in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        key = raw["__key__"]
        missing = [m for m in ("png", "mask.png", "json") if m not in raw]
        if missing:
            raise ExportError(f"{path}: sample {key} has no {missing[0]}: not a dmgr shard")
        try:
            meta = json.loads(raw["json"])
        except json.JSONDecodeError as exc:
            raise ExportError(f"{path}: sample {key}: unreadable json ({exc})") from None
        yield Sample(key, raw["png"], raw["mask.png"], meta, raw.get("input.png"), raw.get("twin.png"))


def shard_index(path: Path) -> Iterator[tuple[str, dict, set[str]]]:
    """(key, json, member extensions) of every sample, reading only the json members (a cheap first pass)."""
    metas: dict[str, dict] = {}
    members: dict[str, set[str]] = {}
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, set()).add(ext)
                if ext == "json":
                    metas[key] = json.loads(tar.extractfile(info).read())
    except (tarfile.TarError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: unreadable shard ({type(exc).__name__}); rerun the synthesis command "
                          "to repair it") from None
    for key, exts in members.items():
        if key not in metas:
            raise ExportError(f"{path}: sample {key} has no json: not a dmgr shard")
        yield key, metas[key], exts


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=1).encode())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _part_ok(part_path: Path, shard: dict, out: Path) -> dict | None:
    """The shard's record when it matches the run's shard and every file it lists is intact."""
    try:
        part = json.loads(part_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if part.get("sha256") != shard["sha256"]:
        return None
    for rel, digest in part["files"].items():
        path = out / rel
        if not path.is_file() or sha256_file(path) != digest:
            return None
    return part


def is_flagged(meta: dict) -> bool:
    """A seed written flagged: it failed every quality-screen attempt, or its mask stayed below its minimum."""
    return bool((meta.get("screen") or {}).get("flagged") or (meta.get("empty_mask") or {}).get("flagged"))


def _write(out: Path, written: dict[str, bytes], files: dict[str, str]) -> None:
    for rel, data in written.items():
        write_atomic(out / rel, data)
        files[rel] = _sha(data)


def _export_shard(run: Run, shard: dict, out: Path, module: ModuleType, options: dict) -> dict:
    """Every sample of one shard through the format's write_sample (flagged ones left out unless included)."""
    path = run.path / "shards" / shard["name"]
    if not path.is_file() or sha256_file(path) != shard["sha256"]:
        raise ExportError(f"{path}: missing or changed since the run's manifest was written (sha256 differs); "
                          "rerun the synthesis command to repair it")
    files, records = {}, []
    for sample in read_shard(path):
        flagged = int(is_flagged(sample.meta))
        if flagged and not options.get("include_flagged"):
            records.append({"flagged": 1, "left_out": 1})
            continue
        written, record = module.write_sample(sample, run, options)
        _write(out, written, files)
        records.append({**record, "flagged": flagged})
    return {"shard": shard["name"], "sha256": shard["sha256"], "files": files, "records": records}


def export(run_dir: str | Path, out: str | Path, fmt: str, options: dict, module: ModuleType,
           real: Iterable | None = None) -> dict:
    """Export every shard of a finished run into OUT; returns (and writes) OUT/export.json.

    `module` is the format: write_sample(sample, run, options) -> ({relative path: bytes}, record),
    finish(run, out, records, options) -> counts, and optionally prepare(run, options) -> more options (run
    before the shards are read; not part of the options a rerun must match) and write_item(item, run, options)
    for `real` (the user's labelled images, written after the shards on every run)."""
    run, out = open_run(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT={out}: is a file, not a folder: choose a new or empty folder")
    state = {"run": str(run.path), "format": fmt, "options": options}
    state_path = out / PARTS / "export.json"
    if state_path.is_file():
        previous = json.loads(state_path.read_text())
        if previous != state:
            raise ExportError(f"OUT={out}: holds a {previous['format']} export of {previous['run']} "
                              f"{previous['options']}; this is a {fmt} export of {run.path} {options}: "
                              "choose another OUT")
    elif out.exists() and any(out.iterdir()):
        raise ExportError(f"OUT={out}: is not empty and holds no dmgr export: choose a new or empty folder")
    write_json(state_path, state)
    prepare = getattr(module, "prepare", None)
    options = {**options, **(prepare(run, options) if prepare else {})}
    done = redone = 0
    part_paths = []
    for shard in run.shards:
        part_path = out / PARTS / f"{shard['name']}.json"
        part_paths.append(part_path)
        if _part_ok(part_path, shard, out) is not None:
            done += 1
            continue
        write_json(part_path, _export_shard(run, shard, out, module, options))
        redone += 1
    if real is not None:
        files, records = {}, []
        for item in real:
            written, record = module.write_item(item, run, options)
            _write(out, written, files)
            records.append({**record, "real": 1})
        part_paths.append(out / PARTS / "real.json")
        write_json(part_paths[-1], {"files": files, "records": records})

    def records() -> Iterator[dict]:
        for part_path in part_paths:
            yield from (r for r in json.loads(part_path.read_text())["records"] if not r.get("left_out"))

    counts = module.finish(run, out, records, options)
    samples = {"read": 0, "flagged": 0, "flagged_left_out": 0, "real_images": 0}
    for part_path in part_paths:
        for r in json.loads(part_path.read_text())["records"]:
            samples["real_images" if r.get("real") else "read"] += 1
            samples["flagged"] += r.get("flagged", 0)
            samples["flagged_left_out"] += r.get("left_out", 0)
    summary = {**state, "samples": samples, "counts": counts, "classes": run.classes,
               "dmgr_version": __version__,
               "shards": [{"name": s["name"], "samples": s["samples"], "sha256": s["sha256"]} for s in run.shards],
               "this_run": {"shards_exported": redone, "shards_verified_and_skipped": done}}
    write_json(out / "export.json", summary)
    return summary
