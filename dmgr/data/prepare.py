"""Your own product in one command: defect-free images + defect images with masks (or VOC / COCO boxes)
-> a data root for `python -m dmgr.train` and a dataset config for `python -m dmgr.synth`.

    python -m dmgr.data.prepare --name solar --good cells/good --defects cells/defects --masks cells/masks \\
        --out data/solar [--image-size 128 --window-size 32 --scale 0.3]
    ... --defects IMAGES --voc ANNOTATIONS          (boxes: each patch's mask is its box)
    ... --defects IMAGES --coco instances.json      (polygon segmentation where present, else the box)

`--scale` is model pixels per image pixel (synthesis's dataset.scale, training's scale). Sizes left out come
from the size recipe (`size_recipe`): the defects' extents (their masks' or boxes' bounding boxes) and the
frames' sizes give window_size (the defects fit with margin), scale (a typical defect spans enough model
pixels) and image_size (context around a window); the reasons are printed, the sizes and a step budget
written. The architecture presets (conf/arch/) are chosen by the sizes.

Writes DATA_ROOT/global/ (the defect-free images at their own size: the global model learns from image_size
tiles of them resized by the scale, synthesis puts defects into them; images smaller than one tile at the
scale are skipped and counted), DATA_ROOT/local/<class>/NAME.png + NAME.mask.png (window_size / scale image
pixels around every defect, resized to window_size: the mask-generating local model's training set),
DATA_ROOT/prepare.json (what was done) and CONF_DIR/dataset/<name>.yaml (default CONF_DIR: DATA_ROOT/conf;
classes, sizes, scale, `source: images`, `images: DATA_ROOT/global`, relative to the working directory when
the data root lies under it, like every printed command), then prints the commands that train both models
and synthesise. Every source image is decoded by the one rule of `dmgr.images.decode_rgb` (EXIF orientation
applied; grey, 16-bit grey (by the bit depth, never clipped), palette, CMYK to RGB; alpha dropped); what was
converted is logged once with counts and kept in prepare.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml
from PIL import Image
from pydantic import Field

from dmgr import CONF_DIR
from dmgr.cli import add_settings, program, settings_from, stop_on_interrupt
from dmgr.data.dataset import holds_tile, too_small_error
from dmgr.data.importers import _one_line, _parse_map, check_data_root, import_coco, import_voc
from dmgr.data.patches import Reader, import_masked, rescale_patches
from dmgr.images import Conversions, list_images
from dmgr.schema import STRICT_SECTION

log = logging.getLogger("dmgr.prepare")
PROJECT_CONF = Path(CONF_DIR).resolve()  # the package's own configs (arch presets), installed or in a clone
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WINDOWS = (16, 32, 64)  # the local presets' sides
GLOBAL_ARCH = {64: ("demo_global", 16), 128: ("global_128", 16), 256: ("global_256", 8)}  # side: (arch, batch)
LOCAL_ARCH = {16: ("demo_local_mask", 32), 32: ("local_mask_32", 32), 64: ("local_mask_64", 32)}
FIT = 0.75  # the largest defects span at most this share of the window: the rest is margin (context)
MIN_SPAN = 8  # model pixels a median defect should span: fewer and its shape is a few pixels
STEPS_GLOBAL, STEPS_LOCAL = 3000, 5500  # the demo's budgets (64 px global; 16 px local: 4,000 + 1,500)


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
    image_size: Annotated[int | None, Field(description="the global model's side: its training tiles (default: "
                                                       "the size recipe's)")] = None
    window_size: Annotated[int | None, Field(description="defect window / local model patch, pixels (default: the "
                                                        "size recipe's)")] = None
    masks: Annotated[Path | None, Field(description="MASKS/<class>/NAME.png (or NAME_mask.png), non-zero = "
                                                    "defect")] = None
    voc: Annotated[Path | None, Field(description="folder of Pascal VOC .xml files (class = object name)")] = None
    coco: Annotated[Path | None, Field(description="COCO annotations .json (class = category name)")] = None
    map: Annotated[tuple[str, ...] | None, Field(description="NAME=CLASS ...: rename VOC/COCO class names")] = None
    margin: Annotated[int | None, Field(description="defect windows keep this far from the border (default "
                                                    "window/4)")] = None
    scale: Annotated[float | None, Field(gt=0, allow_inf_nan=False, description=(
        "model pixels per image pixel (synthesis's dataset.scale, training's scale): tiles and defect patches "
        "cover image_size / scale and window_size / scale image pixels (1.0: native pixels; default: the size "
        "recipe's)"))] = None
    conf_dir: Annotated[Path | None, Field(description="write CONF_DIR/dataset/<name>.yaml (default: "
                                                       "DATA_ROOT/conf)")] = None
    force: Annotated[bool, Field(description="overwrite an existing dataset config of that name")] = False


@dataclass(frozen=True)
class SizeRecipe:
    """Sizes for a product and why: window_size, image_size, scale and the two models' step budgets."""

    window_size: int
    image_size: int
    scale: float
    steps_global: int
    steps_local: int
    why: list[str] = field(default_factory=list)


