"""python -m dmgr.export {coco,yolo,anomalib} RUN OUT [--boxes]: a finished run's shards for detectors."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dmgr.cli import stop_on_interrupt
from dmgr.export import anomalib, coco, yolo
from dmgr.export.common import ExportError, export
from dmgr.schema import ConfigError

FORMATS = {"coco": coco, "yolo": yolo, "anomalib": anomalib}


@stop_on_interrupt("dmgr-export", "rerun the same command to resume the export")
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dmgr.export", description=__doc__)
    parser.add_argument("format", choices=sorted(FORMATS))
    parser.add_argument("run", help="a finished synthesis run's out_dir (shards/ and manifest.json)")
    parser.add_argument("out", help="the export folder (new, or an earlier export of the same kind to resume)")
    parser.add_argument("--boxes", action="store_true", help="yolo: detection boxes instead of polygons")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.boxes and args.format != "yolo":
        print(f"dmgr-export: error: --boxes=true: only the yolo export has boxes, not {args.format}", file=sys.stderr)
        sys.exit(2)
    module = FORMATS[args.format]
    options = {"boxes": True} if args.boxes else {}
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
