"""Bring your own data: a folder of defect-free images, or Pascal VOC boxes (as PKU-Market-PCB ships them).

    python -m dmgr.data.importers folder SRC DST --size 256
    python -m dmgr.data.importers voc --images PCB_DATASET/images --annotations PCB_DATASET/Annotations \\
        --dst data/pku/local --patch-size 64 --image-size 256 [--map missing_hole=missinghole ...]

Unreadable images and annotation files are reported by path (logging.warning) and skipped; every import
returns (and the CLI prints) a summary with the counts and the skipped paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from PIL import Image

from dmgr.data.defects import CLASS_NAMES, class_id_of
from dmgr.data.images import list_images, load_rgb, resize_center_crop

log = logging.getLogger(__name__)

# PKU-Market-PCB object names -> this package's class names.
PKU_CLASS_MAP = {"missing_hole": "missinghole", "mouse_bite": "mousebite", "open_circuit": "opencircuit",
                 "short": "short", "spur": "spur", "spurious_copper": "spuriouscopper"}


def _read(path: Path, skipped: list[str]) -> Image.Image | None:
    """The RGB image, or None (warned and recorded) when it cannot be decoded."""
    try:
        return load_rgb(path)
    except Exception as err:  # any decoder failure (truncated, not an image, bomb) is a skip, never a crash
        log.warning("skipping unreadable image %s: %s", path, err)
        skipped.append(str(path))
        return None


def import_image_folder(src: str | Path, dst: str | Path, size: int) -> dict:
    """Every image under `src` (png/jpg/bmp/tif, recursive), shorter side to `size`, centre-cropped, as png.

    Names keep the relative path (`a/b.jpg` -> `a_b.png`). Returns {"written", "skipped"}.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src} does not exist")
    dst.mkdir(parents=True, exist_ok=True)
    written, skipped, used = 0, [], set()
    for path in list_images(src):
        img = _read(path, skipped)
        if img is None:
            continue
        name = "_".join(path.relative_to(src).with_suffix("").parts)
        if name in used:  # a.jpg next to a.png
            name = f"{name}_{path.suffix[1:].lower()}"
        used.add(name)
        resize_center_crop(img, size).save(dst / f"{name}.png")
        written += 1
    return {"written": written, "skipped": skipped}


def _class_name(value: str | int) -> str:
    return CLASS_NAMES[class_id_of(value)] if isinstance(value, int) else str(value)


def _box(obj: ET.Element) -> tuple[float, float, float, float] | None:
    bb = obj.find("bndbox")
    try:
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (AttributeError, TypeError, ValueError):
        return None
    return (x0, y0, x1, y1) if x1 >= x0 and y1 >= y0 else None


def _find_image(root: ET.Element, xml_path: Path, index: dict[str, Path]) -> Path | None:
    filename = (root.findtext("filename") or "").strip()
    for key in (filename.lower(), Path(filename).stem.lower(), xml_path.stem.lower()):
        if key and key in index:
            return index[key]
    return None


