"""The downstream benchmark: train the same segmenter on N pairs from each source, test on real boards.

Sources (each gives N (image, mask) pairs; every one trains with the same steps and batch size):
  dmgr-<run>/<mask>   a synthesis run's images with its own mask and each other mask method it wrote
                      (extras.masks=true); real-image runs (dataset.source=images) and generated boards alike
  paste               the first run's no-rectification baseline (extras.paste=true)
  cut-paste           real defect patches pasted into real defect-free boards
  perlin              DRAEM-style Perlin anomalies on real defect-free boards
  real-small          the few real defective boards a user has (`real_small` of them)
  real-small+dmgr-... those plus the N pairs of the mixing run's default mask
  real-N              N real defective boards: the ceiling, what real data of the same size gives

`segment.task` picks what the segmenter learns: `binary` (defect pixels; pixel AUROC/AP, image AUROC, IoU)
or `classes` (background + the 6 defect classes from the shards' `class_id`; per-class pixel AP and its mean,
per-class IoU of the argmax and its mean). The classes task has no perlin source: its anomalies have no class.

`panel` (W, H) sets the frames' size: every source and the test set are then W x H panels of `image_size`-px
boards (the demo backgrounds' layout and pixel scale), as a native-size run writes them; None (runs of square
`image_size` boards) keeps one board per frame.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dmgr.data import board, defects
from dmgr.data.defects import CLASS_NAMES
from dmgr.eval import real
from dmgr.eval.real import USER, Boards, defective_boards, heldout_boards
from dmgr.eval.segment import SegmentSettings, predict_maps, score, train_segmenter
from dmgr.eval.shards import first_sample, read_run
from dmgr.eval.sources import cut_paste, perlin_anomalies
from dmgr.progress import progress_bar
from dmgr.sampler.masks import MASK_METHODS
from dmgr.schema import STRICT_SECTION, Count
from dmgr.shards.manifest import write_json_atomic

log = logging.getLogger(__name__)
HEADLINE = {"binary": ("pixel_ap", "image_auroc", "mean_iou"), "classes": ("map", "mean_iou", "background_iou")}


@dataclass(frozen=True)
class DownstreamSettings:
    __pydantic_config__ = STRICT_SECTION
    n: Count() = 64  # training pairs per source
    real_small: Count() = 8  # the user's few real images
    seeds: tuple[int, ...] = (0, 1, 2)  # segmenter initialisation and batch order
    test_defective: Count() = 180  # held-out real defective test boards
    test_clean: Count() = 60  # held-out real clean test boards
    image_size: Count(8) = 64  # board side in pixels (the models' image_size: the demo boards' pixel scale)
    window: Count(4) = 16
    panel: tuple[Count(8), Count(8)] | None = None  # (W, H) of every frame; None: one image_size board per frame
    margin: Count(0) = 5
    segment: SegmentSettings = field(default_factory=SegmentSettings)


def concat(*parts: Boards) -> Boards:
    return Boards(*(torch.cat([getattr(p, f) for p in parts]) for f in ("images", "masks", "classes")))


def _check_classes(run_dir: Path, meta: dict) -> None:
    """The classes task reads each sample's class from its json: one defect, of a class named as the test
    boards' classes are."""
    if len(meta.get("defects", [meta])) > 1:
        raise ValueError(f"{run_dir}: samples with several defects; the classes task needs dataset.defects_per_image=1")
    cid, name = meta["class_id"], meta["class_name"]
    if not 0 <= cid < len(CLASS_NAMES) or CLASS_NAMES[cid] != name:
        raise ValueError(
            f"{run_dir}: class_id {cid} is {name!r}; the classes task tests on the classes {', '.join(CLASS_NAMES)} "
            "in that order (the demo data root's labels.json)"
        )


