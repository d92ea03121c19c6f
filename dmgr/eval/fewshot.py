"""The few-defect curve: a user has N real labelled defects per class; what does each source give a segmenter?

    python -m dmgr.eval curve --per-class 4,16,64,256 --pairs 64,512 --out outputs/eval/curve

For each N, every part that learns sees only the user's N defects per class (`user_defects`: the boards
USER + k, class k % 6, defect seed k, k < 6N); the global model keeps learning from defect-free boards, which a
user has in plenty. Per N, each step cached by its inputs and resumable (rerun the same command):

    OUT/N<n>/data/local/     the defects' patches (`write_patches`): the local model's and the screen's data
    OUT/N<n>/<model>/local/  `python -m dmgr.train` of the local architecture on them (resumes from state.pt);
                             <model> names its inputs: <arch>-<steps>, or <arch>-<steps>-from-<pretrain steps>
    OUT/N<n>/<model>/synth-<a>-<b>/  the default synthesis job with that local model and the screen trained on
                             the same patches, into 64 px boards, seeds a..b: first seeds 0..M-1, then further seeds
                             until M samples were accepted by the screen (those the export hands a user; flagged
                             ones count only with --include-flagged), M / 6 of each class: further runs weight the
                             classes short of theirs (`top_up`; --no-balance: any M); a larger M only adds runs.
                             DMGR-N x M is those samples, first by seed (each run resumes complete shards)
    OUT/models/              each segmenter's scores (`run_benchmark`'s cache)

Rows per N: real-N (the 6N boards themselves), cut-paste-N x M (their patches pasted into defect-free boards),
dmgr-N x M, real-N + dmgr-N x M. `--per-class` may include `demo`: today's shipped local model with the screen
on `make data`'s 1,000 patches per class, against cut-paste and real boards of those same 1,000 defects.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw

from dmgr import DEMO_DATA, EVAL_CACHE
from dmgr.data.defects import CLASS_NAMES
from dmgr.data.export import Defect, export_global, local_defects, write_patches
from dmgr.eval import models
from dmgr.eval.classifier import ClassifierSettings, JudgeNet, load_or_train
from dmgr.eval.downstream import DownstreamSettings, concat, run_benchmark
from dmgr.eval.real import USER, Boards, boards_of
from dmgr.eval.samples import class_reading
from dmgr.eval.shards import SynthSet, read_run, sample_metas
from dmgr.eval.sources import cut_paste
from dmgr.export.common import is_flagged
from dmgr.sampler import crop_windows
from dmgr.schema import STRICT_SECTION, Count, build

log = logging.getLogger(__name__)

DEMO = "demo"  # the --per-class entry of today's shipped local model and its 1,000 defects per class
DEMO_PER_CLASS = 1000
DEMO_LOCAL = Path("checkpoints/demo/local.safetensors")
SEED_BUDGET = 4  # at most this many seeds per pair asked for before an N's synthesis gives up


@dataclass(frozen=True)
class CurveSettings:
    __pydantic_config__ = STRICT_SECTION
    per_class: tuple[Count() | Literal["demo"], ...] = (4, 16, 64, 256)  # N; "demo": the shipped local model
    #   (1,000 per class)
    pairs: tuple[Count(), ...] = (64, 512)  # M: pairs each synthetic source makes
    include_flagged: bool = False  # DMGR-N x M counts every written sample, not only those the screen accepted
    #   (the export's --include-flagged; by default the curve reads what the export hands the user)
    balance: bool = True  # DMGR-N x M holds M / 6 samples of each class: runs after the first M seeds weight
    #   the classes short of theirs (`dataset.class_weights`) at their own acceptance; False: the first M by seed
    arch: str = "demo_local_mask"  # conf/arch/ of the local model trained per N (docs/training.md: the
    #   smallest tested that keeps the default job's quality)
    local_steps: tuple[Count(), ...] = (2000, 2500, 3000, 4000)  # training steps per N, in per_class order
    #   (the last repeats for further N)
    local_batch: Count() = 32
    pretrain_steps: Count(0) = 0  # steps of one local model pretrained on clean patches of the defect-free
    #   boards (`local_data=clean`, the null class), from which every N's model starts; 0: each from scratch
    backgrounds: int = 256  # 64 px defect-free boards with per-class ROIs: the synthesis frames
    tasks: tuple[Literal["binary", "classes"], ...] = ("binary", "classes")
    seeds: tuple[int, ...] = (0, 1, 2)  # segmenter seeds
    jobs: Count() = 2  # segmenters trained at once (one thread each)
    device: str = "cpu"
    synth_args: tuple[str, ...] = ()  # extra Hydra overrides of every synthesis run
    downstream: DownstreamSettings = field(default_factory=DownstreamSettings)
    judge: ClassifierSettings = field(default_factory=ClassifierSettings)  # the independent classifier that reads
    #   each DMGR row's samples (its image_size and window are the downstream's)


def user_defects(per_class: int) -> list[Defect]:
    """The user's N real defects per class: boards USER + k, class k % 6, defect seed k (k < 6N), the same
    boards `defective_boards(USER, 6N)` renders whole."""
    return [Defect(USER + k, k % len(CLASS_NAMES), k) for k in range(len(CLASS_NAMES) * per_class)]


def defects_of(n: int | str) -> list[Defect]:
    return local_defects(DEMO_PER_CLASS) if n == DEMO else user_defects(int(n))


def steps_for(local_steps: tuple[int, ...], index: int) -> int:
    """The local model's training steps of the index-th N (the last entry repeats)."""
    return local_steps[min(index, len(local_steps) - 1)]


