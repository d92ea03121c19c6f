"""The six PKU-Market-PCB defect classes, drawn into a board's layers with exact pixel masks.

`add_defect(board, class_id, seed, center)` edits the supersampled layers (adds or removes copper, fills
a drill hole), re-renders, and returns the image, the mask of exactly the pixels that changed and its box.
Sizes are in design units (a 256-unit board) times `board.scale`, with a floor in pixels so a defect
stays visible on small boards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dmgr.data.board import Board
from dmgr.data.render import SUPERSAMPLE, canvas
from dmgr.data.shapes import Trace, draw_disc, draw_polygon, draw_trace, segments
from dmgr.images import bounding_box

CLASS_NAMES = ("missinghole", "mousebite", "opencircuit", "short", "spur", "spuriouscopper")

Edit = tuple[str, str, np.ndarray]  # (layer, "add" | "remove", supersampled bool mask)
Site = tuple[int, np.ndarray, np.ndarray, np.ndarray, float]  # trace index, point, direction, normal, width
MAX_TRIES = 40


def class_id_of(name_or_id: str | int) -> int:
    """The class id of a class name (or a checked id)."""
    if isinstance(name_or_id, str):
        if name_or_id not in CLASS_NAMES:
            raise ValueError(f"unknown defect class {name_or_id!r}; known: {', '.join(CLASS_NAMES)}")
        return CLASS_NAMES.index(name_or_id)
    if not 0 <= int(name_or_id) < len(CLASS_NAMES):
        raise ValueError(f"defect class id must be in [0, {len(CLASS_NAMES) - 1}], got {name_or_id}")
    return int(name_or_id)


def add_defect(board: Board, class_id: int | str, seed: int, center: Sequence[float] | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(image uint8 HxWx3, mask bool HxW, box [x0, y0, x1, y1]) of `board` with one defect.

    The defect goes at the suitable place nearest `center` (x, y in pixels), or at a random suitable
    place. The mask holds exactly the pixels that differ from `board.image`; the box is exclusive-end.
    Deterministic in (board seed, seed, class).
    """
    cid = class_id_of(class_id)
    if seed < 0:
        raise ValueError(f"defect seed must be >= 0, got {seed}")
    rng = np.random.default_rng((board.seed, int(seed), cid, board.size))
    target = None if center is None else np.asarray(center, dtype=float)
    for edits, _ in zip(_PLACERS[cid](board, rng, target), range(MAX_TRIES), strict=False):
        layers = dict(board.layers)
        for name, op, m in edits:
            layers[name] = np.where(m, np.uint8(255 if op == "add" else 0), layers[name])
        image = board.render(layers)
        mask = (image != board.image).any(axis=-1)
        if mask.any():
            return image, mask, bounding_box(mask)
    raise RuntimeError(f"no place for a {CLASS_NAMES[cid]} defect on board seed {board.seed}")


def defect_sites(board: Board, class_id: int | str) -> np.ndarray:
    """(N, 2) the x, y pixel centres where `add_defect` can put a defect of the class on this board: drilled
    pads (missinghole), straight trace stretches (mousebite, opencircuit), beside them on free solder mask
    (spur), the middle between two neighbouring traces (short), bare solder mask (spuriouscopper): the demo's
    per-class ROIs."""
    cid = class_id_of(class_id)
    if cid == 0:
        points = [p.center for p in _drilled_pads(board)]
    elif cid == 3:
        points = [(p + q) / 2 for p, q, *_ in _short_sites(board)]
    elif cid == 4:  # the middle of a finger of mean length, on a free side of the trace
        reach = [(p, n * (w / 2 + _px(board, 11.5, 2.5) / 2)) for _, p, _, n, w in _trace_sites(
            board, *_trace_margins(board, cid))]
        points = [p + side * r for p, r in reach for side in (-1.0, 1.0) if not _occupied(board, (p + side * r)[None])]
    elif cid == 5:
        return _free_points(board, _px(board, 6.75, 1.6))
    else:
        points = [site[1] for site in _trace_sites(board, *_trace_margins(board, cid))]
    return np.array(points, dtype=float).reshape(-1, 2)


# --- helpers -----------------------------------------------------------------------------------------


