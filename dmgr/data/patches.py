"""Defect patches for the local model: DATA_ROOT/local/<class>/NAME.png + NAME.mask.png + labels.json.

Shared by the importers (VOC and COCO boxes, defect images with mask files) and `dmgr.data.prepare`.
The importers first scale every defect image so its shorter side is `image_size`; a patch_size square is
then cut centred on the defect and moved inside the image. `dmgr.data.prepare` instead cuts
window_size / scale image pixels around each defect of the image at its own size and resizes the patches to
window_size (`rescale_patches`: the model pixels of synthesis at that dataset.scale). The mask beside each
patch is the defect's own mask where one is given, else its box.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr.images import Conversions, decode_mask, decode_rgb, list_images, save_mask

log = logging.getLogger(__name__)
MASK_SUFFIXES = ("", "_mask", ".mask")  # NAME.png, NAME_mask.png (MVTec AD), NAME.mask.png


class Reader:
    """Decodes user images by the one rule of `dmgr.images.decode_rgb`; unreadable files are warned (one line
    each) and recorded, conversions counted (into `run` too, when the caller logs a whole run once)."""

    def __init__(self, run: Conversions | None = None) -> None:
        self.skipped: list[str] = []
        self.conversions = Conversions()
        self.run = run

    @property
    def grey(self) -> int:
        return self.conversions.grey

    def rgb(self, path: Path, mask: bool = False) -> Image.Image | None:
        """The RGB image (a 0/255 L image when `mask`), or None when it cannot be decoded."""
        try:
            data = path.read_bytes()
            if mask:
                return decode_mask(data)
            image, notes = decode_rgb(data)
        except Exception as err:  # any failure (unreadable, truncated, not an image, bomb) is a skip, never a crash
            log.warning("skipping unreadable image %s: %s: %s", path, type(err).__name__, str(err)[:200])
            self.skipped.append(str(path))
            return None
        for conversions in (self.conversions, self.run):
            if conversions is not None:
                conversions.add(notes, path)
        return image

    def report(self) -> None:
        """Logs the conversions once, unless a run-wide count (`run`) is logged by the caller."""
        if self.run is None:
            self.conversions.report(log)


def scale(img: Image.Image, image_size: int | None, nearest: bool = False) -> tuple[Image.Image, float]:
    """The image with its shorter side scaled to image_size (unchanged when None), and the factor."""
    if not image_size:
        return img, 1.0
    f = image_size / min(img.size)
    size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
    return img.resize(size, Image.NEAREST if nearest else Image.LANCZOS), f


class PatchWriter:
    """Writes patches into dst/<class>/ and, on close, dst/labels.json; counts per class."""

    def __init__(self, dst: Path, patch_size: int, class_ids: dict[str, int] | None = None) -> None:
        self.dst, self.patch_size, self.class_ids = Path(dst), patch_size, class_ids or {}
        self.labels: list[dict] = []
        self.per_class: Counter = Counter()
        self.larger = 0
        self.dst.mkdir(parents=True, exist_ok=True)

    def cut(self, img: Image.Image, box: tuple[float, float, float, float], cls: str, name: str, source: Path,
            mask: np.ndarray | None = None) -> bool:
        """One patch centred on `box` (x0, y0, x1, y1 in img pixels); mask: (H, W) bool of img, else the box."""
        p = self.patch_size
        if img.width < p or img.height < p:
            log.warning("skipping %s of %s: the image (%dx%d) is smaller than the %d px patch",
                        name, source, img.width, img.height, p)
            return False
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x0 = int(min(max(round(cx - p / 2), 0), img.width - p))
        y0 = int(min(max(round(cy - p / 2), 0), img.height - p))
        if box[2] - box[0] > p or box[3] - box[1] > p:
            self.larger += 1
        if mask is None:
            mask = np.zeros((img.height, img.width), dtype=bool)
            mask[int(box[1]):int(np.ceil(box[3])), int(box[0]):int(np.ceil(box[2]))] = True
        (self.dst / cls).mkdir(parents=True, exist_ok=True)
        out = f"{cls}/{name}.png"
        img.crop((x0, y0, x0 + p, y0 + p)).save(self.dst / out)
        save_mask(mask[y0:y0 + p, x0:x0 + p], self.dst / cls / f"{name}.mask.png")
        inner = [round(box[0] - x0, 1), round(box[1] - y0, 1), round(box[2] - x0, 1), round(box[3] - y0, 1)]
        self.labels.append({"file": out, "class_name": cls, "class_id": self.class_ids.get(cls),
                            "source": str(source), "box": inner})
        self.per_class[cls] += 1
        return True

    def close(self) -> dict:
        if self.labels:
            labels = {"patch_size": self.patch_size, "items": self.labels}
            (self.dst / "labels.json").write_text(json.dumps(labels, indent=1))
        if self.larger:
            log.warning("%d defects are larger than the %d px patch: their patches show the defect's centre; "
                        "a larger --window-size (or a smaller --image-size) keeps them whole",
                        self.larger, self.patch_size)
        return {"patches": sum(self.per_class.values()), "per_class": dict(self.per_class),
                "larger_than_patch": self.larger}


def find_mask(masks_dir: Path, relative: Path) -> Path | None:
    """The mask of defect image `relative` (class/NAME.ext) under masks_dir: NAME[_mask|.mask].<image ext>."""
    folder = masks_dir / relative.parent
    for suffix in MASK_SUFFIXES:
        for ext in (".png", ".bmp", ".tif", ".tiff", ".jpg", relative.suffix):
            path = folder / f"{relative.stem}{suffix}{ext}"
            if path.is_file():
                return path
    return None


def import_masked(defects_dir: str | Path, masks_dir: str | Path, dst: str | Path, patch_size: int,
                  image_size: int | None = None, classes: list[str] | None = None,
                  conversions: Conversions | None = None) -> dict:
    """Defect images in defects_dir/<class>/NAME.ext with masks in masks_dir/<class>/NAME.png (or NAME_mask.png).

    One patch per image, centred on its mask's bounding box; the patch's mask is the given mask (non-zero =
    defect). Class names are the folder names (sorted), or `classes` in that order. Images without a mask or
    with an empty one are warned and skipped. Images are decoded by `dmgr.images.decode_rgb`, masks by
    `decode_mask` (both turned upright by EXIF); `conversions`: a run-wide count the caller logs once (else
    this import logs its own).
    """
    defects_dir, masks_dir = Path(defects_dir), Path(masks_dir)
    for folder in (defects_dir, masks_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
    found = sorted(p.name for p in defects_dir.iterdir() if p.is_dir() and list_images(p, recursive=False))
    classes = list(classes) if classes else found
    if not classes:
        raise ValueError(f"{defects_dir}: holds no class folders with images; put each class's defect images "
                         f"in {defects_dir}/<class>/")
    reader = Reader(conversions)
    writer = PatchWriter(Path(dst), patch_size, {c: i for i, c in enumerate(classes)})
    no_mask, empty = [], []
    for cls in classes:
        for path in list_images(defects_dir / cls, recursive=False):
            mask_file = find_mask(masks_dir, path.relative_to(defects_dir))
            if mask_file is None:
                log.warning("skipping %s: no mask %s/%s/%s.png (or %s_mask.png)", path, masks_dir, cls, path.stem,
                            path.stem)
                no_mask.append(str(path))
                continue
            img = reader.rgb(path)
            mask_img = reader.rgb(mask_file, mask=True) if img is not None else None
            if img is None or mask_img is None:
                continue
            if mask_img.size != img.size:
                log.warning("skipping %s: its mask is %dx%d, the image %dx%d", path, *mask_img.size, *img.size)
                no_mask.append(str(path))
                continue
            img, _ = scale(img, image_size)
            mask = np.asarray(scale(mask_img, image_size, nearest=True)[0]) > 0
            if not mask.any():
                log.warning("skipping %s: its mask %s is empty", path, mask_file)
                empty.append(str(path))
                continue
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            writer.cut(img, box, cls, path.stem, path, mask)
    reader.report()
    return {"classes": classes, **writer.close(), "without_mask": no_mask, "empty_mask": empty,
            "skipped": reader.skipped, "grey_converted": reader.grey, "conversions": reader.conversions.summary()}


def rescale_patches(dst: str | Path, size: int) -> None:
    """Resize every patch listed in dst/labels.json to size x size (bilinear, antialiased when shrinking, as
    synthesis's context crops; masks by nearest neighbour) and its box with it."""
    dst = Path(dst)
    record = dst / "labels.json"
    if not record.is_file():
        return
    labels = json.loads(record.read_text())
    factor = size / labels["patch_size"]
    if factor == 1:
        return
    for item in labels["items"]:
        path = dst / item["file"]
        mask = path.with_name(path.stem + ".mask.png")
        with Image.open(path) as img:
            img.resize((size, size), Image.BILINEAR).save(path)
        with Image.open(mask) as img:
            img.resize((size, size), Image.NEAREST).save(mask)
        item["box"] = [round(v * factor, 1) for v in item["box"]]
    labels.update(patch_size=size, image_pixels=labels["patch_size"])
    record.write_text(json.dumps(labels, indent=1))
