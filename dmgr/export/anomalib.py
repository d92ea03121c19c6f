"""The anomalib Folder layout: OUT/normal/<name>.png and OUT/normal_val/<name>.png (defect-free: train and
validation split, by the hash of each image's id that splits seeds), OUT/abnormal/<key>.png and
OUT/ground_truth/<key>.png (0/255 masks, the same names as abnormal/). anomalib trains on normal images only:
every defect image (and every real one of `--add-real`) is evaluation data in abnormal/.

normal/ is never the exact background of an image in abnormal/ (that would give near-identical
normal/abnormal pairs, and a model that only learns the difference). Where its images come from:

- real backgrounds (dataset.source=images): every image of the run's background pool (dataset.images, listed
  and decoded exactly as the run did, each whole at its own size, named by its sha256) that is the background
  of no abnormal image. When the run put defects on every background of the pool, a fifth of those
  backgrounds (at least one: the lowest sha256s) is held out: they go to normal/ and the abnormal images made
  on them are left out (counted as `held_out`). When the pool is no longer readable, the held-out backgrounds
  are taken from the samples' input.png (extras.input=true); otherwise the export stops and names the missing pool.
- generated boards (dataset.source=generate): the defect-free twins (extras.twin=true) of a held-out fifth of
  the samples (at least one: the lowest sha256 of the key), whose abnormal images are left out. A run
  without twins has no defect-free images and is refused.

A sample whose mask is empty is no anomaly: it is left out of abnormal/ (counted).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr.export.common import ExportError, Run, Sample, shard_index, write_atomic
from dmgr.export.items import Item, png_bytes, split_of
from dmgr.synth.backgrounds import BackgroundError, Backgrounds, scan_backgrounds

log = logging.getLogger(__name__)
HOLD_OUT = 0.2  # the share of used backgrounds (or generated samples) held out for normal/ when nothing is free


def held_out(ids: set[str], order: Callable[[str], str] = lambda s: s) -> set[str]:
    """A deterministic fifth of `ids` (at least one when any), the lowest by `order`."""
    return set(sorted(ids, key=order)[:math.ceil(HOLD_OUT * len(ids))])


def _key_order(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def pool_source(run: Run) -> Path:
    """The run's dataset.images as an absolute path: relative paths are read against the pool root the
    manifest recorded (a folder, or the folder of a .jsonl list)."""
    images = Path(str(run.config["dataset"]["images"])).expanduser()
    root = (run.manifest.get("backgrounds") or {}).get("root")
    if images.is_absolute() or root is None:
        return images
    return Path(root) / images.name if images.suffix.lower() in (".jsonl", ".json") else Path(root)


def load_pool(run: Run) -> Backgrounds | None:
    dataset = run.config["dataset"]
    source = pool_source(run)
    try:
        pool = scan_backgrounds(source, int(dataset["image_size"]), int(dataset["window_size"]),
                                int(dataset["margin"]), float(dataset.get("scale", 1.0)))
    except (BackgroundError, OSError) as exc:
        log.warning("anomalib: background pool %s not readable (%s)", source, exc)
        return None
    if pool.digest != (run.manifest.get("backgrounds") or {}).get("digest"):
        log.warning("anomalib: the background pool %s changed since the run; its images that no abnormal image "
                    "was made on still go to normal/", source)
    return pool


def prepare(run: Run, options: dict) -> dict:
    """Decide, from the samples' json alone, where normal/ comes from and which abnormal images give way."""
    samples = [(key, meta, exts) for shard in run.shards for key, meta, exts in
               shard_index(run.path / "shards" / shard["name"])]
    abnormal = [(key, meta, exts) for key, meta, exts in samples if int(meta.get("mask_area", 0)) > 0]
    if run.config["dataset"].get("source") != "images":
        if not all("twin.png" in exts for _, _, exts in samples):
            raise ExportError(f"RUN={run.path}: a run on generated boards has no defect-free images for anomalib's "
                              "normal/; synthesise into a new out_dir with extras.twin=true")
        return {"normal_from": "twin", "held_keys": held_out({k for k, _, _ in abnormal}, _key_order)}
    used = {meta["background"]["sha256"] for _, meta, _ in abnormal}
    pool = load_pool(run)
    if pool is not None:
        free = {item.sha256: i for i, item in enumerate(pool.items) if item.sha256 not in used}
        held = set() if free else held_out(used)
        indices = free or {item.sha256: i for i, item in enumerate(pool.items) if item.sha256 in held}
        return {"normal_from": "pool", "pool": pool, "pool_indices": sorted(indices.values()), "held_shas": held}
    if not all("input.png" in exts for _, _, exts in samples):
        raise ExportError(f"dataset.images={pool_source(run)}: the run's background pool is not readable and its "
                          "samples hold no input.png: anomalib's normal/ needs defect-free images; restore the pool")
    return {"normal_from": "input", "held_shas": held_out(used)}


