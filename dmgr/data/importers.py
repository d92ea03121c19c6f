"""Bring your own data into a data root (the layout `python -m dmgr.train data_root=DATA_ROOT` reads):

    DATA_ROOT/global/NAME.png                       defect-free images (the global model; synthesis backgrounds)
    DATA_ROOT/local/<class>/NAME.png + NAME.mask.png + labels.json    defect patches (the local model)

    python -m dmgr.data.importers folder SRC DATA_ROOT --size 256
    python -m dmgr.data.importers voc --images PCB_DATASET/images --annotations PCB_DATASET/Annotations \\
        --data-root DATA_ROOT --patch-size 64 --image-size 256 [--map missing_hole=missinghole ...]
    python -m dmgr.data.importers coco --annotations instances.json --images IMAGES --data-root DATA_ROOT ...
    python -m dmgr.data.importers masks --defects DEFECTS --masks MASKS --data-root DATA_ROOT ...

`python -m dmgr.data.prepare` runs these for a whole product and writes its dataset config
(docs/own-product.md). Unreadable images and annotation files are reported by path (logging.warning) and
skipped; every image is decoded by the one rule of `dmgr.images.decode_rgb` (EXIF orientation applied,
grey and 16-bit grey to RGB by the bit depth, alpha dropped ...; the conversions are counted and logged once);
every import returns (and the CLI prints) a summary with the counts and the skipped paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from dmgr.cli import add_settings, program, settings_from, stop_on_interrupt
from dmgr.data.defects import CLASS_NAMES, class_id_of
from dmgr.data.patches import PatchWriter, Reader, import_masked, scale
from dmgr.images import Conversions, list_images, resize_center_crop
from dmgr.schema import STRICT_SECTION, Count

log = logging.getLogger(__name__)

# PKU-Market-PCB object names -> this package's class names.
PKU_CLASS_MAP = {"missing_hole": "missinghole", "mouse_bite": "mousebite", "open_circuit": "opencircuit",
                 "short": "short", "spur": "spur", "spurious_copper": "spuriouscopper"}


def import_image_folder(src: str | Path, dst: str | Path, size: int, conversions: Conversions | None = None) -> dict:
    """Every image under `src` (png/jpg/bmp/tif, recursive), shorter side to `size`, centre-cropped, as png.

    Names keep the relative path (`a/b.jpg` -> `a_b.png`). Returns {"written", "skipped", "grey_converted",
    "conversions"}; `conversions`: a run-wide count the caller logs once (else this import logs its own).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src} does not exist")
    dst.mkdir(parents=True, exist_ok=True)
    reader, written, used = Reader(conversions), 0, set()
    for path in list_images(src):
        img = reader.rgb(path)
        if img is None:
            continue
        name = "_".join(path.relative_to(src).with_suffix("").parts)
        if name in used:  # a.jpg next to a.png
            name = f"{name}_{path.suffix[1:].lower()}"
        used.add(name)
        resize_center_crop(img, size).save(dst / f"{name}.png")
        written += 1
    reader.report()
    return {"written": written, "skipped": reader.skipped, "grey_converted": reader.grey,
            "conversions": reader.conversions.summary()}


def _class_name(value: str | int) -> str:
    return CLASS_NAMES[class_id_of(value)] if isinstance(value, int) else str(value)


def _box(obj: ET.Element) -> tuple[float, float, float, float] | None:
    bb = obj.find("bndbox")
    try:
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (AttributeError, TypeError, ValueError):
        return None
    return (x0, y0, x1, y1) if x1 >= x0 and y1 >= y0 else None


