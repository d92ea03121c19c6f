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

from dmgr.eval.real import USER, Boards, defective_boards, heldout_boards
from dmgr.eval.segment import SegmentSettings, detection_scores, predict_maps, train_segmenter
from dmgr.eval.shards import first_sample, read_run
from dmgr.eval.sources import cut_paste, perlin_anomalies
from dmgr.progress import progress_bar
from dmgr.sampler.masks import MASK_METHODS
from dmgr.schema import STRICT_SECTION, Count
from dmgr.shards.manifest import write_json_atomic

log = logging.getLogger(__name__)
SCALARS = ("pixel_auroc", "pixel_ap", "image_auroc", "mean_iou")


@dataclass(frozen=True)
class DownstreamSettings:
    __pydantic_config__ = STRICT_SECTION
    n: Count() = 64  # training pairs per source
    real_small: Count() = 8  # the user's few real images
    seeds: tuple[int, ...] = (0, 1, 2)  # segmenter initialisation and batch order
    test_defective: Count() = 180  # held-out real defective test boards
    test_clean: Count() = 60  # held-out real clean test boards
    image_size: Count(8) = 64
    window: Count(4) = 16
    margin: Count(0) = 5
    segment: SegmentSettings = field(default_factory=SegmentSettings)


def _concat(*parts: Boards) -> Boards:
    return Boards(*(torch.cat([getattr(p, f) for p in parts]) for f in ("images", "masks", "classes")))


def build_sources(
    runs: dict[str, Path], settings: DownstreamSettings, mask_default: str | None = None, mix: str | None = None
) -> dict[str, Boards]:
    """Every source's N training pairs. `runs` maps a name (e.g. real, paper) to a run directory; the
    first run that wrote one gives the paste baseline; the run named `mix` (default: the first)
    gives the real+DMGR mix, with `mask_default` masks (default: the mask the run itself wrote)."""
    if mix is not None and mix not in runs:
        raise ValueError(f"--mix {mix}: no run of that name (runs: {', '.join(runs)})")
    mix = mix or next(iter(runs), None)
    n, size = settings.n, settings.image_size
    sources: dict[str, Boards] = {}
    for name, run_dir in runs.items():
        first = first_sample(run_dir)
        masks = tuple(f"mask_{m}.png" for m in MASK_METHODS if f"mask_{m}.png" in first)
        paste = ("paste.png",) if "paste.png" in first and "paste" not in sources else ()
        run = read_run(run_dir, images=paste, masks=masks + (("paste_mask.png",) if paste else ()), limit=n)
        if len(run) < n:
            raise ValueError(f"{run_dir} holds {len(run)} samples, the benchmark needs n={n}")
        if settings.image_size != run.images.shape[-1] or settings.window != run.window_size:
            raise ValueError(
                f"{run_dir}: {run.images.shape[-1]} px images, {run.window_size} px windows; "
                f"the benchmark is set for {settings.image_size} / {settings.window}"
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
    sources["cut-paste"] = cut_paste(n, size, settings.window, settings.margin)
    sources["perlin"] = perlin_anomalies(n, size)
    small = defective_boards(USER, settings.real_small, size)
    sources["real-small"] = small
    if runs:
        sources[f"real-small+{mix_key}"] = _concat(small, sources[mix_key])
    sources[f"real-{n}"] = defective_boards(USER, n, size)
    return sources


def _summary(runs: list[dict]) -> dict:
    def stats(values: list[float]) -> dict:
        t = torch.tensor(values, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0}

    out = {k: stats([r[k] for r in runs]) for k in SCALARS}
    out["iou"] = {c: stats([r["iou"][c] for r in runs]) for c in runs[0]["iou"]}
    return out


def _train_and_score(train: Boards, test: Boards, segment: SegmentSettings, seed: int, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = train_segmenter(train, segment, seed)
    scores = detection_scores(predict_maps(model, test.images), test, segment.threshold)
    return {"seed": seed, **scores, "seconds": round(time.perf_counter() - start, 1)}


def _log_model(name: str, scores: dict, done: int, total: int) -> None:
    log.info(
        "model %d/%d: %s seed %d: pixel AP %.3f, image AUROC %.3f (%.0f s)",
        done,
        total,
        name,
        scores["seed"],
        scores["pixel_ap"],
        scores["image_auroc"],
        scores["seconds"],
    )


def model_key(train: Boards, settings: DownstreamSettings, seed: int) -> str:
    """A digest of everything one model's scores depend on: its training pairs, the settings, the seed."""
    described = asdict(settings)
    if settings.segment.device == "cpu":  # the keys models trained before the setting existed have
        del described["segment"]["device"]
    digest = hashlib.sha256(json.dumps([described, seed], sort_keys=True, default=str).encode())
    for tensor in (train.images, train.masks, train.classes):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


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
    test = heldout_boards(settings.test_defective, settings.test_clean, settings.image_size)
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
        _log_model(name, scores, len(done), len(keys))
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
            "%-28s pixel AP %.3f  image AUROC %.3f  mIoU %.3f (%d seeds, %.0f s per model)",
            name,
            results[name]["pixel_ap"]["mean"],
            results[name]["image_auroc"]["mean"],
            results[name]["mean_iou"]["mean"],
            len(runs),
            sum(r["seconds"] for r in runs) / len(runs),
        )
    return {
        "settings": asdict(settings),
        "test": {"defective": settings.test_defective, "clean": settings.test_clean},
        "sources": results,
    }
