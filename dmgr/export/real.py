"""The user's own labelled images for `--add-real PATH`, read with the importers' readers (those
`dmgr.data.prepare` uses) but kept whole, at their own size, with one mask per labelled defect:

- PATH/images/<class>/NAME.ext (or PATH/defects/<class>/) with PATH/masks/<class>/NAME.png (or NAME_mask.png):
  one defect per image, its mask non-zero where the defect is (prepare's `--defects` / `--masks` layout);
- a folder of Pascal VOC .xml files and their images (anywhere under PATH): each object's box is its mask;
- a COCO annotations .json (PATH itself, or the one .json in PATH), its images under the json's folder: the
  polygon (or RLE) segmentation, else the box.

Every class must be one of the run's classes; an image is decoded by `dmgr.images.decode_rgb` and kept grey
(L) when its three channels are equal, as a grey input is.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr.data.importers import _box, _coco_mask, _find_image, _index
from dmgr.data.patches import Reader, find_mask
from dmgr.export.common import ExportError
from dmgr.export.items import Item, png_bytes
from dmgr.images import list_images


@dataclass(frozen=True)
class Label:
    class_name: str
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in image pixels
    mask_file: Path | None = None
    annotation: dict | None = None  # a COCO annotation


@dataclass(frozen=True)
class RealImage:
    path: Path
    labels: list[Label]


def _coco_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() == ".json":
        return path
    found = sorted(path.glob("*.json")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def _image_folder(root: Path) -> Path | None:
    """PATH/images (or PATH/defects) beside PATH/masks: the one-mask-per-image layout."""
    found = [root / name for name in ("images", "defects") if (root / name).is_dir()]
    return found[0] if found and (root / "masks").is_dir() else None


def _from_masks(root: Path, images_dir: Path) -> list[RealImage]:
    images = []
    for folder in sorted(p for p in images_dir.iterdir() if p.is_dir()):
        for path in list_images(folder, recursive=False):
            mask = find_mask(root / "masks", path.relative_to(images_dir))
            if mask is None:
                raise ExportError(f"--add-real={root}: {path} has no mask {root / 'masks' / folder.name / path.stem}"
                                  ".png: give every image its mask")
            images.append(RealImage(path, [Label(folder.name, mask_file=mask)]))
    return images


def _from_voc(root: Path) -> list[RealImage]:
    index, images = _index(root), []
    for xml_path in sorted(root.rglob("*.xml")):
        try:
            tree = ET.parse(xml_path).getroot()
        except (ET.ParseError, OSError) as err:
            raise ExportError(f"--add-real={root}: {xml_path} is not a VOC annotation ({err})") from None
        image = _find_image(tree, xml_path, index)
        if image is None:
            raise ExportError(f"--add-real={root}: the image of {xml_path} ({tree.findtext('filename')!r}) is "
                              f"not under {root}")
        labels = [Label((obj.findtext("name") or "").strip(), box=_box(obj)) for obj in tree.iter("object")]
        images.append(RealImage(image, [label for label in labels if label.box is not None]))
    return images


def _from_coco(file: Path) -> list[RealImage]:
    try:
        coco = json.loads(file.read_text())
        names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        files = {int(i["id"]): str(i["file_name"]) for i in coco["images"]}
        anns = list(coco["annotations"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"--add-real={file}: not a COCO annotations file ({type(err).__name__})") from None
    index, by_image = _index(file.parent), {}
    for ann in anns:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    images = []
    for image_id, items in sorted(by_image.items()):
        name = files.get(image_id, "")
        path = index.get(Path(name).name.lower()) or index.get(Path(name).stem.lower())
        if path is None:
            raise ExportError(f"--add-real={file}: image {name!r} is not under {file.parent}")
        images.append(RealImage(path, [Label(names.get(int(a["category_id"]), str(a["category_id"])),
                                             annotation=a) for a in items]))
    return images


def scan_real(path: str | Path, classes: list[str]) -> list[RealImage]:
    """The labelled images under PATH (nothing decoded yet); an unknown layout or class is an ExportError."""
    root = Path(path)
    coco = _coco_file(root)
    if coco is not None:
        images = _from_coco(coco)
    elif _image_folder(root) is not None:
        images = _from_masks(root, _image_folder(root))
    elif root.is_dir() and any(root.rglob("*.xml")):
        images = _from_voc(root)
    else:
        raise ExportError(f"--add-real={path}: no labelled images: give a folder with images/<class>/ (or "
                          "defects/<class>/) and masks/<class>/, a folder of VOC .xml files and their images, or a "
                          "COCO .json")
    if not images:
        raise ExportError(f"--add-real={path}: holds no labelled image")
    for image in images:
        for label in image.labels:
            if label.class_name not in classes:
                raise ExportError(f"--add-real={path}: class {label.class_name!r} ({image.path.name}) is not one "
                                  f"of the run's classes ({', '.join(classes)}): rename it in your labels")
    return images


def _mask(label: Label, width: int, height: int, reader: Reader) -> np.ndarray:
    if label.mask_file is not None:
        mask = reader.rgb(label.mask_file, mask=True)
        if mask is None or mask.size != (width, height):
            raise ExportError(f"--add-real: mask {label.mask_file} is unreadable or not the {width}x{height} of "
                              "its image")
        return np.asarray(mask) > 0
    if label.annotation is not None:
        own = _coco_mask(label.annotation, width, height)
        if own is not None:
            return own
        x, y, w, h = (float(v) for v in label.annotation["bbox"])
        box = (x, y, x + w, y + h)
    else:
        box = label.box
    mask = np.zeros((height, width), dtype=bool)
    mask[max(int(box[1]), 0):int(np.ceil(box[3])), max(int(box[0]), 0):int(np.ceil(box[2]))] = True
    return mask


def real_items(images: list[RealImage], root: str | Path, classes: list[str], split: str) -> Iterator[Item]:
    """One Item per real image, named `real-<its path under PATH>`, in `split`."""
    base = Path(root) if Path(root).is_dir() else Path(root).parent
    reader, used = Reader(), set()
    for image in images:
        decoded = reader.rgb(image.path)
        if decoded is None:
            raise ExportError(f"--add-real: {image.path} cannot be decoded")
        array = np.asarray(decoded)
        grey = bool((array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all())
        picture = Image.fromarray(array[..., 0]) if grey else decoded
        labels = [(classes.index(label.class_name), _mask(label, *decoded.size, reader)) for label in image.labels]
        relative = image.path.relative_to(base) if image.path.is_relative_to(base) else Path(image.path.name)
        name = "real-" + "_".join(relative.with_suffix("").parts)
        name = f"{name}_{relative.suffix[1:].lower()}" if name in used else name  # a.jpg beside a.png
        used.add(name)
        yield Item(name, png_bytes(picture), decoded.size, labels, split, {"real": str(relative)})
