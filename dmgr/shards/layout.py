"""Shard names on disk and the checks that a shard is complete (structure) and sound (every member decodes)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

REQUIRED_MEMBERS = ("png", "mask.png", "json")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_path(out_dir: Path, prefix: str, index: int) -> Path:
    return Path(out_dir) / "shards" / shard_name(prefix, index)


def damaged_path(shard: Path) -> Path:
    """Where a damaged shard waits until its redo is accepted (it is not a `*.tar`, so no reader takes it)."""
    return shard.with_name(f"{shard.name}.damaged")


def sample_key(seed: int) -> str:
    return f"{seed:08d}"


def read_members(path: Path) -> dict[str, bytes]:
    """Every file member's bytes, by name (raises tarfile.TarError, OSError, EOFError; duplicates: ValueError)."""
    members: dict[str, bytes] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile():
                if member.name in members:
                    raise ValueError("duplicate members")
                members[member.name] = tar.extractfile(member).read()
    return members


def verify_shard(path: Path, seeds: list[int], members: tuple[str, ...] = REQUIRED_MEMBERS) -> str | None:
    """None when the tar reads to the end and holds exactly `seeds` with every member; else the reason."""
    problem, _ = _structure(path, seeds, members)
    return problem


def _structure(path: Path, seeds: list[int], members: tuple[str, ...]) -> tuple[str | None, dict[str, bytes]]:
    try:
        found = read_members(path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"unreadable ({exc})", {}
    except ValueError as exc:
        return str(exc), {}
    expected = {f"{sample_key(s)}.{m}" for s in seeds for m in members}
    missing = expected - set(found)
    if missing:
        return f"{len(missing)} members missing, e.g. {sorted(missing)[0]}", {}
    if set(found) - expected:
        return f"unexpected member {sorted(set(found) - expected)[0]}", {}
    return None, found


def _image_size(data: bytes) -> tuple[int, int]:
    """The size of a PNG after checking every chunk's CRC and decoding all its pixels (raises on damage)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"a {img.format} image, not a PNG")
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


def decode_shard(path: Path, seeds: list[int], members: tuple[str, ...] = REQUIRED_MEMBERS
                 ) -> tuple[str | None, dict[int, dict]]:
    """(None, each seed's json) when `verify_shard` holds, every PNG decodes, every mask has its image's size
    and every json parses to an object with the member's seed; else (the reason, {})."""
    problem, found = _structure(path, seeds, members)
    if problem is not None:
        return problem, {}
    metas = {}
    for seed in seeds:
        key = sample_key(seed)
        try:
            sizes = {m: _image_size(found[f"{key}.{m}"]) for m in members if m.endswith("png")}
            meta = json.loads(found[f"{key}.json"])
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged member, named
            return f"sample {key} does not decode ({type(exc).__name__}: {exc})", {}
        masks = [m for m in sizes if "mask" in m and sizes[m] != sizes.get("png")]
        if masks:
            return f"sample {key}: {masks[0]} is {sizes[masks[0]]}, its image {sizes.get('png')}", {}
        if not isinstance(meta, dict) or meta.get("seed") != seed:
            return f"sample {key}: its json is not this seed's metadata", {}
        metas[seed] = meta
    return None, metas
