"""The shared export driver: read a finished run shard by shard (webdataset), write per-sample files,
record each finished shard in OUT/.parts/, and verify those records on a rerun."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


# write_sample(sample, run, options) -> ({relative path: bytes}, record for finish)
SampleWriter = Callable[[Sample, Run, dict], tuple[dict[str, bytes], dict]]


def export(run_dir: str | Path, out: str | Path, fmt: str, options: dict, write_sample: SampleWriter,
           finish: Callable[[Run, Path, Callable[[], Iterator[dict]], dict], dict],
           prepare: Callable[[Run, dict], dict] | None = None) -> dict:
    """Export every shard of a finished run into OUT; returns (and writes) OUT/export.json.

    prepare(run, options), when given, runs before the shards are read; what it returns is added to the
    options write_sample and finish see (not to the options a rerun must match)."""
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
    options = {**options, **(prepare(run, options) if prepare else {})}
    done = redone = 0
    part_paths = []
    for shard in run.shards:
        path = run.path / "shards" / shard["name"]
        part_path = out / PARTS / f"{shard['name']}.json"
        part_paths.append(part_path)
        if _part_ok(part_path, shard, out) is not None:
            done += 1
            continue
        if not path.is_file() or sha256_file(path) != shard["sha256"]:
            raise ExportError(f"{path}: missing or changed since the run's manifest was written (sha256 differs); "
                              "rerun the synthesis command to repair it")
        files, records = {}, []
        for sample in read_shard(path):
            written, record = write_sample(sample, run, options)
            for rel, data in written.items():
                write_atomic(out / rel, data)
                files[rel] = _sha(data)
            records.append(record)
        write_json(part_path, {"shard": shard["name"], "sha256": shard["sha256"], "files": files, "records": records})
        redone += 1

    def records() -> Iterator[dict]:
        for part_path in part_paths:
            yield from json.loads(part_path.read_text())["records"]

    counts = finish(run, out, records, options)
    summary = {**state, "counts": counts, "classes": run.classes, "dmgr_version": __version__,
               "shards": [{"name": s["name"], "samples": s["samples"], "sha256": s["sha256"]} for s in run.shards],
               "this_run": {"shards_exported": redone, "shards_verified_and_skipped": done}}
    write_json(out / "export.json", summary)
    return summary