def build_sources(
    runs: dict[str, Path],
    settings: DownstreamSettings,
    mask_default: str | None = None,
    mix: str | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, Boards]:
    """Every source's N training pairs. `runs` maps a name (e.g. real, paper) to a run directory; the
    first run that wrote one gives the paste baseline; the run named `mix` (default: the first)
    gives the real+DMGR mix, with `mask_default` masks (default: the mask the run itself wrote).
    The rendered sources named in `skip` (cut-paste, perlin, real-N) are not made."""
    if mix is not None and mix not in runs:
        raise ValueError(f"--mix {mix}: no run of that name (runs: {', '.join(runs)})")
    mix = mix or next(iter(runs), None)
    n, size = settings.n, settings.image_size
    sources: dict[str, Boards] = {}
    for name, run_dir in runs.items():
        first = first_sample(run_dir)
        if settings.segment.task == "classes":
            _check_classes(run_dir, first["json"])
        masks = tuple(f"mask_{m}.png" for m in MASK_METHODS if f"mask_{m}.png" in first)
        paste = ("paste.png",) if "paste.png" in first and "paste" not in sources else ()
        run = read_run(run_dir, images=paste, masks=masks + (("paste_mask.png",) if paste else ()), limit=n)
        if len(run) < n:
            raise ValueError(f"{run_dir} holds {len(run)} samples, the benchmark needs n={n}")
        frame = settings.panel or (settings.image_size, settings.image_size)
        height, width = run.images.shape[-2:]
        if (width, height) != tuple(frame) or settings.window != run.window_size:
            raise ValueError(
                f"{run_dir}: {width}x{height} px images, {run.window_size} px windows; the benchmark is set for "
                f"{frame[0]}x{frame[1]} / {settings.window} (it takes the first run's frame size: give runs of "
                "one size)"
            )
        by_method = {m: run.masks_by_key[f"mask_{m}.png"] for m in MASK_METHODS if f"mask_{m}.png" in masks}
        if first["json"]["mask_method"] not in by_method:  # its own mask, under its own method
            by_method[first["json"]["mask_method"]] = run.masks
        for method, mask in by_method.items():
            sources[f"dmgr-{name}/{method}"] = Boards(run.images, mask, run.classes)
        if paste:
            sources["paste"] = Boards(run.members["paste.png"], run.masks_by_key["paste_mask.png"], run.classes)
        if name == mix:
            own = first["json"]["mask_method"]
            mix_key = f"dmgr-{name}/{mask_default if mask_default in by_method else own}"
    panel = settings.panel
    if "cut-paste" not in skip:
        sources["cut-paste"] = cut_paste(n, size, settings.window, settings.margin, panel=panel)
    if settings.segment.task == "binary" and "perlin" not in skip:
        sources["perlin"] = perlin_anomalies(n, size, panel=panel)
    small = defective_boards(USER, settings.real_small, size, panel=panel)
    sources["real-small"] = small
    if runs:
        sources[f"real-small+{mix_key}"] = concat(small, sources[mix_key])
    if f"real-{n}" not in skip:
        sources[f"real-{n}"] = defective_boards(USER, n, size, panel=panel)
    return sources


def _stats(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0}


def _summary(runs: list[dict]) -> dict:
    """Mean and std over seeds of every score: a number, or per class for a dict of numbers."""
    out = {}
    for key, value in runs[0].items():
        if key in ("seed", "seconds"):
            continue
        if isinstance(value, dict):
            out[key] = {c: _stats([r[key][c] for r in runs]) for c in value}
        else:
            out[key] = _stats([r[key] for r in runs])
    return out