def _run(command: list[str], log_path: Path) -> None:
    """A step as its own process (its log beside its output); a failure names the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s > %s", " ".join(command), log_path)
    with log_path.open("a") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit {done.returncode}); see {log_path}")


def write_data(root: Path, defects: list[Defect], size: int) -> Path:
    """root/local/ with exactly these defects' patches, rewritten when the list changed (labels.json says)."""
    labels = root / "local" / "labels.json"
    wanted = [asdict(d) for d in defects]
    if labels.exists():
        have = [{k: item[k] for k in ("board_seed", "class_id", "defect_seed")}
                for item in json.loads(labels.read_text())["items"]]
        if have == wanted:
            return root
        raise RuntimeError(f"{root} holds other defects than N={len(defects) // len(CLASS_NAMES)} asks; remove it")
    write_patches(root, defects, size, progress=False)
    return root


def write_backgrounds(out: Path, settings: CurveSettings) -> Path:
    """The synthesis frames: 64 px defect-free boards (GLOBAL_OFFSET stream) with per-class ROIs."""
    size = settings.downstream.image_size
    root = out / f"backgrounds-{size}-{settings.backgrounds}"
    manifest = root / "backgrounds.jsonl"
    if not manifest.exists():
        export_global(root, size, settings.backgrounds, progress=False, roi_slack=2)
    return manifest


def _train(root: Path, key: dict, overrides: list[str], settings: CurveSettings, python: str) -> Path:
    """`python -m dmgr.train` into root (resumed where it stopped), skipped when root/curve-done.json holds
    this key; returns root/ema.safetensors."""
    ckpt, done = root / "ema.safetensors", root / "curve-done.json"
    if done.exists() and json.loads(done.read_text()) == key and ckpt.exists():
        return ckpt
    _run([python, "-m", "dmgr.train", f"arch={settings.arch}", f"batch_size={settings.local_batch}",
          f"out_dir={root}", f"device={settings.device}", "progress=false", *overrides],
         root.parent / f"{root.name}.log")
    done.write_text(json.dumps(key))
    return ckpt