def round_down(value: float) -> float:
    """`value` rounded down to two significant digits (0.1234 -> 0.12): a scale that never exceeds its bound."""
    unit = 10.0 ** (math.floor(math.log10(value)) - 1)
    return round(math.floor(value / unit + 1e-9) * unit, 10)


def size_recipe(extents: list[float], frame_side: int, window_size: int | None = None, scale: float | None = None,
                image_size: int | None = None) -> SizeRecipe:
    """Sizes from the defects' extents (the longer side of each defect's box, image pixels) and the smallest
    frame side (image pixels); given sizes are kept. The window is the smallest preset side (16, 32, 64) in
    which the 95th-percentile defect spans at most 3/4 (FIT) at a scale where the median defect spans at least
    MIN_SPAN model pixels; the scale the largest (up to 1: never upsampled) that keeps that fit; image_size 4x
    the window (the demo's context), within the smallest frame at the scale."""
    big = sorted(extents)[min(len(extents) - 1, math.ceil(0.95 * len(extents)) - 1)]
    median = statistics.median(extents)
    why = [f"defects: {len(extents)}, longer side {min(extents):g}-{max(extents):g} px (median {median:.0f}, 95th "
           f"percentile {big:.0f}); frames: smallest side {frame_side} px"]

    def fitting(w: int) -> float:
        return scale if scale is not None else min(1.0, round_down(FIT * w / big))

    if window_size is None:
        fits = [w for w in WINDOWS if median * fitting(w) >= MIN_SPAN and big * fitting(w) <= FIT * w + 1e-9]
        window_size = fits[0] if fits else WINDOWS[-1]
        tried = [f"{w} px: scale {fitting(w):g}, median defect {median * fitting(w):.1f} model px" for w in WINDOWS
                 if w < window_size]
        why.append(f"window_size {window_size}: the smallest window in which the 95th-percentile defect spans at "
                   f"most {FIT:.0%} (the rest is margin) while the median defect spans >= {MIN_SPAN} model px"
                   + (f" (smaller: {'; '.join(tried)})" if tried else ""))
    if scale is None:
        scale = fitting(window_size)
        why.append(f"scale {scale:g}: the 95th-percentile defect ({big:.0f} px) spans {big * scale:.1f} of the "
                   f"{window_size} px window, the median {median * scale:.1f} model px" + (
                       "; at most 1.0 (never upsampled)" if scale == 1.0 else ""))
    if median * scale < MIN_SPAN:
        why.append(f"warning: the median defect spans {median * scale:.1f} model px at scale {scale:g} (< "
                   f"{MIN_SPAN}): its shape is a few pixels; a larger --window-size keeps more")
    if big * scale > window_size:
        why.append(f"warning: defects above {window_size / scale:.0f} px are larger than the window: their "
                   "patches show their centre")
    room = int(frame_side * scale)
    if image_size is None:
        sides = [s for s in GLOBAL_ARCH if s <= min(4 * window_size, room) and s > 1.5 * window_size]
        image_size = sides[-1] if sides else min(room, 4 * window_size)
        why.append(f"image_size {image_size}: {image_size // window_size}x the window (the context around each "
                   f"defect; 4x as the demo's 64 / 16), within the smallest frame at the scale ({room} px)")
    steps_global = STEPS_GLOBAL * max(1, image_size // 64)
    why.append(f"steps: global {steps_global:,} ({STEPS_GLOBAL:,} per 64 px of image_size, the demo's), local "
               f"{STEPS_LOCAL:,} (the demo's 4,000 + 1,500); stop earlier when held_out.jsonl's held-out loss "
               "rises, and check `python -m dmgr.eval models` before synthesis")
    return SizeRecipe(window_size, image_size, scale, steps_global, STEPS_LOCAL, why)


def defect_extents(args: PrepareSettings, conversions: Conversions) -> list[float]:
    """The longer side (image pixels) of every defect's box, as the import below measures it."""
    with tempfile.TemporaryDirectory() as tmp:
        local = import_defects(args, Path(tmp), 1, Conversions())
        items = json.loads((Path(tmp) / "labels.json").read_text())["items"] if local["patches"] else []
    return [max(b[2] - b[0], b[3] - b[1]) for b in (item["box"] for item in items)]


def frame_side(folder: Path) -> int:
    """The smallest side of the images under `folder` (headers only; the smaller side is rotation-free)."""
    sides = []
    for path in list_images(folder):
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except OSError:
            continue
    if not sides:
        raise PrepareError(f"--good={folder}: no readable images")
    return min(sides)


def import_defects(args: PrepareSettings, dst: Path, patch: int, conversions: Conversions) -> dict:
    """The defect patches of `patch` image pixels from --masks, --voc or --coco into dst."""
    if args.masks is not None:
        return import_masked(args.defects, args.masks, dst, patch, None, conversions=conversions)
    if args.voc is not None:
        return import_voc(args.defects, args.voc, dst, _parse_map(args.map, None), patch, None, conversions)
    return import_coco(args.coco, args.defects, dst, patch, None, _parse_map(args.map, None), conversions)


def arch_for(role: str, size: int) -> tuple[str, list[str], int]:
    """The preset for a side (conf/arch/), the overrides that fit it to another side (attention at its levels
    of 8 to 32 px, else its deepest), and its batch size."""
    presets = GLOBAL_ARCH if role == "global" else LOCAL_ARCH
    if size in presets:
        return presets[size][0], [], presets[size][1]
    nearest = min(presets, key=lambda s: (abs(math.log2(size / s)), s))
    name, batch = presets[nearest]
    config = yaml.safe_load((PROJECT_CONF / "arch" / f"{name}.yaml").read_text())["config"]
    depth = len(str(config["channel_mult"]).split(","))
    levels = [size // 2**k for k in range(depth) if size % 2**k == 0]
    attention = [side for side in levels if 8 <= side <= 32] or levels[-1:]
    return name, [f"arch.config.image_size={size}",
                  f"arch.config.attention_resolutions='{','.join(map(str, attention))}'"], batch


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
                   images: Path, scale: float = 1.0, recipe: SizeRecipe | None = None) -> str:
    """The text of conf/dataset/<name>.yaml for this product (with the size recipe's reasons and step budget
    as comments)."""
    notes = [f"#   {line}" for line in recipe.why] if recipe else []
    return "\n".join([
        f"# Generated by `python -m dmgr.data.prepare` for {name}: defects into your real defect-free images.",
        *(["# Sizes from the size recipe:", *notes,
           f"# Step budget: global steps={recipe.steps_global}, local steps={recipe.steps_local}"] if recipe else []),
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


def as_given(path: Path) -> str:
    """`path` relative to the working directory when it lies under it (as the printed commands run), else
    absolute: a data root that moves with its project keeps working."""
    path = path.resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def commands(name: str, root: Path, classes: list[str], image_size: int, window_size: int,
             conf_dir: Path, scale: float = 1.0, steps: tuple[int, int] | None = None) -> dict[str, str]:
    """The next steps, as shell commands: the presets for the sizes, their batch sizes and the step budget."""
    train = f"python -m dmgr.train progress=true scale={scale!r}"
    search = "" if conf_dir.resolve() == PROJECT_CONF else f" 'hydra.searchpath=[file://{as_given(conf_dir)}]'"
    global_out, local_out = f"outputs/train-{name}-global", f"outputs/train-{name}-local"
    levels = next(n for n in (4, 3, 2, 1, 0) if window_size % 2**n == 0)  # the window must divide by 2^levels
    search += "" if levels == 4 else f" schedule.pyramid_levels={levels}"
    global_arch, global_fit, global_batch = arch_for("global", image_size)
    local_arch, local_fit, local_batch = arch_for("local", window_size)
    steps_global, steps_local = (f" steps={n}" for n in steps) if steps else ("", "")
    return {
        "train_global": f"{train} arch={global_arch} {' '.join(global_fit + [''])}data_root={root} "
                        f"batch_size={global_batch}{steps_global} out_dir={global_out}",
        "train_local": f"{train} arch={local_arch} {' '.join(local_fit + [''])}'arch.classes=[{','.join(classes)}]' "
                       f"arch.config.num_classes={len(classes)} data_root={root} batch_size={local_batch}"
                       f"{steps_local} out_dir={local_out}",
        "judge_local": f"python -m dmgr.eval models --local {local_out}/ema.safetensors --data-root {root}",
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
    need(args.image_size is None or args.image_size >= 8, "--image-size", args.image_size, "must be >= 8")
    need(args.window_size is None or args.window_size >= 4, "--window-size", args.window_size, "must be >= 4")
    check_sizes(args.image_size, args.window_size, args.margin)
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
    images = f"images: {as_given(args.out / 'global')}\n"
    need(args.force or not config.exists() or images in config.read_text(), "--name", args.name,
         f"{config} exists for other data; choose another name or --force")


def check_sizes(image_size: int | None, window_size: int | None, margin: int | None) -> None:
    """The window plus its margins inside the image (once both sizes are known)."""
    if image_size is None or window_size is None:
        return
    margin = margin if margin is not None else window_size // 4
    if margin < 0 or window_size + 2 * margin >= image_size:
        raise PrepareError(f"--window-size={window_size}: window plus 2 x margin ({margin}) must fit inside "
                           f"--image-size {image_size}")


def conf_dir(args: PrepareSettings) -> Path:
    return Path(args.conf_dir) if args.conf_dir is not None else args.out / "conf"


def config_path(args: PrepareSettings) -> Path:
    return conf_dir(args) / "dataset" / f"{args.name}.yaml"


def prepare(args: PrepareSettings) -> dict:
    """Import both sides at `args.scale`, write the dataset config; returns the summary written to
    DATA_ROOT/prepare.json."""
    _check(args)
    recipe = None
    if None in (args.image_size, args.window_size, args.scale):
        extents = defect_extents(args, Conversions())
        if not extents:
            raise PrepareError(f"--defects={args.defects}: no defect could be measured (see the warnings above)")
        recipe = size_recipe(extents, frame_side(args.good), args.window_size, args.scale, args.image_size)
        check_sizes(recipe.image_size, recipe.window_size, args.margin)
        for line in recipe.why:
            log.info("size recipe: %s", line)
    root = args.out
    size = args.image_size or recipe.image_size
    window = args.window_size or recipe.window_size
    scale = args.scale if args.scale is not None else recipe.scale
    margin = args.margin if args.margin is not None else window // 4
    conversions = Conversions()
    good = import_good(args.good, root / "global", size, scale, conversions)
    patch = max(1, round(window / scale))  # image pixels around each defect, resized to the window below
    local = import_defects(args, root / "local", patch, conversions)
    rescale_patches(root / "local", window)
    conversions.report(log, "prepare")
    classes = [c for c in local.get("classes", sorted(local["per_class"])) if local["per_class"].get(c)]
    if not classes:
        raise PrepareError(f"--defects={args.defects}: no defect patch could be cut (see the warnings above)")
    bad = [c for c in classes if not NAME.match(c)]
    if bad:
        raise PrepareError(f"class={bad[0]!r}: class names hold letters, digits, _ - . only (rename it)")
    text = dataset_config(args.name, classes, size, window, margin, as_given(root / "global"), scale, recipe)
    config = config_path(args)  # _check: absent, or written by prepare for this data root
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    summary = {"name": args.name, "data_root": str(root.resolve()), "dataset_config": str(config),
               "image_size": size, "window_size": window, "margin": margin, "scale": scale,
               "patch_image_pixels": patch, "classes": classes,
               "recipe": None if recipe is None else {"why": recipe.why, "steps_global": recipe.steps_global,
                                                      "steps_local": recipe.steps_local},
               "global": good, "local": local, "grey_converted": conversions.grey,
               "conversions": conversions.summary(),
               "next": commands(args.name, root, classes, size, window, conf_dir(args), scale,
                                (recipe.steps_global, recipe.steps_local) if recipe else None)}
    (root / "prepare.json").write_text(json.dumps(summary, indent=1))
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.data.prepare"), description=__doc__.split("\n\n")[0],
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
