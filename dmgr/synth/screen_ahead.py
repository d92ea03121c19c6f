"""Train the quality screen's classifier ahead of a run (once, for every worker), or find it in the cache.
Given the job's own overrides it trains exactly the classifier that run loads; given the inputs as options, the
classifier of those inputs:

python -m dmgr.synth.screen_ahead dataset.images=/data/boards screen.data_root=data/boards seeds=0-9999
python -m dmgr.synth.screen_ahead --data-root outputs/pcb-data --images outputs/pcb-backgrounds/global
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from pydantic import Field

from dmgr import CONF_DIR, DEMO_DATA, SCREEN_CACHE
from dmgr.cli import add_settings, program, settings_from, stop_on_interrupt
from dmgr.schema import STRICT_SECTION, ConfigError, Count
from dmgr.synth.backgrounds import BackgroundError, scan_backgrounds
from dmgr.synth.config import validate
from dmgr.synth.engine import load_screen
from dmgr.synth.screen_classifier import ScreenClassifier, ScreenClassifierSettings, load_screen_classifier


@dataclass(frozen=True)
class ScreenInputs:
    """What the job would give the screen: its data root, defect-free images and dataset geometry."""

    __pydantic_config__ = STRICT_SECTION
    data_root: Annotated[Path, Field(description="holds local/<class>/ patches (screen.data_root)")] = DEMO_DATA
    images: Annotated[Path, Field(description="the defect-free images, folder or .jsonl (dataset.images)")] = Path(
        "outputs/pcb-backgrounds/global")
    classes: Annotated[str | None, Field(description="A,B,...: class names in id order "
                                                     "(default: DATA_ROOT/local/labels.json)")] = None
    image_size: Annotated[Count(8), Field(description="dataset.image_size")] = 64
    margin: Annotated[Count(0), Field(description="dataset.margin")] = 5
    scale: Annotated[float, Field(gt=0, description="dataset.scale")] = 1.0
    cache_dir: Annotated[Path, Field(description="screen.cache_dir")] = SCREEN_CACHE
    quiet: Annotated[bool, Field(description="no progress bar")] = False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.synth.screen_ahead"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the synthesis job's overrides, as given to python -m dmgr.synth: trains the classifier "
                        "that run loads (then the options below are not used)")
    add_settings(p, ScreenInputs)
    add_settings(p.add_argument_group("classifier (screen.classifier_steps, screen.area_quantile)"),
                 ScreenClassifierSettings, help={"window": "dataset.window_size", "steps": "screen.classifier_steps",
                                                "area_quantile": "screen.area_quantile"})
    return p


def _for_run(overrides: list[str]) -> ScreenClassifier:
    """The classifier of the run these job overrides give, trained or found in its screen.cache_dir."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            spec = validate(compose(config_name="synth", overrides=overrides))
        if not spec.screen.enabled:
            raise ConfigError("screen.enabled=False: this run has no screen classifier to train")
    except (ConfigError, HydraException) as exc:
        print(f"dmgr.synth.screen_ahead: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    return load_screen(spec)


@stop_on_interrupt(program("dmgr.synth.screen_ahead"))
def main(argv: list[str] | None = None) -> None:
    """Train (or find cached) the classifier the job with these inputs and settings loads; print its record."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    cli = parser()
    args = cli.parse_args(argv)
    if args.overrides:
        screen = _for_run(args.overrides)
        print(json.dumps(screen.record, indent=1))
        return
    inputs, settings = settings_from(cli, args, ScreenInputs), settings_from(cli, args, ScreenClassifierSettings)
    try:
        if inputs.classes is None:
            labels = inputs.data_root / "local" / "labels.json"
            if not labels.is_file():
                raise FileNotFoundError(f"{labels} not found: give --classes A,B,...")
            classes = tuple(json.loads(labels.read_text())["classes"])
        else:
            classes = tuple(inputs.classes.split(","))
        backgrounds = scan_backgrounds(inputs.images, inputs.image_size, settings.window, inputs.margin, inputs.scale)
        screen = load_screen_classifier(inputs.data_root.resolve(), classes, backgrounds, settings, inputs.cache_dir,
                                        progress=not inputs.quiet)
    except (BackgroundError, FileNotFoundError, ValueError) as exc:
        print(f"dmgr.synth.screen_ahead: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(screen.record, indent=1))


if __name__ == "__main__":
    main()
