"""Your own product in one command: defect-free images + defect images with masks (or VOC / COCO boxes)
-> a data root for `python -m dmgr.train` and a dataset config for `python -m dmgr.synth`.

    python -m dmgr.data.prepare --name solar --good cells/good --defects cells/defects --masks cells/masks \\
        --out data/solar --image-size 64 --window-size 16 [--scale 0.5]
    ... --defects IMAGES --voc ANNOTATIONS          (boxes: each patch's mask is its box)
    ... --defects IMAGES --coco instances.json      (polygon segmentation where present, else the box)

`--scale` is model pixels per image pixel (synthesis's dataset.scale, training's scale; default 1.0: native
pixels). Writes DATA_ROOT/global/ (the defect-free images at their own size: the global model learns from
image_size tiles of them resized by the scale, synthesis puts defects into them; images smaller than one tile
at the scale are skipped and counted), DATA_ROOT/local/<class>/NAME.png + NAME.mask.png (window_size / scale
image pixels around every defect, resized to window_size: the mask-generating local model's training set),
DATA_ROOT/prepare.json (what was done) and CONF_DIR/dataset/<name>.yaml (classes, sizes, scale,
`source: images`, `images: DATA_ROOT/global`), then prints
the commands that train both models and synthesise. Every source image is decoded by the one rule of
`dmgr.images.decode_rgb` (EXIF orientation applied; grey, 16-bit grey (by the bit depth, never clipped),
palette, CMYK to RGB; alpha dropped); what was converted is logged once with counts and kept in prepare.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from dmgr.cli import add_settings, settings_from, stop_on_interrupt
from dmgr.data.dataset import holds_tile, too_small_error
from dmgr.data.importers import _one_line, _parse_map, check_data_root, import_coco, import_voc
from dmgr.data.patches import Reader, import_masked, rescale_patches
from dmgr.images import Conversions, list_images
from dmgr.schema import STRICT_SECTION

log = logging.getLogger("dmgr.prepare")
PROJECT_CONF = Path(__file__).resolve().parents[2] / "conf"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PrepareError(ValueError):
    pass


@dataclass(frozen=True)
class PrepareSettings:
    """The command's options (one `--kebab-name` each); `scale` is the one shared with training and synthesis."""

    __pydantic_config__ = STRICT_SECTION
    name: Annotated[str, Field(description="the product's name: conf/dataset/<name>.yaml, run names")]
    good: Annotated[Path, Field(description="folder of defect-free images (searched recursively)")]
    defects: Annotated[Path, Field(description="defect images: DEFECTS/<class>/NAME.ext with --masks; the images "
                                               "of --voc / --coco")]
    out: Annotated[Path, Field(description="the data root to write (DATA_ROOT)")]
    image_size: Annotated[int, Field(description="the global model's side: its training tiles")]
    window_size: Annotated[int, Field(description="defect window / local model patch, pixels")]
    masks: Annotated[Path | None, Field(description="MASKS/<class>/NAME.png (or NAME_mask.png), non-zero = "
                                                    "defect")] = None
    voc: Annotated[Path | None, Field(description="folder of Pascal VOC .xml files (class = object name)")] = None
    coco: Annotated[Path | None, Field(description="COCO annotations .json (class = category name)")] = None
    map: Annotated[tuple[str, ...] | None, Field(description="NAME=CLASS ...: rename VOC/COCO class names")] = None
    margin: Annotated[int | None, Field(description="defect windows keep this far from the border (default "
                                                    "window/4)")] = None
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False, description=(
        "model pixels per image pixel (synthesis's dataset.scale, training's scale): tiles and defect patches "
        "cover image_size / scale and window_size / scale image pixels (1.0: native pixels)"))] = 1.0
    conf_dir: Annotated[Path, Field(description="write CONF_DIR/dataset/<name>.yaml")] = PROJECT_CONF
    force: Annotated[bool, Field(description="overwrite an existing dataset config of that name")] = False