def clip_box(box, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The box clipped to the image, or None when it does not intersect it."""
    x0, y0, x1, y1 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(width)), min(box[3], float(height))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _find_image(root: ET.Element, xml_path: Path, index: dict[str, Path]) -> Path | None:
    filename = (root.findtext("filename") or "").strip()
    for key in (filename.lower(), Path(filename).stem.lower(), xml_path.stem.lower()):
        if key and key in index:
            return index[key]
    return None


def _index(images_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in list_images(images_dir):
        index.setdefault(path.name.lower(), path)
        index.setdefault(path.stem.lower(), path)
    return index


class BoxCounter:
    """Boxes outside the image (skipped) and partly outside (clipped), warned per box."""

    def __init__(self) -> None:
        self.outside = self.clipped = 0

    def clip(self, box, img: Image.Image, where: str) -> tuple[float, float, float, float] | None:
        clipped = clip_box(box, img.width, img.height)
        if clipped is None:
            log.warning("skipping %s: box %s does not intersect the %dx%d image", where, list(box), *img.size)
            self.outside += 1
        elif clipped != tuple(box):
            log.warning("%s: box %s clipped to the %dx%d image", where, list(box), *img.size)
            self.clipped += 1
        return clipped


def import_voc(images_dir: str | Path, annotations_dir: str | Path, dst: str | Path,
               class_map: dict[str, str | int] | None, patch_size: int, image_size: int | None = None,
               conversions: Conversions | None = None) -> dict:
    """Cut a patch_size square centred on every VOC <object> box, into dst/<class>/<stem>_<i>.png (+ .mask.png).

    class_map maps VOC object names to class names (or ids into CLASS_NAMES); objects with other names
    are reported once per name and skipped (class_map None: every object name is its class name). Boxes
    partly outside the image are clipped to it; boxes that do
    not intersect it are skipped with a warning (both counted). With `image_size` each image is first scaled
    so its shorter side is image_size (boxes with it). Patches are moved inside the image; i counts the
    objects of a file. The mask beside each patch is its box. Also writes dst/labels.json (file, class,
    source image, box inside the patch). Returns a summary.
    """
    images_dir, annotations_dir, dst = Path(images_dir), Path(annotations_dir), Path(dst)
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"VOC folder {folder} does not exist")
    names = None if class_map is None else {voc: _class_name(value) for voc, value in class_map.items()}
    index, reader, boxes = _index(images_dir), Reader(conversions), BoxCounter()
    writer = PatchWriter(dst, patch_size, {c: i for i, c in enumerate(CLASS_NAMES)})
    unknown, images = Counter(), 0
    for xml_path in sorted(annotations_dir.rglob("*.xml")):
        try:
            root = ET.parse(xml_path).getroot()
        except (ET.ParseError, OSError) as err:
            log.warning("skipping unreadable annotation %s: %s", xml_path, err)
            reader.skipped.append(str(xml_path))
            continue
        image_path = _find_image(root, xml_path, index)
        if image_path is None:
            log.warning("skipping %s: its image %r is not under %s", xml_path, root.findtext("filename"), images_dir)
            reader.skipped.append(str(xml_path))
            continue
        img = reader.rgb(image_path)
        if img is None:
            continue
        images += 1
        original = img
        img, f = scale(img, image_size)
        for i, obj in enumerate(root.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if names is None and name:
                cls = name
            elif names is None or name not in names:
                if name not in unknown:
                    log.warning("unknown VOC class %r (first in %s): skipped; map it with class_map", name, xml_path)
                unknown[name] += 1
                continue
            else:
                cls = names[name]
            box = _box(obj)
            if box is None:
                log.warning("skipping object %d of %s: bad box", i, xml_path)
                continue
            box = boxes.clip(box, original, f"object {i} of {xml_path}")
            if box is not None:
                writer.cut(img, tuple(v * f for v in box), cls, f"{image_path.stem}_{i}", image_path)
    reader.report()
    return {"images": images, **writer.close(), "unknown_classes": dict(unknown), "boxes_outside": boxes.outside,
            "boxes_clipped": boxes.clipped, "skipped": reader.skipped, "grey_converted": reader.grey,
            "conversions": reader.conversions.summary()}


def _coco_mask(ann: dict, width: int, height: int) -> np.ndarray | None:
    """The annotation's own mask from polygon (or, with pycocotools installed, RLE) segmentation."""
    seg = ann.get("segmentation")
    if isinstance(seg, list) and seg:
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in seg:
            if len(poly) >= 6:
                draw.polygon([(float(poly[k]), float(poly[k + 1])) for k in range(0, len(poly) - 1, 2)], fill=255)
        return np.asarray(canvas) > 0
    if isinstance(seg, dict):
        try:
            from pycocotools import mask as rle
        except ImportError:
            return None
        if isinstance(seg.get("counts"), list):
            seg = rle.frPyObjects(seg, height, width)
        return rle.decode(seg).astype(bool)
    return None


def import_coco(annotations: str | Path, images_dir: str | Path, dst: str | Path, patch_size: int,
                image_size: int | None = None, class_map: dict[str, str | int] | None = None,
                conversions: Conversions | None = None) -> dict:
    """Like import_voc, from a COCO annotations file: one patch per annotation, classes from its categories
    (renamed by class_map where given). The mask is the polygon segmentation where there is one (RLE needs
    pycocotools), else the box."""
    annotations, images_dir = Path(annotations), Path(images_dir)
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotations {annotations} do not exist")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder {images_dir} does not exist")
    try:
        coco = json.loads(annotations.read_text())
        categories = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        files = {int(i["id"]): str(i["file_name"]) for i in coco["images"]}
        anns = list(coco["annotations"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{annotations}: not a COCO annotations file ({type(err).__name__}: {err})") from None
    names = {cid: _class_name((class_map or {}).get(n, n)) for cid, n in categories.items()}
    classes = [names[cid] for cid in sorted(names)]
    index, reader, boxes = _index(images_dir), Reader(conversions), BoxCounter()
    writer = PatchWriter(dst, patch_size, {c: i for i, c in enumerate(classes)})
    by_image: dict[int, list[dict]] = {}
    for ann in anns:
        by_image.setdefault(int(ann.get("image_id", -1)), []).append(ann)
    images = 0
    for image_id, items in sorted(by_image.items()):
        name = files.get(image_id, "")
        path = index.get(Path(name).name.lower()) or index.get(Path(name).stem.lower())
        if path is None:
            log.warning("skipping the annotations of image %s (%r): not under %s", image_id, name, images_dir)
            reader.skipped.append(name or str(image_id))
            continue
        img = reader.rgb(path)
        if img is None:
            continue
        images += 1
        original = img
        img, f = scale(img, image_size)
        for ann in items:
            where = f"annotation {ann.get('id')} of {path.name}"
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
                cls = names[int(ann["category_id"])]
            except (KeyError, TypeError, ValueError):
                log.warning("skipping %s: no bbox or unknown category", where)
                continue
            box = boxes.clip((x, y, x + w, y + h), original, where)
            if box is None:
                continue
            mask = _coco_mask(ann, original.width, original.height)
            if mask is not None:
                scaled = scale(Image.fromarray(mask), image_size, nearest=True)[0]
                mask = np.asarray(scaled) > 0
            writer.cut(img, tuple(v * f for v in box), cls, f"{path.stem}_{ann.get('id', 0)}", path, mask)
    reader.report()
    return {"classes": classes, "images": images, **writer.close(), "boxes_outside": boxes.outside,
            "boxes_clipped": boxes.clipped, "skipped": reader.skipped, "grey_converted": reader.grey,
            "conversions": reader.conversions.summary()}


def _parse_map(items: list[str] | None, default: dict | None = PKU_CLASS_MAP) -> dict[str, str | int] | None:
    if not items:
        return None if default is None else dict(default)
    out: dict[str, str | int] = {}
    for item in items:
        voc, sep, cls = item.partition("=")
        if not sep or not voc or not cls:
            raise ValueError(f"--map={item!r}: expects NAME=CLASS")
        out[voc] = int(cls) if cls.isdigit() else cls
    return out


def _one_line(err: Exception) -> str:
    """An error as one line; a file that cannot be read is named with the reason."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename}: cannot read or write it ({err.strerror or type(err).__name__})"
    return " ".join(str(err).split())


def check_data_root(root: Path) -> Path:
    """A data root, not one of its subfolders (imports write DATA_ROOT/global and DATA_ROOT/local)."""
    if root.name in ("global", "local"):
        raise ValueError(f"{root}: give the data root itself ({root.parent}); imports write "
                         f"DATA_ROOT/global/ (defect-free) and DATA_ROOT/local/<class>/ (defect patches)")
    return root


@dataclass(frozen=True)
class FolderImport:
    """The options of `importers folder`."""

    __pydantic_config__ = STRICT_SECTION
    size: Annotated[Count(), Field(description="side of the square pngs written, pixels")]


@dataclass(frozen=True)
class PatchImport:
    """The options every patch import (`voc`, `coco`, `masks`) shares."""

    __pydantic_config__ = STRICT_SECTION
    data_root: Annotated[Path, Field(description="patches go to DATA_ROOT/local/<class>/")]
    patch_size: Annotated[Count(), Field(description="the local model's window, pixels")]
    image_size: Annotated[Count() | None, Field(description="scale each image's shorter side to this first")] = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.data.importers"), description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    folder = sub.add_parser("folder", help="defect-free images -> DATA_ROOT/global/ (size x size pngs)")
    folder.add_argument("src", type=Path)
    folder.add_argument("data_root", type=Path, metavar="DATA_ROOT")
    add_settings(folder, FolderImport)
    voc = sub.add_parser("voc", help="Pascal VOC boxes -> DATA_ROOT/local/<class>/ patches with box masks")
    voc.add_argument("--images", type=Path, required=True)
    voc.add_argument("--annotations", type=Path, required=True)
    add_settings(voc, PatchImport)
    voc.add_argument("--map", nargs="*", metavar="VOC=CLASS", help="class map (default: PKU-Market-PCB names)")
    coco = sub.add_parser("coco", help="COCO boxes/polygons -> DATA_ROOT/local/<class>/ patches with masks")
    coco.add_argument("--images", type=Path, required=True)
    coco.add_argument("--annotations", type=Path, required=True, help="the COCO annotations .json")
    add_settings(coco, PatchImport)
    coco.add_argument("--map", nargs="*", metavar="NAME=CLASS", help="rename categories")
    masks = sub.add_parser("masks", help="DEFECTS/<class>/NAME.png + MASKS/<class>/NAME.png -> DATA_ROOT/local/")
    masks.add_argument("--defects", type=Path, required=True)
    masks.add_argument("--masks", type=Path, required=True)
    add_settings(masks, PatchImport)
    return p


@stop_on_interrupt("dmgr-import")
def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    if args.command == "folder":
        size = settings_from(cli, args, FolderImport).size
    else:
        patches = settings_from(cli, args, PatchImport)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        root = check_data_root(args.data_root)
        if args.command == "folder":
            summary = import_image_folder(args.src, root / "global", size)
        elif args.command == "voc":
            summary = import_voc(args.images, args.annotations, root / "local", _parse_map(args.map),
                                 patches.patch_size, patches.image_size)
        elif args.command == "coco":
            summary = import_coco(args.annotations, args.images, root / "local", patches.patch_size,
                                  patches.image_size, _parse_map(args.map, None))
        else:
            summary = import_masked(args.defects, args.masks, root / "local", patches.patch_size, patches.image_size)
    except (OSError, ValueError) as err:  # bad input or a file that cannot be read: one line, no traceback
        print(f"dmgr-import: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=1))
    role = "global" if args.command == "folder" else "local"
    print(f"next: python -m dmgr.train data_root={root} arch=<a {role} architecture> (docs/own-product.md)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
