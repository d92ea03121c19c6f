"""python -m dmgr.export {coco,yolo,anomalib} RUN OUT [--boxes]: a finished run's shards for detectors."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from dmgr.cli import add_settings, settings_from, stop_on_interrupt
from dmgr.export import anomalib, coco, yolo
from dmgr.export.common import ExportError, export
from dmgr.schema import STRICT_SECTION, ConfigError, Flag

FORMATS = {"coco": coco, "yolo": yolo, "anomalib": anomalib}


@dataclass(frozen=True)
class ExportOptions:
    """The options of `python -m dmgr.export` (an export's options: a resumed export must be given the same)."""

    __pydantic_config__ = STRICT_SECTION
    boxes: Annotated[Flag, Field(description="yolo: detection boxes instead of polygons")] = False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmgr.export", description=__doc__)
    p.add_argument("format", choices=sorted(FORMATS))
    p.add_argument("run", help="a finished synthesis run's out_dir (shards/ and manifest.json)")
    p.add_argument("out", help="the export folder (new, or an earlier export of the same kind to resume)")
    add_settings(p, ExportOptions)
    return p


@stop_on_interrupt("dmgr-export", "rerun the same command to resume the export")
def main(argv: list[str] | None = None) -> dict:
    cli = parser()
    args = cli.parse_args(argv)
    chosen = settings_from(cli, args, ExportOptions)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if chosen.boxes and args.format != "yolo":
        print(f"dmgr-export: error: --boxes=true: only the yolo export has boxes, not {args.format}", file=sys.stderr)
        sys.exit(2)
    module = FORMATS[args.format]
    options = {"boxes": True} if chosen.boxes else {}
    try:
        summary = export(args.run, args.out, args.format, options, module.write_sample, module.finish,
                         getattr(module, "prepare", None))
    except (ExportError, ConfigError, OSError) as err:
        print(f"dmgr-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: summary[k] for k in ("format", "counts", "this_run")}, indent=1))
    return summary


if __name__ == "__main__":
    main()
