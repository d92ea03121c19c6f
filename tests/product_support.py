"""A tiny 'own product' made on the fly: defect-free images and defect images with same-named masks.

The pictures are procedural boards (dmgr.data) at 40 x 48 px (not square: the fitting rule matters), a
third of them grey-level; the two defect classes carry names the package does not know.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dmgr.data.board import make_board
from dmgr.data.defects import add_defect

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DMGR_NO_PROGRESS": "1"}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


CLASSES = {"bridge": "short", "burr": "spur"}  # the product's class -> the procedural defect drawn for it


def _save(array: np.ndarray, path: Path, grey: bool) -> None:
    image = Image.fromarray(array)
    (image.convert("L") if grey else image).save(path)


def make_product(root: Path, good: int = 12, per_class: int = 6) -> Path:
    """root/good/*.png, root/defects/<class>/NAME.png, root/masks/<class>/NAME.png; returns root."""
    (root / "good").mkdir(parents=True, exist_ok=True)
    for i in range(good):
        _save(make_board(100 + i, 48).image[4:44], root / "good" / f"cell-{i:03d}.png", grey=i % 3 == 0)
    for cls, kind in CLASSES.items():
        (root / "defects" / cls).mkdir(parents=True, exist_ok=True)
        (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image, mask, _ = add_defect(make_board(200 + i, 48), kind, i)
            _save(image[4:44], root / "defects" / cls / f"{cls}-{i:02d}.png", grey=False)
            mask_image = Image.fromarray(np.where(mask[4:44], 255, 0).astype(np.uint8))
            mask_image.save(root / "masks" / cls / f"{cls}-{i:02d}.png")
    return root
