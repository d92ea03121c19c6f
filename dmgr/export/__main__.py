"""python -m dmgr.export {coco,yolo,anomalib} RUN OUT [options]: a finished run's shards for detectors, split
into train and val by seed, flagged samples left out, the user's real labelled images merged in."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from dmgr.cli import add_settings, program, settings_from, stop_on_interrupt, usage_error
from dmgr.export import anomalib, coco, yolo
from dmgr.export.common import ExportError, export, open_run
from dmgr.export.real import real_items, scan_real
from dmgr.export.tiles import tiled
from dmgr.schema import STRICT_SECTION, ConfigError, Flag, NonNegative

FORMATS = {"coco": coco, "yolo": yolo, "anomalib": anomalib}
STRIDE = 32  # Ultralytics' largest stride: its imgsz is a multiple of it


@dataclass(frozen=True)
class ExportOptions:
    """The options of `python -m dmgr.export` (an export's options: a resumed export must be given the same)."""

    __pydantic_config__ = STRICT_SECTION
    boxes: Annotated[Flag, Field(description="yolo: detection boxes instead of polygons")] = False
    val: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False, description=(
        "the share of seeds in the validation split, chosen by a hash of the seed (a run that grows keeps "
        "every seed in its split)"))] = 0.1
    include_flagged: Annotated[Flag, Field(description=(
        "keep the samples written flagged (screen.flagged: failed every screen attempt; empty_mask.flagged)"))] = False
    add_real: Annotated[Path | None, Field(description=(
        "your labelled images: images/<class>/ + masks/<class>/, VOC .xml files and their images, or a COCO "
        ".json; into the train split"))] = None
    real_as_val: Annotated[Flag, Field(description="--add-real's images into the val split instead")] = False
    tile: Annotated[int | None, Field(ge=STRIDE, description=(
        "yolo, coco: frames larger than TILE x TILE become tiles around every defect (a multiple of 32; "
        "train with imgsz=TILE)"))] = None
    tile_background: Annotated[NonNegative, Field(description=(
        "with --tile: defect-free tiles per defect tile, from the frame's grid"))] = 0.5


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.export"), description=__doc__)
    p.add_argument("format", choices=sorted(FORMATS))
    p.add_argument("run", help="a finished synthesis run's out_dir (shards/ and manifest.json)")
    p.add_argument("out", help="the export folder (new, or an earlier export of the same kind to resume)")
    add_settings(p, ExportOptions)
    return p


def check(chosen: ExportOptions, fmt: str, prog: str) -> None:
    """Options that only make sense together, refused with one line naming the option."""
    if chosen.boxes and fmt != "yolo":
        usage_error(prog, f"--boxes=true: only the yolo export has boxes, not {fmt}")
    if chosen.real_as_val and chosen.add_real is None:
        usage_error(prog, "--real-as-val: give the images with --add-real PATH")
    if chosen.tile is not None and fmt == "anomalib":
        usage_error(prog, f"--tile={chosen.tile}: yolo and coco only (anomalib tiles its own input)")
    if chosen.tile is not None and chosen.tile % STRIDE:
        usage_error(prog, f"--tile={chosen.tile}: a multiple of {STRIDE} (Ultralytics' stride), e.g. "
                          f"{chosen.tile // STRIDE * STRIDE or STRIDE} or {(chosen.tile // STRIDE + 1) * STRIDE}")


def export_options(chosen: ExportOptions) -> dict:
    """The options as export.json records them (a rerun must match them)."""
    options = {k: v for k, v in asdict(chosen).items() if v is not None and v is not False}
    if chosen.add_real is not None:
        options["add_real"] = str(chosen.add_real.resolve())
    if chosen.tile is None:
        options.pop("tile_background")
    return options


@stop_on_interrupt("dmgr-export", "rerun the same command to resume the export")
def main(argv: list[str] | None = None) -> dict:
    cli = parser()
    args = cli.parse_args(argv)
    chosen = settings_from(cli, args, ExportOptions)
    check(chosen, args.format, cli.prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    module, options = FORMATS[args.format], export_options(chosen)
    try:
        real = None
        if chosen.add_real is not None:
            run = open_run(args.run)
            images = scan_real(chosen.add_real, run.classes)  # classes checked before anything is written
            split = "val" if chosen.real_as_val else "train"
            real = (t for item in real_items(images, chosen.add_real, run.classes, split) for t in tiled(item, options))
        summary = export(args.run, args.out, args.format, options, module, real)
    except (ExportError, ConfigError, OSError) as err:
        print(f"dmgr-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: summary[k] for k in ("format", "samples", "counts", "this_run")}, indent=1))
    counts = summary["counts"]
    if (counts["images"]["val"] if "images" in counts else counts["normal_val"]) == 0:
        print(f"dmgr-export: warning: the val split is empty ({args.out}): raise --val or add seeds", file=sys.stderr)
    return summary


def script(argv: list[str] | None = None) -> None:
    """The dmgr-export console script: main without its summary, which a console script would take for an exit
    status."""
    main(argv)


if __name__ == "__main__":
    main()