def import_good(src: Path, dst: Path, tile: int, scale: float, conversions: Conversions) -> dict:
    """Every image under `src` (recursive) decoded, at its own size, as png (`a/b.jpg` -> `a_b.png`); images
    smaller than one tile at `scale` are skipped and counted (one warning), none usable is a PrepareError."""
    dst.mkdir(parents=True, exist_ok=True)
    reader, written, used, small, sizes = Reader(conversions), 0, set(), [], []
    for path in list_images(src):
        img = reader.rgb(path)
        if img is None:
            continue
        sizes.append(img.size)
        if not holds_tile(img.size, tile, scale):
            small.append(str(path))
            continue
        name = "_".join(path.relative_to(src).with_suffix("").parts)
        if name in used:  # a.jpg next to a.png
            name = f"{name}_{path.suffix[1:].lower()}"
        used.add(name)
        img.save(dst / f"{name}.png")
        written += 1
    if small and written:
        log.warning("%d of %d defect-free images are smaller than one %d px tile at --scale %g: skipped, e.g. %s",
                    len(small), len(sizes), tile, scale, small[0])
    if not written:
        why = too_small_error(f"in {src}", sizes, tile, scale, "--scale") if sizes else "none of its images is usable"
        raise PrepareError(f"--good={src}: {why}")
    return {"written": written, "too_small": small, "skipped": reader.skipped, "grey_converted": reader.grey,
            "conversions": reader.conversions.summary()}


def dataset_config(name: str, classes: list[str], image_size: int, window_size: int, margin: int,
                   images: Path, scale: float = PrepareSettings.scale) -> str:
    """The text of conf/dataset/<name>.yaml for this product."""
    return "\n".join([
        f"# Generated by `python -m dmgr.data.prepare` for {name}: defects into your real defect-free images.",
        "# Every dataset setting and its default (class_choice, window_choice, defects_per_image ...): DatasetSettings",
        "# in dmgr/synth/config.py; override them here or on the command line (dataset.class_choice=weighted).",
        "defaults:",
        "  - base",
        "  - _self_",
        f"name: {name}",
        f"image_size: {image_size}",
        f"window_size: {window_size}",
        f"margin: {margin}               # model pixels between a defect window and the image's edge",
        f"scale: {scale!r}             # model pixels per image pixel: the scale both models were trained at",
        f"classes: [{', '.join(classes)}]   # ids are positions: train the local model with these, in this order",
        "source: images",
        f"images: {images}",
        "",
    ])


def commands(name: str, root: Path, classes: list[str], image_size: int, window_size: int,
             conf_dir: Path, scale: float = PrepareSettings.scale) -> dict[str, str]:
    """The next steps, as shell commands."""
    train = f"python -m dmgr.train progress=true scale={scale!r}"
    search = "" if conf_dir.resolve() == PROJECT_CONF else f" 'hydra.searchpath=[file://{conf_dir.resolve()}]'"
    global_out, local_out = f"outputs/train-{name}-global", f"outputs/train-{name}-local"
    levels = next(n for n in (4, 3, 2, 1, 0) if window_size % 2**n == 0)  # the window must divide by 2^levels
    search += "" if levels == 4 else f" schedule.pyramid_levels={levels}"
    return {
        "train_global": f"{train} arch=demo_global arch.config.image_size={image_size} data_root={root} "
                        f"out_dir={global_out}",
        "train_local": f"{train} arch=demo_local_mask 'arch.classes=[{','.join(classes)}]' "
                       f"arch.config.num_classes={len(classes)} arch.config.image_size={window_size} "
                       f"data_root={root} out_dir={local_out}",
        "synth": f"python -m dmgr.synth{search} dataset={name} model=custom "
                 f"model.global.checkpoint={global_out}/ema.safetensors "
                 f"model.local.checkpoint={local_out}/ema.safetensors screen.data_root={root} extras.input=true "
                 "seeds=0-999",
        "export": "python -m dmgr.export coco outputs/<run> exports/coco",
    }