def _paint(board: Board, draw_fn: Callable) -> np.ndarray:
    """A supersampled bool mask drawn by draw_fn(draw, scale) in image pixel coordinates."""
    img, draw = canvas(board.size)
    draw_fn(draw, SUPERSAMPLE)
    return np.asarray(img) > 0


def _own(board: Board, trace: Trace) -> np.ndarray:
    return _paint(board, lambda d, s: draw_trace(d, trace, s))


def _occupied(board: Board, points: np.ndarray) -> bool:
    """True when any of the (N, 2) pixel points falls on copper, a pad, a hole or silkscreen (or off the board)."""
    hi = np.floor(points * SUPERSAMPLE).astype(int)
    n = board.size * SUPERSAMPLE
    if (hi < 0).any() or (hi >= n).any():
        return True
    return any(bool(board.layers[k][hi[:, 1], hi[:, 0]].any()) for k in ("trace", "pad", "hole", "silk"))


def _order(n: int, points: np.ndarray, rng: np.random.Generator, target: np.ndarray | None) -> np.ndarray:
    """Indices of the candidates: nearest the target first, or a random order."""
    if target is None:
        return rng.permutation(n)
    return np.argsort(np.hypot(*(points - target).T), kind="stable")


def _trace_sites(board: Board, end_margin: float, edge_margin: float) -> list[Site]:
    """Points along straight stretches of traces, away from ends, bends, pads and the image border."""
    step = max(1.0, 2.0 * board.scale)
    centres = np.array([p.center for p in board.pads]).reshape(-1, 2)
    reach = np.array([p.radius * 1.42 for p in board.pads])
    sites: list[Site] = []
    for ti, trace in enumerate(board.traces):
        em = trace.width + end_margin
        for a, _, u, n, length in segments(trace):
            if length <= 2 * em:
                continue
            pts = a + np.arange(em, length - em, step)[:, None] * u
            ok = ((pts >= edge_margin) & (pts <= board.size - edge_margin)).all(axis=1)
            if len(centres):
                d = np.hypot(pts[:, None, 0] - centres[None, :, 0], pts[:, None, 1] - centres[None, :, 1])
                ok &= (d > reach[None] + trace.width / 2 + end_margin).all(axis=1)
            sites += [(ti, p, u, n, trace.width) for p in pts[ok]]
    return sites


def _trace_margins(board: Board, class_id: int) -> tuple[float, float]:
    """(end margin, image-edge margin) in pixels of the trace sites of a trace class."""
    end, edge = {1: (12.0, 8.0), 2: (6.0, 8.0), 4: (4.0, 14.0)}[class_id]
    return end * board.scale, 2 + edge * board.scale


def _sites_in_order(board, rng, target, end_margin, edge_margin) -> Iterator[Site]:
    """Trace sites nearest the target first; without one, a random order that favours straight
    horizontal/vertical stretches (a defect on a 45-degree track is hard to read on small boards)."""
    sites = _trace_sites(board, end_margin, edge_margin)
    if not sites:
        return
    if target is None:
        diagonal = np.array([abs(s[2][0] * s[2][1]) > 0.1 for s in sites])
        order = np.argsort(rng.random(len(sites)) + 0.6 * diagonal, kind="stable")
    else:
        order = _order(len(sites), np.array([s[1] for s in sites]), rng, target)
    for i in order:
        yield sites[i]


def _px(board: Board, units: float, floor: float) -> float:
    return max(units * board.scale, floor)


# --- the six classes -----------------------------------------------------------------------------------


def _drilled_pads(board: Board) -> list:
    """The through-hole pads a missing hole can go into (whole pad inside the image, 1 px to spare)."""
    margin = 1.0
    return [p for p in board.pads if p.kind == "pad" and p.hole > 0
            and margin + p.radius <= min(p.center) and max(p.center) <= board.size - margin - p.radius]


