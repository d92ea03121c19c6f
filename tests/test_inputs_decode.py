"""The one decoder of user images (dmgr.images.decode_rgb): every pixel format to 8-bit RGB by a stated rule,
never clipped, turned upright by EXIF; and the readers that use it (prepare, the importers)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from product_support import make_product

from dmgr.data.importers import import_image_folder
from dmgr.data.prepare import main as prepare_main
from dmgr.images import UnsupportedImage, decode_mask, decode_rgb


def encoded(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def ramp16(width: int = 64, height: int = 48) -> np.ndarray:
    """A 16-bit grey ramp over the whole range, left to right."""
    row = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.repeat(row[None, :], height, axis=0)


def expected8(values: np.ndarray, top: int = 65535) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / top).astype(np.uint8)


def test_16_bit_grey_is_scaled_by_its_bit_depth_not_clipped():
    values = ramp16()
    image, notes = decode_rgb(encoded(Image.fromarray(values)))
    rgb = np.asarray(image)
    assert image.mode == "RGB" and rgb.shape == (48, 64, 3)
    assert (rgb == expected8(values)[:, :, None]).all()
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and len(np.unique(rgb)) > 60  # a ramp, not all white
    assert any("16-bit" in n for n in notes) and not any("dark" in n for n in notes)
    low = (values >> 4).astype(np.uint16)  # 12-bit data in the low bits: scaled the same way, and named
    image, notes = decode_rgb(encoded(Image.fromarray(low)))
    assert (np.asarray(image)[:, :, 0] == expected8(low)).all() and any("4095: dark" in n for n in notes)


def test_32_bit_integer_and_float_grey_have_a_defined_scale_or_are_refused():
    values = ramp16()
    image, _ = decode_rgb(encoded(Image.fromarray(values.astype(np.int32)), "TIFF"))
    assert (np.asarray(image)[:, :, 0] == expected8(values)).all()
    with pytest.raises(UnsupportedImage, match="0..65535"):
        decode_rgb(encoded(Image.fromarray(values.astype(np.int32) * 4), "TIFF"))
    unit = (values / 65535).astype(np.float32)
    image, notes = decode_rgb(encoded(Image.fromarray(unit), "TIFF"))
    assert np.abs(np.asarray(image)[:, :, 0].astype(int) - unit * 255).max() <= 0.5 + 1e-4
    assert any("float" in n for n in notes)
    with pytest.raises(UnsupportedImage, match="0..1"):
        decode_rgb(encoded(Image.fromarray(unit * 255), "TIFF"))


def test_alpha_palette_cmyk_and_1_bit_have_one_rule_each():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([colours, alpha]), "RGBA")
    image, notes = decode_rgb(encoded(rgba))
    assert (np.asarray(image) == colours).all() and any("alpha dropped" in n for n in notes)
    la = Image.fromarray(np.dstack([colours[:, :, 0], alpha]), "LA")
    image, _ = decode_rgb(encoded(la))
    assert (np.asarray(image) == colours[:, :, :1]).all()
    palette = Image.fromarray(colours).quantize(8)
    image, notes = decode_rgb(encoded(palette))
    assert (np.asarray(image) == np.asarray(palette.convert("RGB"))).all() and "palette to RGB" in notes
    cmyk = Image.fromarray(colours).convert("CMYK")
    image, notes = decode_rgb(encoded(cmyk, "TIFF"))
    assert image.mode == "RGB" and "CMYK to RGB" in notes
    bits = Image.fromarray(colours[:, :, 0] > 127)
    image, _ = decode_rgb(encoded(bits))
    assert set(np.unique(np.asarray(image))) == {0, 255}
    assert (np.asarray(image)[:, :, 1] == np.where(colours[:, :, 0] > 127, 255, 0)).all()


def exif_rotated(array: np.ndarray, orientation: int = 6) -> bytes:
    """A PNG holding `array` as stored, tagged to be shown turned (6: 90 degrees clockwise)."""
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    return encoded(img, exif=exif)


def test_exif_orientation_is_applied_to_images_and_masks_alike():
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high as stored
    stored[:, :10] = 255  # the left quarter bright
    image, notes = decode_rgb(exif_rotated(stored))
    upright = np.asarray(image)
    assert upright.shape == (40, 20, 3)  # shown turned: 20 wide, 40 high
    assert (upright[:10] == 255).all() and (upright[10:] == 0).all()  # the stored left is the shown top
    assert any("EXIF orientation 6" in n for n in notes)
    mask = np.asarray(decode_mask(exif_rotated(stored[:, :, 0])))
    assert mask.shape == (40, 20) and (mask[:10] == 255).all() and (mask[10:] == 0).all()


def test_prepare_keeps_16_bit_grey_images_and_logs_the_conversions_once(tmp_path, caplog):
    product = make_product(tmp_path / "product", good=3, per_class=2)
    values = ramp16(48, 40)
    for path in (product / "good").glob("*.png"):
        Image.fromarray(values).save(path)
    args = ["--name", "mono", "--good", str(product / "good"), "--defects", str(product / "defects"),
            "--masks", str(product / "masks"), "--out", str(tmp_path / "data"), "--image-size", "32",
            "--window-size", "8", "--conf-dir", str(tmp_path / "conf")]
    with caplog.at_level(logging.INFO):
        prepare_main(args)
    written = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "data" / "global").glob("*.png"))]
    assert len(written) == 3
    for image in written:
        assert image.min() < 30 and image.max() > 225 and len(np.unique(image)) > 20, "a ramp, not white"
    summary = json.loads((tmp_path / "data" / "prepare.json").read_text())
    sixteen = [k for k in summary["conversions"] if k.startswith("16-bit")]
    assert len(sixteen) == 1 and summary["conversions"][sixteen[0]] == 3 and summary["grey_converted"] == 3
    lines = [r.getMessage() for r in caplog.records if "16-bit" in r.getMessage()]
    assert len(lines) == 1 and "3 16-bit" in lines[0]


def test_an_unreadable_huge_image_is_one_warning_not_a_traceback(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("L", (16, 16), 90).save(src / "fine.png")
    huge = Image.new("1", (Image.MAX_IMAGE_PIXELS or 2**28, 3))  # a decompression bomb by Pillow's rule
    huge.save(src / "huge.png", optimize=True)
    with caplog.at_level(logging.INFO):
        summary = import_image_folder(src, tmp_path / "out", 16)
    assert summary["written"] == 1 and summary["skipped"] == [str(src / "huge.png")]
    warnings = [r.getMessage() for r in caplog.records if "huge.png" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "DecompressionBomb" in warnings[0]


def test_an_annotation_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch, capsys):
    product = make_product(tmp_path / "product", good=2, per_class=1)
    coco = tmp_path / "instances.json"
    coco.write_text("{}")
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == coco:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    args = ["--name", "mono", "--good", str(product / "good"), "--defects", str(product / "defects"),
            "--coco", str(coco), "--out", str(tmp_path / "data"), "--image-size", "32", "--window-size", "8",
            "--conf-dir", str(tmp_path / "conf")]
    with pytest.raises(SystemExit) as caught:
        prepare_main(args)
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2 and len(err.splitlines()) == 1
    assert str(coco) in err and "Permission denied" in err