def import_voc(images_dir: str | Path, annotations_dir: str | Path, dst: str | Path,
               class_map: dict[str, str | int], patch_size: int, image_size: int | None = None) -> dict:
    """Cut a patch_size square centred on every VOC <object> box, into dst/<class>/<stem>_<i>.png.

    class_map maps VOC object names to class names (or ids into CLASS_NAMES); objects with other names
    are reported once per name and skipped. With `image_size` each image is first scaled so its shorter
    side is image_size (boxes with it). Patches are moved inside the image; i counts the objects of a file.
    Also writes dst/labels.json (file, class, source image, box inside the patch). Returns a summary.
    """
    images_dir, annotations_dir, dst = Path(images_dir), Path(annotations_dir), Path(dst)
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"VOC folder {folder} does not exist")
    names = {voc: _class_name(value) for voc, value in class_map.items()}
    dst.mkdir(parents=True, exist_ok=True)
    index: dict[str, Path] = {}
    for path in list_images(images_dir):
        index.setdefault(path.name.lower(), path)
        index.setdefault(path.stem.lower(), path)
    per_class, unknown, skipped, labels = Counter(), Counter(), [], []
    images = 0
    for xml_path in sorted(annotations_dir.rglob("*.xml")):
        try:
            root = ET.parse(xml_path).getroot()
        except (ET.ParseError, OSError) as err:
            log.warning("skipping unreadable annotation %s: %s", xml_path, err)
            skipped.append(str(xml_path))
            continue
        image_path = _find_image(root, xml_path, index)
        if image_path is None:
            log.warning("skipping %s: its image %r is not under %s", xml_path, root.findtext("filename"), images_dir)
            skipped.append(str(xml_path))
            continue
        img = _read(image_path, skipped)
        if img is None:
            continue
        images += 1
        f = 1.0
        if image_size:
            f = image_size / min(img.size)
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.LANCZOS)
        for i, obj in enumerate(root.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in names:
                if name not in unknown:
                    log.warning("unknown VOC class %r (first in %s): skipped; map it with class_map", name, xml_path)
                unknown[name] += 1
                continue
            box = _box(obj)
            if box is None or img.width < patch_size or img.height < patch_size:
                log.warning("skipping object %d of %s: bad box or image smaller than the patch", i, xml_path)
                continue
            cls = names[name]
            cx, cy = (box[0] + box[2]) / 2 * f, (box[1] + box[3]) / 2 * f
            x0 = int(min(max(round(cx - patch_size / 2), 0), img.width - patch_size))
            y0 = int(min(max(round(cy - patch_size / 2), 0), img.height - patch_size))
            (dst / cls).mkdir(parents=True, exist_ok=True)
            out = f"{cls}/{image_path.stem}_{i}.png"
            img.crop((x0, y0, x0 + patch_size, y0 + patch_size)).save(dst / out)
            inner = [round(box[0] * f - x0, 1), round(box[1] * f - y0, 1), round(box[2] * f - x0, 1),
                     round(box[3] * f - y0, 1)]
            labels.append({"file": out, "class_name": cls,
                           "class_id": CLASS_NAMES.index(cls) if cls in CLASS_NAMES else None,
                           "source": str(image_path), "box": inner})
            per_class[cls] += 1
    if labels:
        (dst / "labels.json").write_text(json.dumps({"patch_size": patch_size, "items": labels}, indent=1))
    return {"images": images, "patches": sum(per_class.values()), "per_class": dict(per_class),
            "unknown_classes": dict(unknown), "skipped": skipped}


def _parse_map(items: list[str] | None) -> dict[str, str | int]:
    if not items:
        return dict(PKU_CLASS_MAP)
    out: dict[str, str | int] = {}
    for item in items:
        voc, sep, cls = item.partition("=")
        if not sep or not voc or not cls:
            raise ValueError(f"--map expects VOC_NAME=CLASS, got {item!r}")
        out[voc] = int(cls) if cls.isdigit() else cls
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmgr.data.importers", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    folder = sub.add_parser("folder", help="a folder of defect-free images -> size x size pngs")
    folder.add_argument("src", type=Path)
    folder.add_argument("dst", type=Path)
    folder.add_argument("--size", type=int, required=True)
    voc = sub.add_parser("voc", help="Pascal VOC boxes -> defect patches per class")
    voc.add_argument("--images", type=Path, required=True)
    voc.add_argument("--annotations", type=Path, required=True)
    voc.add_argument("--dst", type=Path, required=True)
    voc.add_argument("--patch-size", type=int, required=True)
    voc.add_argument("--image-size", type=int, default=None, help="scale each image's shorter side to this first")
    voc.add_argument("--map", nargs="*", metavar="VOC=CLASS", help="class map (default: PKU-Market-PCB names)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "folder":
            summary = import_image_folder(args.src, args.dst, args.size)
        else:
            summary = import_voc(args.images, args.annotations, args.dst, _parse_map(args.map), args.patch_size,
                                 args.image_size)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
