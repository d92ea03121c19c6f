"""`python -m dmgr.eval`: sample metrics of a run, or the downstream benchmark over several sources.

python -m dmgr.eval samples outputs/<run>                      -> outputs/<run>/eval/samples.{md,json,png}
python -m dmgr.eval masks outputs/<run>                        -> outputs/<run>/eval/mask-areas.{md,json}
python -m dmgr.eval downstream --run fast=outputs/<run> --run paper=outputs/<run2> --out outputs/eval/downstream
python -m dmgr.eval curve --per-class 4,16,64,256 --pairs 64,512    -> outputs/eval/curve/curve.{md,json,png}: every
                                                               source learns from the same N defects per class
python -m dmgr.eval yolo --curve outputs/eval/curve            -> OUT/yolo/yolo.json: YOLO-seg mask mAP of real-N and
                                                               real-N + DMGR-N (needs make detect-env)
python -m dmgr.eval downstream --task classes --run real=outputs/<run> -> OUT/downstream-classes.{md,json}: per-class
                                                               AP and IoU of a 7-class segmenter per source
python -m dmgr.eval models --local CKPT --data-root DATA_ROOT -> CKPT's folder/models-check/: per class, samples
                                                               beside their nearest training patches; memorisation
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from dmgr import EVAL_CACHE
from dmgr.cli import program, stop_on_interrupt
from dmgr.eval import detector, fewshot
from dmgr.eval.classifier import ClassifierSettings, load_or_train
from dmgr.eval.downstream import DownstreamSettings, build_sources, run_benchmark
from dmgr.eval.mask_areas import REAL_PER_CLASS, write_areas
from dmgr.eval.report import write_class_report, write_downstream_report, write_sample_report
from dmgr.eval.samples import quality_block, real_reference, sample_metrics, screen_agreement
from dmgr.eval.segment import SegmentSettings
from dmgr.eval.shards import first_sample, frame_geometry, geometry, read_run
from dmgr.models.classifier import PatchClassifier
from dmgr.sampler.masks import MASK_METHODS
from dmgr.schema import build
from dmgr.shards.manifest import write_json_atomic

log = logging.getLogger("dmgr.eval")


def evaluate_samples(
    run_dir: Path,
    out_dir: Path | None = None,
    cache: Path = EVAL_CACHE,
    classifier: ClassifierSettings | None = None,
    progress: bool = True,
) -> dict:
    """Sample metrics of a run, written to out_dir (default RUN/eval); returns the metric sets.

    The classifier's image and window sizes are the run's, whatever `classifier` says."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    first = first_sample(run_dir)
    size, window = geometry(first)
    settings = replace(classifier or ClassifierSettings(), image_size=size, window=window)
    model, record = load_or_train(settings, cache, progress)
    optional = [k for k in ("paste.png", "twin.png") if k in first]
    synth = read_run(run_dir, images=tuple(optional))
    real = real_reference(settings.image_size, settings.window)
    sets = sample_metrics(synth, model, real)
    screen = run_screen_classifier(run_dir)
    if screen is not None:
        sets["dmgr"]["screen_agreement"] = screen_agreement(model, screen, synth)
        log.info("the judge agrees with the run's screen classifier on %.3f of %d windows",
                 sets["dmgr"]["screen_agreement"]["agreement"], len(synth))
    written = write_sample_report(Path(out_dir) if out_dir else run_dir / "eval", run_dir, sets, record)
    log.info("sample metrics of %d images in %.0f s: %s", len(synth), time.perf_counter() - start, written["markdown"])
    return sets


def run_screen_classifier(run_dir: Path) -> torch.nn.Module | None:
    """The quality screen's classifier a screened run used (from its cache, by the key in the run's manifest),
    or None: an unscreened run, or a cache that no longer holds it. Only read to report agreement."""
    config = json.loads((Path(run_dir) / "manifest.json").read_text()).get("config", {})
    screen = config.get("screen") or {}
    if not screen.get("enabled") or not screen.get("classifier_key"):
        return None
    path = Path(screen["cache_dir"]) / f"screen-classifier-{screen['classifier_key']}.safetensors"
    if not path.exists():
        log.warning("no screen agreement: %s is gone from the screen's cache", path)
        return None
    model = PatchClassifier(len(config["dataset"]["classes"]) + 1)
    model.load_state_dict(load_file(path))
    return model