def _normal(identity: str, options: dict) -> str:
    return "normal_val" if split_of(identity, float(options["val"])) == "val" else "normal"


def _is_held(sample: Sample, options: dict) -> bool:
    if options["normal_from"] == "twin":
        return sample.key in options["held_keys"]
    return (sample.meta.get("background") or {}).get("sha256") in options["held_shas"]


def write_sample(sample: Sample, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    files = {}
    empty = not sample.mask().any()
    held = _is_held(sample, options)
    if held and options["normal_from"] == "twin":
        files[f"{_normal(sample.key, options)}/{sample.key}.png"] = sample.twin_png
    elif held and options["normal_from"] == "input":
        sha = sample.meta["background"]["sha256"]
        files[f"{_normal(sha, options)}/{sha[:16]}.png"] = sample.input_png
    if not empty and not held:
        files[f"abnormal/{sample.key}.png"] = sample.png
        files[f"ground_truth/{sample.key}.png"] = sample.mask_png
    record = {"normal": [f for f in files if f.startswith("normal")], "empty": int(empty),
              "held_out": int(held and not empty)}
    return files, record


def write_item(item: Item, run: Run, options: dict) -> tuple[dict[str, bytes], dict]:
    """One of the user's real defect images: abnormal/ and its union mask in ground_truth/."""
    union = np.zeros((item.size[1], item.size[0]), dtype=bool)
    for _, mask in item.labels:
        union |= mask
    mask_png = png_bytes(Image.fromarray(np.where(union, 255, 0).astype(np.uint8), "L"))
    files = {f"abnormal/{item.name}.png": item.png, f"ground_truth/{item.name}.png": mask_png}
    return files, {"normal": [], "empty": 0, "held_out": 0}


def write_pool(out: Path, options: dict) -> list[str]:
    """The pool's defect-free images for the normal folders, grey where the input is (as the run writes them)."""
    names = []
    for index in options.get("pool_indices", []):
        item = options["pool"].items[index]
        image = Image.fromarray(options["pool"].image(index))
        name = f"{_normal(item.sha256, options)}/{item.sha256[:16]}.png"
        write_atomic(out / name, png_bytes(image.convert("L") if item.grey else image))
        names.append(name)
    return names


def finish(run: Run, out: Path, records: Callable[[], Iterator[dict]], options: dict) -> dict:
    normal, abnormal, empty, held = set(write_pool(out, options)), 0, 0, 0
    for r in records():
        normal.update(r["normal"])
        abnormal += 1 - r["empty"] - r.get("held_out", 0)
        empty += r["empty"]
        held += r.get("held_out", 0)
    for folder in ("normal", "normal_val"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    return {"normal": sum(n.startswith("normal/") for n in normal),
            "normal_val": sum(n.startswith("normal_val/") for n in normal), "normal_from": options["normal_from"],
            "abnormal": abnormal, "held_out": held, "empty_masks": empty,
            "folder_datamodule": {"name": str(run.config["dataset"].get("name", "dmgr")), "root": str(out.resolve()),
                                  "normal_dir": "normal", "abnormal_dir": "abnormal", "mask_dir": "ground_truth",
                                  "normal_test_dir": "normal_val"}}