def pretrain_local(out: Path, backgrounds: Path, settings: CurveSettings, python: str = sys.executable) -> Path:
    """One local model for every N, trained on clean 16 px patches of the defect-free boards under the
    backgrounds' root (`local_data=clean`: empty masks, the null class): no defect is seen."""
    root = out / f"pretrain-{settings.arch}-{settings.pretrain_steps}"
    key = {"arch": settings.arch, "steps": settings.pretrain_steps, "data": str(backgrounds.parent)}
    return _train(root, key, [f"data_root={backgrounds.parent}", "local_data=clean", "+arch.config.null_class=true",
                              f"steps={settings.pretrain_steps}"], settings, python)


def model_name(arch: str, steps: int, pretrain_steps: int) -> str:
    """<arch>-<steps>[-from-<pretrain steps>]: the folder of an N's local model and its synthesis runs, one per set
    of training inputs, so that a change of steps or architecture trains and synthesises anew beside the old."""
    return f"{arch}-{steps}" + (f"-from-{pretrain_steps}" if pretrain_steps else "")


def train_local(root: Path, data: Path, settings: CurveSettings, steps: int, python: str = sys.executable,
                pretrained: Path | None = None) -> Path:
    """The local model on the N defects' patches (from `pretrained` when given): root/ema.safetensors."""
    key = {"arch": settings.arch, "steps": steps, "batch": settings.local_batch, "data": str(data)}
    overrides = [f"data_root={data}", f"steps={steps}", "held_out=0"]
    if pretrained is not None:
        key["pretrained"] = str(pretrained)
        overrides += ["+arch.config.null_class=true", f"init_from={pretrained}"]
    return _train(root, key, overrides, settings, python)


def synth_runs(root: Path) -> list[Path]:
    """root/synth-<first>-<last>: an N's synthesis runs so far, in seed order."""
    runs = [r for r in root.glob("synth-*-*") if r.is_dir() and r.name.count("-") == 2]
    return sorted(runs, key=lambda r: int(r.name.split("-")[1]))


def seed_range(run: Path) -> tuple[int, int]:
    """synth-<first>-<last> -> (first, last + 1)."""
    first, last = (int(v) for v in run.name.split("-")[1:])
    return first, last + 1