def _missinghole(board: Board, rng, target) -> Iterator[list[Edit]]:
    """A through-hole pad that was never drilled: its hole is filled with pad copper."""
    pads = _drilled_pads(board)
    pts = np.array([p.center for p in pads]).reshape(-1, 2)
    for i in _order(len(pads), pts, rng, target)[:MAX_TRIES]:
        pad = pads[i]
        fill = _paint(board, lambda d, s, pad=pad: draw_disc(d, pad.center, pad.hole + 1.0 / SUPERSAMPLE, s))
        yield [("hole", "remove", fill)]


def _opencircuit(board: Board, rng, target) -> Iterator[list[Edit]]:
    """A gap etched across a trace: the solder mask shows through, between ragged slanted edges."""
    for ti, p, u, n, w in _sites_in_order(board, rng, target, *_trace_margins(board, 2)):
        gap = _px(board, rng.uniform(6.0, 11.0), 1.8)
        half = w / 2 + max(board.scale, 0.5)
        slant = rng.uniform(-0.4, 0.4) * w
        across = np.array([-1.0, -0.33, 0.33, 1.0])  # four points on each cut edge, jittered along the trace
        left = [p + u * (-gap / 2 + slant * a / 2 + rng.uniform(-0.18, 0.18) * gap) + n * half * a for a in across]
        right = [p + u * (gap / 2 + slant * a / 2 + rng.uniform(-0.18, 0.18) * gap) + n * half * a for a in across]
        poly = left + right[::-1]
        cut = _paint(board, lambda d, s, c=poly: draw_polygon(d, [tuple(q) for q in c], s))
        yield [("trace", "remove", cut & _own(board, board.traces[ti]))]


def _mousebite(board: Board, rng, target) -> Iterator[list[Edit]]:
    """A row of small round nibbles bitten out of one edge of a trace."""
    for ti, p, u, n, w in _sites_in_order(board, rng, target, *_trace_margins(board, 1)):
        k = int(rng.integers(2, 5))
        r = max(rng.uniform(0.28, 0.42) * w, 1.0)
        side = rng.choice([-1.0, 1.0])
        spacing = r * rng.uniform(1.4, 2.0)
        centres = [p + side * n * (w / 2 - rng.uniform(-0.1, 0.25) * r) + u * ((i - (k - 1) / 2) * spacing
                   + rng.uniform(-0.2, 0.2) * r) for i in range(k)]
        radii = [r * rng.uniform(0.75, 1.15) for _ in range(k)]
        bites = _paint(board, lambda d, s, c=centres, rr=radii: [draw_disc(d, tuple(q), ri, s) for q, ri in zip(
            c, rr, strict=True)])
        yield [("trace", "remove", bites & _own(board, board.traces[ti]))]


def _spur(board: Board, rng, target) -> Iterator[list[Edit]]:
    """A thin tapering copper finger sticking out of a trace edge into free solder mask."""
    for _, p, u, n, w in _sites_in_order(board, rng, target, *_trace_margins(board, 4)):
        length = _px(board, rng.uniform(8.0, 15.0), 2.5)
        base = _px(board, rng.uniform(1.6, 3.2), 1.0)
        angle = np.deg2rad(rng.uniform(-30, 30))
        for side in rng.permutation([-1.0, 1.0]):
            out = side * n
            v = out * np.cos(angle) + u * np.sin(angle)
            root = p + out * w / 2
            probe = root + np.outer(np.linspace(0.5 / SUPERSAMPLE + 0.5, length + 4 * board.scale, 12), v)
            probe = np.concatenate([probe + u * base, probe - u * base])
            if _occupied(board, probe):
                continue
            bend = rng.uniform(-0.25, 0.25) * base
            poly = [root - out * min(1.0, w / 3) - u * base, root + v * length * 0.5 - u * base * 0.55 + u * bend,
                    root + v * length - u * 0.15, root + v * length + u * 0.15,
                    root + v * length * 0.5 + u * base * 0.55 + u * bend, root - out * min(1.0, w / 3) + u * base]
            yield [("trace", "add", _paint(board, lambda d, s, q=poly: draw_polygon(d, [tuple(x) for x in q], s)))]
            break