def record_quality(run_dir: Path, sets: dict) -> None:
    """Add the run's sample metrics to its manifest (`quality`), where the sweep report finds them."""
    path = Path(run_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["quality"] = quality_block(sets)
    write_json_atomic(path, manifest)


def _named_run(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--run wants NAME=RUN_DIR (e.g. fast=outputs/run), got {text!r}")
    if not (Path(path) / "shards").is_dir():
        raise argparse.ArgumentTypeError(f"--run {text}: {path}/shards does not exist; synthesise it first")
    return name, Path(path)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds wants distinct integers, got {text!r}")
    return seeds


def _panel(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--panel wants WxH in pixels (e.g. 160x112), got {text!r}") from None
    if min(width, height) < 64:
        raise argparse.ArgumentTypeError(f"--panel {text}: W and H must be at least one 64 px board")
    return width, height


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program("dmgr.eval"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--cache", type=Path, default=EVAL_CACHE, help="where the patch classifier is cached")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("samples", parents=[common], help="sample metrics of one synthesis run")
    s.add_argument("run_dir", type=Path, help="a synthesis run directory (holds shards/)")
    s.add_argument("--out", type=Path, default=None, help="report folder (default RUN_DIR/eval)")
    s.add_argument("--record", action="store_true", help="also write the metrics into RUN_DIR/manifest.json quality")
    s.add_argument("--classifier-steps", type=int, default=ClassifierSettings.steps)
    s.add_argument(
        "--classifier-boards",
        type=int,
        default=ClassifierSettings.per_class,
        help="real boards per class the patch classifier trains on",
    )
    m = sub.add_parser("masks", parents=[common], help="per class, a run's mask areas against real defects'")
    m.add_argument("run_dir", type=Path, help="a synthesis run directory (holds shards/)")
    m.add_argument("--out", type=Path, default=None, help="report folder (default RUN_DIR/eval)")
    m.add_argument("--real-per-class", type=int, default=REAL_PER_CLASS,
                   help=f"real defects rendered per class (default {REAL_PER_CLASS})")
    c = sub.add_parser("models", parents=[common], help="a local model's samples against its training patches: "
                       "are they copies? (dmgr/eval/models.py)")
    c.add_argument("--local", type=Path, required=True, help="the local model's checkpoint (ema.safetensors)")
    c.add_argument("--data-root", type=Path, required=True, help="the data root it was trained on")
    c.add_argument("--out", type=Path, default=None, help="report folder (default: the checkpoint's models-check/)")
    c.add_argument("--n", type=int, default=16, help="samples per class")
    c.add_argument("--steps", type=int, default=25, help="DDIM steps per sample")
    c.add_argument("--device", default="cpu", help="cpu or cuda")
    curve = sub.add_parser("curve", parents=[common], help="the few-defect curve: every source learns from the same "
                           "N real defects per class (dmgr/eval/fewshot.py)")
    fewshot.add_arguments(curve)
    yolo = sub.add_parser("yolo", parents=[common], help="a real detector as a second judge of the curve: YOLO "
                          "segmentation on real-N and real-N + DMGR-N exports (dmgr/eval/detector.py)")
    detector.add_arguments(yolo)
    d = sub.add_parser(
        "downstream", parents=[common], help="train the same segmenter on each source, test on real boards"
    )
    d.add_argument(
        "--run",
        type=_named_run,
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="a DMGR run (synthesised with extras.masks=true; the first with extras.paste=true too)",
    )
    d.add_argument("--out", type=Path, default=Path("outputs/eval/downstream"), help="report folder")
    d.add_argument(
        "--task",
        choices=("binary", "classes"),
        default=SegmentSettings.task,
        help="binary: defect pixels (downstream.md); classes: background + 6 defect classes, per-class AP and "
        "IoU (downstream-classes.md)",
    )
    d.add_argument("--n", type=int, default=DownstreamSettings.n, help="training pairs per source")
    d.add_argument("--real-small", type=int, default=DownstreamSettings.real_small, help="the user's few real images")
    d.add_argument("--seeds", type=_seeds, default=DownstreamSettings.seeds, help="segmenter seeds, e.g. 0,1,2")
    d.add_argument("--steps", type=int, default=SegmentSettings.steps, help="training steps per model")
    d.add_argument("--batch-size", type=int, default=SegmentSettings.batch_size)
    d.add_argument("--width", type=int, default=SegmentSettings.width, help="U-Net base channels (a multiple of 4)")
    d.add_argument(
        "--crop",
        type=lambda v: None if v == "none" else int(v),
        default=SegmentSettings.crop,
        help="side of the random square crop each training pair is cut to per step (a multiple of 8; frames no "
        f"larger train whole; none: whole frames; default {SegmentSettings.crop})",
    )
    d.add_argument("--test-defective", type=int, default=DownstreamSettings.test_defective)
    d.add_argument("--test-clean", type=int, default=DownstreamSettings.test_clean)
    d.add_argument(
        "--device", default="cpu", help="where segmenters train: cpu (default) or cuda (cached apart from cpu)"
    )
    d.add_argument("--jobs", type=int, default=1, help="models trained at once (processes of one thread)")
    d.add_argument(
        "--panel",
        type=_panel,
        default=None,
        metavar="WxH",
        help="frame size of the sources and test boards: W x H panels of 64 px boards (default: the first run's "
        "frame size; without a run, one 64 px board per frame)",
    )
    d.add_argument(
        "--mask-default",
        choices=MASK_METHODS,
        default=None,
        help="mask of the real+DMGR mix (default: the mask the mixing run wrote as mask.png)",
    )
    d.add_argument(
        "--only", type=lambda v: v.split(","), default=None, metavar="A,B", help="train only these sources"
    )
    d.add_argument("--no-cache", action="store_true", help="retrain every model (default: reuse OUT/models/)")
    d.add_argument("--mix", default=None, metavar="NAME", help="the run mixed with real-small (default: the first)")
    return p


def mask_winners(results: dict, metric: str = "pixel_ap") -> dict[str, dict]:
    """Per DMGR run: the mask method with the best mean `metric` (and its margin), under the key `metric`."""
    winners = {}
    runs = {name.split("/")[0] for name in results["sources"] if name.startswith("dmgr-")}
    for run in sorted(runs):
        scores = {
            m: results["sources"][f"{run}/{m}"][metric]["mean"]
            for m in MASK_METHODS
            if f"{run}/{m}" in results["sources"]
        }
        if len(scores) > 1:
            best = max(scores, key=scores.get)
            winners[run] = {"best": best, metric: scores}
    return winners


@stop_on_interrupt("dmgr-eval")
def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dmgr-eval: error: {message}", file=sys.stderr)
        sys.exit(2)


def _main(argv: list[str] | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    args = parser().parse_args(argv)
    progress = not args.quiet
    if args.command == "samples":
        if not (args.run_dir / "shards").is_dir():
            parser().error(f"run_dir: {args.run_dir}/shards does not exist; give a synthesis run directory")
        classifier = build(ClassifierSettings, dict(per_class=args.classifier_boards, steps=args.classifier_steps))
        sets = evaluate_samples(args.run_dir, args.out, args.cache, classifier, progress=progress)
        if args.record:
            record_quality(args.run_dir, sets)
        print(json.dumps(quality_block(sets)))
        return
    if args.command == "models":
        from dmgr.eval.models import run as check_models

        report = check_models(args.local, args.data_root, args.out, args.n, args.steps, device=args.device)
        print(report["verdict"])
        return
    command = "python -m dmgr.eval " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.command == "yolo":
        print(json.dumps(detector.yolo_command(args)["per_class"], indent=1))
        return
    if args.command == "curve":
        for name, path in fewshot.curve_command(args, command).items():
            print(f"{name}: {path}")
        return
    if args.command == "masks":
        if not (args.run_dir / "shards").is_dir():
            parser().error(f"run_dir: {args.run_dir}/shards does not exist; give a synthesis run directory")
        if args.real_per_class < 1:
            parser().error(f"--real-per-class must be >= 1, got {args.real_per_class}")
        size, _ = geometry(first_sample(args.run_dir))
        written = write_areas(args.run_dir, args.out or args.run_dir / "eval", size, args.real_per_class)
        print(written["markdown"].read_text())
        return
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        parser().error(f"--device {args.device}: use cpu, or cuda where a CUDA device is visible")
    if args.jobs < 1:
        parser().error(f"--jobs must be >= 1, got {args.jobs}")
    settings = build(DownstreamSettings, dict(
        n=args.n, real_small=args.real_small, seeds=args.seeds, test_defective=args.test_defective,
        test_clean=args.test_clean,
        segment=dict(steps=args.steps, batch_size=args.batch_size, width=args.width, device=args.device,
                     task=args.task, crop=args.crop),
    ))
    runs = dict(args.run)
    if args.panel is not None:
        settings = replace(settings, panel=args.panel)
    if runs:
        first_run = next(iter(runs.values()))
        size, panel, window = frame_geometry(first_sample(first_run))
        if args.panel is not None and args.panel != (panel or (size, size)):
            w, h = panel or (size, size)
            raise ValueError(f"--panel {args.panel[0]}x{args.panel[1]}: {first_run} holds {w}x{h} frames; "
                             "leave --panel out to use the run's size")
        settings = replace(settings, image_size=size, window=window, panel=panel)
    rendered = ("cut-paste", "perlin", f"real-{settings.n}")
    skip = tuple(name for name in rendered if args.only and name not in args.only)
    sources = build_sources(runs, settings, args.mask_default, args.mix, skip)
    if args.only:
        unknown = sorted(set(args.only) - set(sources))
        if unknown:
            raise ValueError(f"--only {','.join(unknown)}: no such source (sources: {', '.join(sources)})")
        sources = {name: boards for name, boards in sources.items() if name in args.only}
    results = run_benchmark(sources, settings, progress, args.jobs, None if args.no_cache else args.out / "models")
    classes = args.task == "classes"
    results["mask_winners"] = mask_winners(results, "map" if classes else "pixel_ap")
    written = (write_class_report if classes else write_downstream_report)(args.out, results, command, sources)
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
