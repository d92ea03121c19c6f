"""Training pairs for the downstream benchmark from the non-DMGR sources: cut-paste of real defect
patches, DRAEM-style Perlin anomalies, and real boards. (DMGR and the no-rectification paste come
from synthesis runs; see `dmgr.eval.shards`.)"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dmgr.data.board import make_board
from dmgr.data.defects import CLASS_NAMES, add_defect
from dmgr.data.export import GLOBAL_OFFSET, LOCAL_OFFSET, STREAM, Defect, make_panel, panel_tiles, patch_window
from dmgr.eval.real import Boards, Panel
from dmgr.images import from_uint8

ANOMALY_SOURCES = GLOBAL_OFFSET + STREAM // 2  # boards whose pixels fill Perlin anomalies


def random_windows(n: int, size: int, window: int, margin: int, g: torch.Generator) -> torch.Tensor:
    """(n, 2) top-left corners drawn like the synthesis plan: uniform in [margin, size - window - margin)."""
    return torch.randint(margin, size - window - margin, (n, 2), generator=g)


def background(offset: int, i: int, size: int, panel: Panel = None) -> np.ndarray:
    """Board offset + i, or with `panel` the W x H panel i of the boards offset + i * tiles + j: for
    GLOBAL_OFFSET the demo backgrounds (`python -m dmgr.data.export --panel WxH` writes the same)."""
    if panel is None:
        return make_board(offset + i, size).image
    tiles = panel_tiles(size, panel)
    return make_panel([offset + i * tiles + j for j in range(tiles)], size, panel)


def cut_paste(n: int, size: int, window: int, margin: int, seed: int = 0, panel: Panel = None,
              defects: Sequence[Defect] | None = None) -> Boards:
    """n real defect patches (window x window, centred on the defect, exact masks) pasted into the global
    model's defect-free training boards (with `panel`: its W x H panels of size-px boards, windows uniform over
    the panel). Pair i takes defects[i % len(defects)]; default: the local model's training boards, classes in
    turn (LOCAL_OFFSET + i, class i % 6, defect seed i)."""
    if defects is None:
        defects = [Defect(LOCAL_OFFSET + i, i % len(CLASS_NAMES), i) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    if panel is None:
        windows = random_windows(n, size, window, margin, g)
    else:
        xs, ys = (torch.randint(margin, side - window - margin, (n,), generator=g) for side in panel)
        windows = torch.stack([xs, ys], 1)
    images, masks = [], []
    for i in range(n):
        d = defects[i % len(defects)]
        image, mask, box = add_defect(make_board(d.board_seed, size), d.class_id, d.defect_seed)
        x0, y0, x1, y1 = patch_window(box, window, size)
        target = background(GLOBAL_OFFSET, i, size, panel).copy()
        target_mask = np.zeros(target.shape[:2], dtype=bool)
        x, y = windows[i].tolist()
        target[y : y + window, x : x + window] = image[y0:y1, x0:x1]
        target_mask[y : y + window, x : x + window] = mask[y0:y1, x0:x1]
        images.append(target)
        masks.append(target_mask)
    classes = torch.tensor([defects[i % len(defects)].class_id for i in range(n)])
    return Boards(from_uint8(np.stack(images)), torch.from_numpy(np.stack(masks))[:, None], classes)


def perlin_noise(height: int, width: int, cells: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """(height, width) 2-D gradient (Perlin) noise with cells[0] x cells[1] lattice cells, about in [-1, 1]."""
    ry, rx = cells
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1, generator=g)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    ys = torch.linspace(0, ry, height + 1)[:-1]
    xs = torch.linspace(0, rx, width + 1)[:-1]
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    iy, ix = py.floor().long(), px.floor().long()
    fy, fx = py - iy, px - ix

    def corner(dy: int, dx: int) -> torch.Tensor:
        grad = gradients[iy + dy, ix + dx]
        return grad[..., 0] * (fx - dx) + grad[..., 1] * (fy - dy)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) + ux * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + ux * (corner(1, 1) - corner(1, 0))
    return math.sqrt(2) * (top + uy * (bottom - top))


def perlin_anomalies(
    n: int, size: int, seed: int = 0, threshold: float = 0.5, max_scale: int = 3, panel: Panel = None
) -> Boards:
    """DRAEM-style anomalies (Zavrtanik et al. 2021) on the global model's defect-free training boards
    (with `panel`, its W x H panels; the noise and the anomaly are drawn square, side max(W, H), and cut).

    A Perlin noise map with 2^a x 2^b cells (a, b uniform in 0..max_scale), rotated by a multiple of
    90 degrees and thresholded at `threshold`, is the mask M; the anomaly fills M with pixels of another
    board (rotated, colour-shuffled: our stand-in for DRAEM's texture set) blended as
    I' = (1 - M) I + M ((1 - beta) A + beta I), beta ~ U[0, 0.8]. Draws with an empty mask are redrawn.
    """
    g = torch.Generator().manual_seed(seed)
    width, height = panel or (size, size)
    side = max(width, height)
    images, masks = [], []
    for i in range(n):
        board = from_uint8(background(GLOBAL_OFFSET, i, size, panel)[None])[0]
        mask = torch.zeros(height, width, dtype=torch.bool)
        while not mask.any():
            a, b = torch.randint(0, max_scale + 1, (2,), generator=g).tolist()
            noise = perlin_noise(side, side, (2**a, 2**b), g)
            mask = (torch.rot90(noise, int(torch.randint(4, (1,), generator=g))) > threshold)[:height, :width]
        square = None if panel is None else (side, side)
        anomaly = from_uint8(background(ANOMALY_SOURCES, i, size, square)[None])[0]
        anomaly = torch.rot90(anomaly, int(torch.randint(4, (1,), generator=g)), dims=(1, 2))[:, :height, :width]
        anomaly = anomaly[torch.randperm(3, generator=g)]
        beta = 0.8 * float(torch.rand(1, generator=g))
        m = mask.float()[None]
        images.append((1 - m) * board + m * ((1 - beta) * anomaly + beta * board))
        masks.append(mask[None])
    return Boards(torch.stack(images), torch.stack(masks), torch.full((n,), -1))