def _short_sites(board: Board) -> list[tuple]:
    """(p, q, u, width at p, width at q): facing points p, q on two neighbouring parallel traces."""
    sites = []
    for i, j in board.pairs:
        ti, tj = board.traces[i], board.traces[j]
        for (a, _, u, n, length), (aj, _, _, _, lj) in zip(segments(ti), segments(tj), strict=False):
            em = max(ti.width, tj.width) * 1.5
            ts = np.arange(em, length - em, max(1.0, 2.0 * board.scale))
            for t in ts:
                p = a + u * t
                q = p + n * float((aj - p) @ n)
                tq = float((q - aj) @ u)
                if em < tq < lj - em and (np.minimum(p, q) > 2).all() and (np.maximum(p, q) < board.size - 2).all():
                    sites.append((p, q, u, ti.width, tj.width))
    return sites


def _short(board: Board, rng, target) -> Iterator[list[Edit]]:
    """An irregular copper bridge joining two neighbouring parallel traces."""
    sites = _short_sites(board)
    if not sites:
        return
    mids = np.array([(p + q) / 2 for p, q, *_ in sites])
    for k in _order(len(sites), mids, rng, target):
        p, q, u, wi, wj = sites[k]
        gap = float(np.hypot(*(q - p)))
        dirn = (q - p) / gap
        probe = p + np.outer(np.linspace(wi / 2 + 0.5, gap - wj / 2 - 0.5, 8), dirn)
        bw = _px(board, rng.uniform(3.5, 7.0), 1.2)
        if _occupied(board, np.concatenate([probe + u * bw, probe - u * bw])):
            continue
        q = q + u * rng.uniform(-0.6, 0.6) * bw
        pinch = rng.uniform(0.45, 1.1, 2)
        mid = (p + q) / 2 + u * rng.uniform(-0.3, 0.3) * bw
        poly = [p - u * bw / 2, mid - u * bw / 2 * pinch[0], q - u * bw / 2, q + u * bw / 2,
                mid + u * bw / 2 * pinch[1], p + u * bw / 2]
        yield [("trace", "add", _paint(board, lambda d, s, x=poly: draw_polygon(d, [tuple(y) for y in x], s)))]


def _spuriouscopper(board: Board, rng, target) -> Iterator[list[Edit]]:
    """An isolated irregular copper blob on bare solder mask."""
    radius = _px(board, rng.uniform(4.5, 9.0), 1.6)
    pts = _free_points(board, radius)
    for i in _order(len(pts), pts, rng, target)[:MAX_TRIES]:
        c = pts[i] + rng.uniform(-0.5, 0.5, 2)
        m = int(rng.integers(7, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, m))
        stretch = rng.uniform(0.6, 1.0)
        rot = rng.uniform(0, np.pi)
        radii = radius * rng.uniform(0.55, 1.1, m)
        local = np.stack([np.cos(angles) * radii, np.sin(angles) * radii * stretch], axis=1)
        rmat = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
        poly = c + local @ rmat.T
        yield [("trace", "add", _paint(board, lambda d, s, x=poly: draw_polygon(d, [tuple(y) for y in x], s)))]


def _free_points(board: Board, radius: float) -> np.ndarray:
    """(N, 2) pixel centres with bare solder mask around them for a blob of `radius` (the emptiest spots of
    a crowded board)."""
    occupied = np.zeros((board.size, board.size), dtype=bool)
    for k in ("trace", "pad", "hole", "silk"):
        occupied |= board.coverage[k] > 0
    keep = int(np.ceil(radius * 1.25 + 3 * board.scale)) + 1
    free = _clear_of(occupied, keep)
    while not free.any() and keep > 1:
        keep -= 1
        free = _clear_of(occupied, keep)
    ys, xs = np.nonzero(free)
    return np.stack([xs, ys], axis=1).astype(float) + 0.5


def _clear_of(occupied: np.ndarray, k: int) -> np.ndarray:
    """Pixels whose (2k+1)^2 neighbourhood is free and inside the image."""
    padded = np.pad(occupied, k, constant_values=True).astype(np.int32)
    c = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    w = 2 * k + 1
    h, wd = occupied.shape
    window = c[w:w + h, w:w + wd] - c[:h, w:w + wd] - c[w:w + h, :wd] + c[:h, :wd]
    return window == 0


_PLACERS = (_missinghole, _mousebite, _opencircuit, _short, _spur, _spuriouscopper)