def _check(args: PrepareSettings) -> None:
    def need(ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            raise PrepareError(f"{key}={value}: {allowed}")

    need(bool(NAME.match(args.name)), "--name", args.name, "letters, digits, _ - . (it names the dataset config)")
    need(args.image_size >= 8, "--image-size", args.image_size, "must be >= 8")
    need(args.window_size >= 4, "--window-size", args.window_size, "must be >= 4")
    margin = args.margin if args.margin is not None else args.window_size // 4
    need(margin >= 0 and args.window_size + 2 * margin < args.image_size, "--window-size", args.window_size,
         f"window plus 2 x margin ({margin}) must fit inside --image-size {args.image_size}")
    need(sum(x is not None for x in (args.masks, args.voc, args.coco)) == 1, "--masks/--voc/--coco", None,
         "give exactly one source of defect labels")
    for key, folder in (("--good", args.good), ("--defects", args.defects), ("--masks", args.masks),
                        ("--voc", args.voc)):
        need(folder is None or folder.is_dir(), key, folder, "no such folder")
    need(args.coco is None or args.coco.is_file(), "--coco", args.coco, "no such file")
    try:
        check_data_root(args.out)
    except ValueError as err:
        raise PrepareError(f"--out={args.out}: {err}") from None
    config = config_path(args)
    images = f"images: {(args.out / 'global').resolve()}\n"
    need(args.force or not config.exists() or images in config.read_text(), "--name", args.name,
         f"{config} exists for other data; choose another name or --force")


def config_path(args: PrepareSettings) -> Path:
    return Path(args.conf_dir) / "dataset" / f"{args.name}.yaml"


def prepare(args: PrepareSettings) -> dict:
    """Import both sides at `args.scale`, write the dataset config; returns the summary written to
    DATA_ROOT/prepare.json."""
    _check(args)
    root, size, window, scale = args.out, args.image_size, args.window_size, args.scale
    margin = args.margin if args.margin is not None else window // 4
    conversions = Conversions()
    good = import_good(args.good, root / "global", size, scale, conversions)
    patch = max(1, round(window / scale))  # image pixels around each defect, resized to the window below
    if args.masks is not None:
        local = import_masked(args.defects, args.masks, root / "local", patch, None, conversions=conversions)
    elif args.voc is not None:
        local = import_voc(args.defects, args.voc, root / "local", _parse_map(args.map, None), patch, None,
                           conversions)
    else:
        local = import_coco(args.coco, args.defects, root / "local", patch, None, _parse_map(args.map, None),
                            conversions)
    rescale_patches(root / "local", window)
    conversions.report(log, "prepare")
    classes = [c for c in local.get("classes", sorted(local["per_class"])) if local["per_class"].get(c)]
    if not classes:
        raise PrepareError(f"--defects={args.defects}: no defect patch could be cut (see the warnings above)")
    bad = [c for c in classes if not NAME.match(c)]
    if bad:
        raise PrepareError(f"class={bad[0]!r}: class names hold letters, digits, _ - . only (rename it)")
    text = dataset_config(args.name, classes, size, window, margin, (root / "global").resolve(), scale)
    config = config_path(args)  # _check: absent, or written by prepare for this data root
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    summary = {"name": args.name, "data_root": str(root.resolve()), "dataset_config": str(config),
               "image_size": size, "window_size": window, "margin": margin, "scale": scale,
               "patch_image_pixels": patch, "classes": classes,
               "global": good, "local": local, "grey_converted": conversions.grey,
               "conversions": conversions.summary(),
               "next": commands(args.name, root, classes, size, window, Path(args.conf_dir), scale)}
    (root / "prepare.json").write_text(json.dumps(summary, indent=1))
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmgr.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, PrepareSettings)
    return p


@stop_on_interrupt("dmgr-prepare")
def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    args = settings_from(p, args, PrepareSettings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = prepare(args)
    except (PrepareError, OSError, ValueError) as err:  # bad input or a file that cannot be read: one line
        print(f"dmgr-prepare: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    print(f"{summary['global']['written']} defect-free images -> {args.out / 'global'}; "
          f"{summary['local']['patches']} defect patches of {len(summary['classes'])} classes "
          f"({', '.join(summary['classes'])}) -> {args.out / 'local'}; dataset config {summary['dataset_config']}")
    print("next:")
    for step, command in summary["next"].items():
        print(f"  # {step}\n  {command}")


if __name__ == "__main__":
    main()