def quotas(pairs: int, balance: bool) -> list[int] | None:
    """Samples per class of a class-balanced M (the first classes take the remainder); None without balance."""
    classes = len(CLASS_NAMES)
    return [pairs // classes + (c < pairs % classes) for c in range(classes)] if balance else None


def tally(runs: list[Path], include_flagged: bool) -> tuple[list[int], list[int]]:
    """Per class over the runs: usable samples (the export leaves flagged ones out unless asked) and samples
    written."""
    have, written = [0] * len(CLASS_NAMES), [0] * len(CLASS_NAMES)
    for meta in (meta for run in runs for meta in sample_metas(run)):
        written[meta["class_id"]] += 1
        have[meta["class_id"]] += include_flagged or not is_flagged(meta)
    return have, written


def next_seeds(end: int, have: int, pairs: int) -> int:
    """How many seeds to add after `end` synthesised seeds gave `have` usable samples, to reach `pairs`: first up
    to `pairs` seeds, then enough at the rate seen so far (10 % spare, at least 8)."""
    if end < pairs:
        return pairs - end
    if have == 0:
        return pairs
    return max(8, math.ceil((pairs - have) * end / have * 1.1))


def top_up(have: list[int], written: list[int], quota: list[int]) -> tuple[int, list[float]]:
    """Seeds and class weights (`dataset.class_weights`) of a run that fills each class's shortfall at its own
    acceptance so far (10 % spare, at least 8 seeds; a class with none accepted yet counts as 1 in written + 1)."""
    need = [(q - h) * (w / h if h else w + 1) if h < q else 0.0 for h, w, q in zip(have, written, quota)]
    return max(8, math.ceil(sum(need) * 1.1)), [round(v / sum(need), 4) for v in need]


def planned_weights(run: Path) -> list[float] | None:
    """The class weights a run was planned with (run/curve-run.json), None for the job's own class choice."""
    record = run / "curve-run.json"
    return json.loads(record.read_text())["class_weights"] if record.exists() else None


def synthesise_pairs(root: Path, synthesise_run: Callable[[Path, tuple[int, int], list[float] | None], Path],
                     pairs: tuple[int, ...], include_flagged: bool, balance: bool,
                     budget: int = SEED_BUDGET) -> list[Path]:
    """Seed ranges into root/synth-<first>-<last> (existing ones resumed) until each M of `pairs` has M usable
    samples (balance: M / 6 of each class, further runs weighted to the classes short of theirs at their own
    acceptance); a larger M only adds runs. At `budget` x M seeds it stops with fewer (a warning says how many)."""
    runs = synth_runs(root)
    for run in runs:
        synthesise_run(run, seed_range(run), planned_weights(run))
    end = seed_range(runs[-1])[1] if runs else 0
    for m in sorted(set(pairs)):
        quota = quotas(m, balance)
        while True:
            have, written = tally(runs, include_flagged)
            if (sum(have) >= m) if quota is None else all(h >= q for h, q in zip(have, quota)):
                break
            if end >= budget * m:
                log.warning("%s: %d seeds gave %s usable samples of the %d asked; the rows of this M use those "
                            "(the screen rejects most of this local model's samples: see its models-check and the "
                            "runs' manifests; --include-flagged counts every written sample)", root, end,
                            sum(have) if quota is None else f"{have} per class (quota {quota[0]})", m)
                return runs
            size, weights = next_seeds(end, sum(have), m), None
            if quota is not None and end >= m:
                size, weights = top_up(have, written, quota)
            size = min(size, budget * m - end)
            run = root / f"synth-{end}-{end + size - 1}"
            if weights is not None:
                run.mkdir(parents=True, exist_ok=True)
                (run / "curve-run.json").write_text(json.dumps({"class_weights": weights}))
            runs.append(synthesise_run(run, (end, end + size), weights))
            end += size
    return runs


def synthesise(run: Path, seeds: tuple[int, int], weights: list[float] | None, local: Path, data: Path,
               backgrounds: Path, settings: CurveSettings, python: str = sys.executable) -> Path:
    """The default job with this N's local model and screen, seeds [first, end) into the 64 px boards, with the
    class weights given (resumable)."""
    first, end = seeds
    choice = [] if weights is None else ["dataset.class_choice=weighted",
                                         f"dataset.class_weights=[{','.join(map(str, weights))}]"]
    _run([python, "-m", "dmgr.synth", f"model.local.checkpoint={local.resolve()}", f"screen.data_root={data.resolve()}",
          f"dataset.images={backgrounds.resolve()}", f"seeds={first}-{end - 1}", f"out_dir={run}",
          f"device={settings.device}", *choice, *settings.synth_args], run.parent / "synth.log")
    return run


def choose(runs: list[Path], pairs: int, include_flagged: bool, balance: bool) -> dict[Path, list[int]]:
    """The seeds of DMGR-N x M per run: by seed, the first M usable samples (balance: of each class the first of
    its quota); fewer where the runs hold fewer."""
    quota, taken, chosen = quotas(pairs, balance), [0] * len(CLASS_NAMES), {}
    for run in runs:
        for meta in sample_metas(run):
            c = meta["class_id"]
            if (include_flagged or not is_flagged(meta)) and (
                    sum(taken) < pairs if quota is None else taken[c] < quota[c]):
                taken[c] += 1
                chosen.setdefault(run, []).append(meta["seed"])
    return chosen


def chosen_samples(chosen: dict[Path, list[int]]) -> Iterator[tuple[SynthSet, torch.Tensor]]:
    """Per run, its samples read through webdataset (in seed order) and the mask of the chosen ones."""
    for run, seeds in chosen.items():
        synth, wanted = read_run(run, include_flagged=True), set(seeds)
        yield synth, torch.tensor([seed in wanted for seed in synth.seeds])


def read_chosen(chosen: dict[Path, list[int]]) -> Boards:
    """The chosen samples' boards, in seed order."""
    return concat(*(Boards(synth.images[keep], synth.masks[keep], synth.classes[keep])
                    for synth, keep in chosen_samples(chosen)))


def judge_chosen(chosen: dict[Path, list[int]], judge: JudgeNet) -> dict:
    """The independent judge's reading of the chosen samples' defect windows (`samples.class_reading`)."""
    windows, classes = [], []
    for synth, keep in chosen_samples(chosen):
        windows.append(crop_windows(synth.images[keep], synth.windows[keep], synth.window_size))
        classes.append(synth.classes[keep])
    return class_reading(judge, torch.cat(windows), torch.cat(classes))


def read_pairs(runs: list[Path], pairs: int, include_flagged: bool, balance: bool) -> Boards:
    """DMGR-N x M: the samples `choose` picks, all M of them."""
    chosen = choose(runs, pairs, include_flagged, balance)
    have = sum(len(seeds) for seeds in chosen.values())
    if have < pairs:
        kind = "synthesised" if include_flagged else "accepted"
        raise ValueError(f"{runs[0].parent} holds {have} {kind} samples{' in the quotas' if balance else ''}, the "
                         f"curve needs {pairs}")
    return read_chosen(chosen)


def check_local(local: Path, data: Path, device: str) -> dict:
    """`python -m dmgr.eval models` on an N's local model (kept beside it, redone when the model is newer):
    per class the samples that copy a training defect and how far samples and real defects lie from them."""
    report = local.parent / "models-check" / "models.json"
    if not report.exists() or report.stat().st_mtime < local.stat().st_mtime:
        models.run(local, data, out=report.parent, device=device)
    checked = json.loads(report.read_text())
    return {"verdict": checked["verdict"], "classes": {
        name: {k: c[k] for k in ("samples", "copies", "median_distance", "unseen_median")}
        for name, c in checked["classes"].items()}}


def sources_for(n: int | str, runs: list[Path], settings: CurveSettings) -> dict[str, Boards]:
    """Every row of this N: real-N, and per M cut-paste-N x M, dmgr-N x M, real-N + dmgr-N x M (the DMGR rows
    of an M the seed budget could not fill hold the usable samples there are; their `pairs` says how many)."""
    d = settings.downstream
    defects = defects_of(n)
    label = DEMO_PER_CLASS if n == DEMO else n
    real = boards_of(defects, d.image_size)
    sources = {f"real-{label}": real}
    for m in settings.pairs:
        sources[f"cut-paste-{label}x{m}"] = cut_paste(m, d.image_size, d.window, d.margin, defects=defects)
        chosen = choose(runs, m, settings.include_flagged, settings.balance)
        if not chosen:
            log.warning("%s: no usable DMGR sample; its DMGR rows are left out", runs[0].parent)
            continue
        dmgr = read_chosen(chosen)
        sources[f"dmgr-{label}x{m}"] = dmgr
        sources[f"real-{label}+dmgr-{label}x{m}"] = concat(real, dmgr)
    return sources


def run_curve(settings: CurveSettings, out: Path, python: str = sys.executable, judge_cache: Path = EVAL_CACHE) -> dict:
    """Every step of every N (cached, resumable), the independent judge's reading of each DMGR row's samples, then
    every segmenter; returns (and writes to OUT/curve.json) per task, per N, per source: pairs and mean/std of
    each score."""
    out = Path(out)
    backgrounds = write_backgrounds(out, settings)
    size = settings.downstream.image_size
    results: dict = {"settings": asdict(settings), "tasks": {}}
    pretrained = pretrain_local(out, backgrounds, settings, python) if settings.pretrain_steps else None
    per_n = {}
    for index, n in enumerate(settings.per_class):
        root = out / f"N{n}"
        if n == DEMO:
            data, local = Path(DEMO_DATA), DEMO_LOCAL
            if not (data / "local" / "labels.json").exists():
                raise FileNotFoundError(f"{data}/local: the demo row needs `make data` first")
        else:
            data = write_data(root / "data", user_defects(int(n)), size)
            steps = steps_for(settings.local_steps, index)
            root = root / model_name(settings.arch, steps, settings.pretrain_steps)
            local = train_local(root / "local", data, settings, steps, python, pretrained)
        if n != DEMO:
            results.setdefault("models", {})[str(n)] = check_local(local, data, settings.device)
        synthesise_run = partial(synthesise, local=local, data=data, backgrounds=backgrounds, settings=settings,
                                 python=python)
        runs = synthesise_pairs(root, synthesise_run, settings.pairs, settings.include_flagged, settings.balance)
        written = [meta for run in runs for meta in sample_metas(run)]
        results.setdefault("synthesis", {})[str(n)] = {
            "model": str(root.relative_to(out)), "seeds": seed_range(runs[-1])[1], "written": len(written),
            "accepted": sum(not is_flagged(meta) for meta in written)}
        per_n[n] = runs
    judge = None
    for n, runs in per_n.items():
        for m in settings.pairs:
            chosen = choose(runs, m, settings.include_flagged, settings.balance)
            if chosen:
                judge = judge or load_or_train(replace(settings.judge, image_size=size,
                                                       window=settings.downstream.window), judge_cache, False)[0]
                label = DEMO_PER_CLASS if n == DEMO else n
                results.setdefault("samples", {}).setdefault(str(n), {})[f"dmgr-{label}x{m}"] = judge_chosen(
                    chosen, judge)
    for task in settings.tasks:
        segment = replace(settings.downstream.segment, task=task, device=settings.device)
        downstream = replace(settings.downstream, seeds=settings.seeds, segment=segment)
        rows = {}
        for n, runs in per_n.items():
            sources = sources_for(n, runs, settings)
            scored = run_benchmark(sources, downstream, progress=False, jobs=settings.jobs, cache=out / "models")
            rows[str(n)] = {name: {k: v for k, v in r.items() if k != "runs"} for name, r in scored["sources"].items()}
        results["tasks"][task] = rows
    (out / "curve.json").write_text(json.dumps(results, indent=1))
    return results


HEADLINE_METRIC = {"binary": "pixel_ap", "classes": "map"}
FAMILIES = ("real", "cut-paste", "dmgr", "real+dmgr")
COLOURS = {"real": (40, 40, 40), "cut-paste": (200, 120, 30), "dmgr": (40, 110, 200), "real+dmgr": (200, 40, 60)}


def family(source: str) -> tuple[str, int | None]:
    """`real-16+dmgr-16x512` -> ("real+dmgr", 512); `cut-paste-16x64` -> ("cut-paste", 64); `real-16` -> ("real",
    None)."""
    pairs = int(source.rsplit("x", 1)[1]) if "x" in source.rsplit("-", 1)[-1] else None
    if "+" in source:
        return "real+dmgr", pairs
    return source.rsplit("-", 1)[0], pairs


def curve_rows(results: dict, task: str) -> list[tuple[str, str, int, float, float]]:
    """(N, source, pairs, mean, std) of the task's headline metric, per N in order."""
    metric = HEADLINE_METRIC[task]
    return [(n, name, row["pairs"], row[metric]["mean"], row[metric]["std"])
            for n, sources in results["tasks"][task].items() for name, row in sources.items()]


def write_report(out: Path, results: dict, command: str) -> dict[str, Path]:
    """OUT/curve.md (one table per task: N, source, pairs, mean ± std) and OUT/curve.png (the picture)."""
    lines = ["# The few-defect curve", "", f"`{command}`", "",
             "Every source learned from the same N real defects per class (the user's boards `USER + k`); the "
             "segmenter and its held-out real test boards are the downstream benchmark's.", ""]
    for task in results["tasks"]:
        lines += [f"## {task}: {HEADLINE_METRIC[task]}", "", "| N per class | source | pairs | mean ± std |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {name} | {pairs} | {mean:.3f} ± {std:.3f} |"
                  for n, name, pairs, mean, std in curve_rows(results, task)]
        lines.append("")
    if results.get("samples"):
        lines += ["## DMGR's samples, read by the independent judge", "",
                  "Per DMGR row: the share of its samples' defect windows the judge (another network, trained on a "
                  "board stream no other part reads) reads as their class and as clean, and its weakest class.", "",
                  "| N per class | source | samples | read as their class | read as clean | weakest class |",
                  "|---|---|---|---|---|---|"]
        for n, rows in results["samples"].items():
            for name, r in rows.items():
                weakest = min(r["classes"], key=r["classes"].get)
                lines.append(f"| {n} | {name} | {r['samples']} | {r['class_accuracy']:.3f} | "
                             f"{r['read_as_clean']:.3f} | {weakest} {r['classes'][weakest]:.2f} |")
        lines.append("")
    if results.get("models"):
        lines += ["## The local models (`python -m dmgr.eval models`)", "",
                  "Per N: samples nearer a training defect than half the spacing of real defects (copies), and the "
                  "median distance of a sample to its nearest training defect against that of real defects "
                  "(leave-one-out), over the classes.", "",
                  "| N per class | copies | sample -> nearest training defect | real defect -> nearest other |",
                  "|---|---|---|---|"]
        for n, checked in results["models"].items():
            classes = checked["classes"].values()
            copies, samples = sum(c["copies"] for c in classes), sum(c["samples"] for c in classes)
            median = sorted(c["median_distance"] for c in classes)[len(classes) // 2]
            unseen = sorted(c["unseen_median"] for c in classes)[len(classes) // 2]
            lines.append(f"| {n} | {copies} of {samples} | {median:.3f} | {unseen:.3f} |")
        lines.append("")
    (out / "curve.md").write_text("\n".join(lines))
    draw_curve(results).save(out / "curve.png")
    return {"markdown": out / "curve.md", "picture": out / "curve.png", "json": out / "curve.json"}


def draw_curve(results: dict, width: int = 480, height: int = 320) -> Image.Image:
    """One plot per task: the headline metric against N (log scale), a line per source family (the largest M
    for synthetic ones, thin lines for smaller M), with the std as a bar."""
    tasks = list(results["tasks"])
    picture = Image.new("RGB", (width * len(tasks), height + 40), "white")
    draw = ImageDraw.Draw(picture)
    for t, task in enumerate(tasks):
        rows = curve_rows(results, task)
        ns = list(dict.fromkeys(n for n, *_ in rows))
        x0, y0, x1, y1 = t * width + 50, 20, (t + 1) * width - 20, height - 30
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, 4), f"{task}: {HEADLINE_METRIC[task]} against real defects per class", fill=(0, 0, 0))
        for v in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = y1 - v * (y1 - y0)
            draw.line([x0 - 4, y, x0, y], fill=(0, 0, 0))
            draw.text((x0 - 34, y - 6), f"{v:.2f}", fill=(0, 0, 0))
        xs = {n: x0 + (i + 0.5) * (x1 - x0) / len(ns) for i, n in enumerate(ns)}
        for n, x in xs.items():
            draw.text((x - 10, y1 + 4), str(n), fill=(0, 0, 0))
        largest = max((family(name)[1] or 0 for _, name, *_ in rows), default=0)
        for fam in FAMILIES:
            for m in sorted({family(name)[1] for _, name, *_ in rows if family(name)[0] == fam}, key=lambda v: v or 0):
                points = [(xs[n], y1 - mean * (y1 - y0), std * (y1 - y0)) for n, name, _, mean, std in rows
                          if family(name) == (fam, m)]
                line_width = 3 if m in (None, largest) else 1
                draw.line([(x, y) for x, y, _ in points], fill=COLOURS[fam], width=line_width)
                for x, y, s in points:
                    draw.line([x, y - s, x, y + s], fill=COLOURS[fam])
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[fam])
        for k, fam in enumerate(FAMILIES):
            draw.rectangle([x0 + 10 + 105 * k, height + 8, x0 + 22 + 105 * k, height + 20], fill=COLOURS[fam])
            draw.text((x0 + 26 + 105 * k, height + 8), fam, fill=(0, 0, 0))
    return picture