def _train_and_score(train: Boards, test: Boards, segment: SegmentSettings, seed: int, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = train_segmenter(train, segment, seed)
    scores = score(predict_maps(model, test.images), test, segment)
    return {"seed": seed, **scores, "seconds": round(time.perf_counter() - start, 1)}


def _headline(scores: dict, task: str, mean: bool = False) -> str:
    return ", ".join(f"{k} {scores[k]['mean'] if mean else scores[k]:.3f}" for k in HEADLINE[task])


def model_key(train: Boards, settings: DownstreamSettings, seed: int) -> str:
    """A digest of everything one model's scores depend on: its training pairs, the settings, the seed."""
    described = asdict(settings)
    for name, default in (("device", "cpu"), ("task", "binary")):  # the keys of models cached before these
        if described["segment"][name] == default:  # settings existed stay valid
            del described["segment"][name]
    if described["panel"] is None:
        del described["panel"]
    digest = hashlib.sha256(json.dumps([described, seed], sort_keys=True, default=str).encode())
    for tensor in (train.images, train.masks, train.classes):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def heldout_set(settings: DownstreamSettings, cache: Path | None = None) -> Boards:
    """The held-out test boards; with `cache`, kept in cache/test-<digest>.pt (a set of panels takes minutes to
    render), keyed by the settings that shape it and the source of the code that renders it."""
    def make() -> Boards:
        return heldout_boards(settings.test_defective, settings.test_clean, settings.image_size, settings.panel)

    if cache is None:
        return make()
    shape = [settings.test_defective, settings.test_clean, settings.image_size, settings.panel]
    digest = hashlib.sha256(json.dumps(shape).encode())
    for module in (board, defects, real):
        digest.update(Path(module.__file__).read_bytes())
    path = cache / f"test-{digest.hexdigest()[:20]}.pt"
    if path.exists():
        return Boards(**torch.load(path))
    test = make()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"images": test.images, "masks": test.masks, "classes": test.classes}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return test


def run_benchmark(
    sources: dict[str, Boards],
    settings: DownstreamSettings,
    progress: bool = True,
    jobs: int = 1,
    cache: Path | None = None,
) -> dict:
    """Train and test every source with every seed; returns per-seed scores and mean/std per source.

    `jobs` > 1 trains that many models at once in spawned processes of one thread each. With `cache`, the
    scores of each (training pairs, settings, seed) are kept in cache/<digest>.json and reused: a rerun
    only trains the models whose inputs changed (training is deterministic, so the numbers are the same).
    """
    test = heldout_set(settings, cache)
    done: dict[tuple[str, int], dict] = {}
    keys = {(name, seed): model_key(sources[name], settings, seed) for name in sources for seed in settings.seeds}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for task, key in keys.items():
            if (cache / f"{key}.json").exists():
                done[task] = json.loads((cache / f"{key}.json").read_text())
        if done:
            log.info("reusing %d of %d models from %s", len(done), len(keys), cache)
    tasks = [task for task in keys if task not in done]
    bar = progress_bar(total=len(tasks), desc="downstream", unit="model", disable=not progress)

    def finished(name: str, seed: int, scores: dict) -> None:
        done[name, seed] = scores
        if cache is not None:
            write_json_atomic(cache / f"{keys[name, seed]}.json", scores)
        log.info(
            "model %d/%d: %s seed %d: %s (%.0f s)",
            len(done),
            len(keys),
            name,
            seed,
            _headline(scores, settings.segment.task),
            scores["seconds"],
        )
        bar.update(1)

    if jobs <= 1:
        for name, seed in tasks:
            finished(name, seed, _train_and_score(sources[name], test, settings.segment, seed, 0))
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(_train_and_score, sources[n], test, settings.segment, s, 1): (n, s) for n, s in tasks
            }
            for future in as_completed(futures):
                finished(*futures[future], future.result())
    bar.close()
    results = {}
    for name, train in sources.items():
        runs = [done[name, seed] for seed in settings.seeds]
        results[name] = {
            "pairs": len(train),
            "mask_fraction": float(train.masks.float().mean()),
            "runs": runs,
            **_summary(runs),
        }
        log.info(
            "%-28s %s (%d seeds, %.0f s per model)",
            name,
            _headline(results[name], settings.segment.task, True),
            len(runs),
            sum(r["seconds"] for r in runs) / len(runs),
        )
    return {
        "settings": asdict(settings),
        "test": {
            "defective": settings.test_defective,
            "clean": settings.test_clean,
            "frame": list(test.images.shape[-2:][::-1]),  # width, height
        },
        "sources": results,
    }