def _numbers(text: str) -> tuple[int | str, ...]:
    return tuple(v if v == DEMO else int(v) for v in text.split(","))


def add_arguments(c: argparse.ArgumentParser) -> None:
    """The options of `python -m dmgr.eval curve`."""
    d = CurveSettings()
    c.add_argument("--per-class", type=_numbers, default=d.per_class, metavar="N,N",
                   help=f"real defects per class (default {','.join(map(str, d.per_class))}; '{DEMO}': the "
                   "shipped local model and make data's 1,000 per class)")
    c.add_argument("--pairs", type=_numbers, default=d.pairs, metavar="M,M",
                   help="pairs per synthetic source: samples the screen accepted (seeds are added until M are)")
    c.add_argument("--include-flagged", action="store_true",
                   help="count every written sample, flagged ones too (the export's --include-flagged)")
    c.add_argument("--balance", action=argparse.BooleanOptionalAction, default=d.balance,
                   help="DMGR-N x M holds M / 6 samples of each class, further seeds weighted to the classes short "
                   "of theirs (--no-balance: the first M by seed, whatever their classes)")
    c.add_argument("--arch", default=d.arch, help="conf/arch/ of the local model trained per N")
    c.add_argument("--local-steps", type=_numbers, default=d.local_steps, metavar="S,S",
                   help="its training steps per N, in --per-class order (the last repeats)")
    c.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps,
                   help="steps of a local model pretrained on clean patches of the defect-free boards, from which "
                   "every N's model starts (0: each from scratch)")
    c.add_argument("--tasks", type=lambda v: tuple(v.split(",")), default=d.tasks, help="binary,classes")
    c.add_argument("--seeds", type=_numbers, default=d.seeds, help="segmenter seeds")
    c.add_argument("--segment-steps", type=int, default=d.downstream.segment.steps)
    c.add_argument("--judge-steps", type=int, default=d.judge.steps,
                   help="training steps of the independent judge that reads the DMGR rows' samples (cached in --cache)")
    c.add_argument("--judge-boards", type=int, default=d.judge.per_class, help="its JUDGE-stream boards per class")
    c.add_argument("--test-defective", type=int, default=d.downstream.test_defective)
    c.add_argument("--test-clean", type=int, default=d.downstream.test_clean)
    c.add_argument("--jobs", type=int, default=d.jobs, help="segmenters trained at once (one thread each)")
    c.add_argument("--device", default=d.device, help="cpu or cuda: local models, synthesis and segmenters")
    c.add_argument("--synth-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override of every synthesis run (repeatable)")
    c.add_argument("--out", type=Path, default=Path("outputs/eval/curve"), help="where every piece is cached")


def settings_from_args(args: argparse.Namespace) -> CurveSettings:
    downstream = {"test_defective": args.test_defective, "test_clean": args.test_clean,
                  "segment": {"steps": args.segment_steps}}
    return build(CurveSettings, dict(
        per_class=args.per_class, pairs=args.pairs, include_flagged=args.include_flagged, balance=args.balance,
        arch=args.arch,
        local_steps=args.local_steps,
        pretrain_steps=args.pretrain_steps,
        tasks=args.tasks, seeds=args.seeds, jobs=args.jobs, device=args.device, synth_args=tuple(args.synth_arg),
        downstream=downstream, judge={"steps": args.judge_steps, "per_class": args.judge_boards}))


def curve_command(args: argparse.Namespace, command: str) -> dict[str, Path]:
    settings = settings_from_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_curve(settings, args.out, judge_cache=args.cache)
    return write_report(args.out, results, command)
