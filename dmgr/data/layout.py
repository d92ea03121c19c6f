"""Random board layouts in design units (the board is UNITS x UNITS), independent of the render size.

Pieces are placed one by one on an occupancy grid and kept only when they clear what is already there,
so copper never touches by accident. Every layout has a bus of parallel tracks (for shorts), through-hole
pads (for missing holes), free tracks (for opens, spurs, mouse bites) and free solder mask (for spurious
copper).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from dmgr.data.shapes import Mark, Pad, Trace, draw_mark, draw_pad, draw_trace, offset_polyline

UNITS = 256.0
GRID_MARGIN = 24  # grid cells outside the board on every side: tracks run off the edge of the photo
GRID = int(UNITS) + 2 * GRID_MARGIN
CLEARANCE = 5.0  # copper to copper
DIRS = np.array([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)], dtype=float)
DIRS /= np.hypot(DIRS[:, 0], DIRS[:, 1])[:, None]

# 7-segment glyphs (a b c d e f g) for silkscreen reference designators.
GLYPHS = ("1111110", "0110000", "1101101", "1111001", "0110011", "1011011", "1011111", "1110000", "1111111",
          "1001110", "0111110", "0111000", "1100111", "1001111", "0110111", "0001110")


@dataclass
class Layout:
    traces: list[Trace] = field(default_factory=list)
    pads: list[Pad] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # adjacent parallel traces of one bus


class Grid:
    """Occupancy of the board in design units (one cell per unit, with a margin around the board)."""

    def __init__(self) -> None:
        self.occ = np.zeros((GRID, GRID), dtype=bool)

    def raster(self, traces=(), pads=(), marks=(), grow: float = 0.0) -> np.ndarray:
        img = Image.new("L", (GRID, GRID), 0)
        draw = ImageDraw.Draw(img)
        for t in traces:
            draw_trace(draw, t, 1.0, GRID_MARGIN, grow)
        for p in pads:
            draw_pad(draw, p, 1.0, GRID_MARGIN, grow)
        for m in marks:
            draw_mark(draw, m, 1.0, GRID_MARGIN, grow)
        return np.asarray(img) > 0

    def fits(self, traces=(), pads=(), marks=(), grow: float = CLEARANCE) -> bool:
        return not (self.raster(traces, pads, marks, grow) & self.occ).any()

    def add(self, traces=(), pads=(), marks=()) -> None:
        self.occ |= self.raster(traces, pads, marks)

    def fill(self) -> float:
        m = GRID_MARGIN
        return float(self.occ[m:-m, m:-m].mean())


def _inside(p: np.ndarray, margin: float = 0.0) -> bool:
    return bool(margin <= p[0] <= UNITS - margin and margin <= p[1] <= UNITS - margin)


def _walk(rng: np.random.Generator, start, heading: int, spread: float, stop_inside: float = 0.0) -> np.ndarray:
    """A centreline from `start` with 45-degree bends (never turning back) until it leaves the board.

    With probability `stop_inside` per bend the walk ends inside the board (the caller puts a via there).
    """
    pts = [np.asarray(start, dtype=float)]
    h, turned = heading, 0
    for i in range(10):
        axis = h % 2 == 0
        length = rng.uniform(28, 110) + 2 * spread if axis else rng.uniform(14, 40) + spread
        pts.append(pts[-1] + DIRS[h] * length)
        if not _inside(pts[-1], -10):
            return np.array(pts)
        if i > 0 and rng.random() < stop_inside and _inside(pts[-1], 14):
            return np.array(pts)
        options = [t for t in ((-1, 1) if not axis else (-1, 1, -2, 2)) if abs(turned + t) <= 2]
        weights = np.array([1.0 if abs(t) == 1 else 0.25 for t in options])
        t = int(rng.choice(options, p=weights / weights.sum()))
        h, turned = (h + t) % 8, turned + t
    while _inside(pts[-1], -10):  # still on the board: run straight off it
        pts[-1] = pts[-1] + DIRS[h] * 20
    return np.array(pts)


def _trim_start(points: np.ndarray, distance: float) -> np.ndarray | None:
    """The polyline without its first `distance` units (None when the first segment is shorter)."""
    d = points[1] - points[0]
    length = float(np.hypot(*d))
    if length <= distance + 2:
        return None
    out = points.copy()
    out[0] = points[0] + d / length * distance
    return out


def _as_trace(points: np.ndarray, width: float) -> Trace:
    return Trace(tuple((round(float(x), 2), round(float(y), 2)) for x, y in points), round(float(width), 2))


def _edge_start(rng: np.random.Generator, span: float) -> tuple[np.ndarray, int]:
    """A point just off a random board edge and the inward axis heading."""
    edge = int(rng.integers(4))
    along = rng.uniform(24 + span, UNITS - 24 - span)
    starts = {0: ((-16, along), 0), 1: ((along, -16), 2), 2: ((UNITS + 16, along), 4), 3: ((along, UNITS + 16), 6)}
    p, h = starts[edge]
    return np.array(p, dtype=float), h


def _bus(rng, grid: Grid, layout: Layout, starts: np.ndarray, heading: int, width: float, trim: float = 0.0,
         stop_inside: float = 0.0, start_pads: tuple[Pad, ...] = ()) -> bool:
    """Route parallel tracks from `starts` (points across the heading, in order); True when placed.

    `trim` leaves the first units of each track out of the clearance check (tracks leaving a pad);
    `start_pads` are placed together with the tracks (a via the track starts from).
    """
    center = starts.mean(axis=0)
    normal = np.array([-DIRS[heading][1], DIRS[heading][0]])
    offsets = (starts - center) @ normal
    spread = float(np.abs(offsets).max()) * 1.2
    line = _walk(rng, center, heading, spread, stop_inside)
    polys = [offset_polyline(line, float(o)) for o in offsets]
    checks = [_trim_start(p, trim) if trim else p for p in polys]
    if any(c is None for c in checks):
        return False
    end_inside = _inside(line[-1], 0)
    vias = list(start_pads)
    if end_inside:  # end each track on a via, staggered so neighbours keep their clearance
        if len(polys) > 1:
            return False
        end = (round(float(polys[0][-1][0]), 2), round(float(polys[0][-1][1]), 2))
        ring, hole = round(width / 2 + rng.uniform(2.5, 4.0), 2), round(rng.uniform(2.2, 3.2), 2)
        vias.append(Pad(end, ring, "round", hole, "via"))
    traces = [_as_trace(p, width) for p in polys]
    if not grid.fits([_as_trace(c, width) for c in checks], vias):
        return False
    grid.add(traces, vias)
    first = len(layout.traces)
    layout.traces += traces
    layout.pads += vias
    layout.pairs += [(first + i, first + i + 1) for i in range(len(traces) - 1)]
    return True


def _main_bus(rng, grid: Grid, layout: Layout) -> None:
    for _ in range(60):
        n = int(rng.integers(2, 5))
        width = rng.uniform(7.0, 11.0)
        pitch = width + rng.uniform(7.0, 12.0)
        p, h = _edge_start(rng, pitch * n / 2)
        normal = np.array([-DIRS[h][1], DIRS[h][0]])
        starts = p + np.outer(np.arange(n) - (n - 1) / 2, normal) * pitch
        if _bus(rng, grid, layout, starts, h, width):
            return
    raise RuntimeError("could not place the main bus")  # unreachable on an empty board


def _footprint(rng, grid: Grid, layout: Layout) -> tuple[float, float, float, float] | None:
    """A row (or two) of through-hole pads; returns its extent (x0, y0, x1, y1) when placed."""
    n = int(rng.integers(2, 7))
    r = rng.uniform(7.5, 11.5)
    pitch = 2 * r + rng.uniform(9.0, 14.0)
    rows = 2 if rng.random() < 0.35 else 1
    row_gap = pitch * rng.uniform(2.5, 4.0)
    vertical = rng.random() < 0.5
    along, across = n * pitch, (rows - 1) * row_gap
    sx, sy = (across, along) if vertical else (along, across)
    if max(sx, sy) > UNITS - 26 - 2 * r:
        return None
    x = rng.uniform(12 + r, UNITS - 12 - r - sx)
    y = rng.uniform(12 + r, UNITS - 12 - r - sy)
    square = rng.random() < 0.3
    hole = r * rng.uniform(0.42, 0.55)
    pads, rows_of = [], []
    for row in range(rows):
        centres = [(x + row * row_gap, y + i * pitch) if vertical else (x + i * pitch, y + row * row_gap)
                   for i in range(n)]
        rows_of.append(centres)
        for i, c in enumerate(centres):
            shape = "square" if square or (i == 0 and row == 0 and rng.random() < 0.6) else "round"
            pads.append(Pad((round(c[0], 2), round(c[1], 2)), round(r, 2), shape, round(hole, 2), "pad"))
    if not grid.fits(pads=pads, grow=CLEARANCE + 3):
        return None
    grid.add(pads=pads)
    layout.pads += pads
    # Tracks leave each row outwards, as a bus with the pad pitch, or as single stubs.
    width = rng.uniform(6.0, min(10.0, r * 1.1))
    for row, centres in enumerate(rows_of):
        out = (-1, 1)[row] if rows == 2 else int(rng.choice([-1, 1]))
        heading = (0 if out > 0 else 4) if vertical else (2 if out > 0 else 6)
        centres = np.array(centres)
        k = int(rng.integers(2, n + 1))
        first = int(rng.integers(0, n - k + 1))
        trim = r + width / 2 + CLEARANCE + 1
        if not _bus(rng, grid, layout, centres[first:first + k], heading, width, trim):
            for c in centres[first:first + k]:
                if rng.random() < 0.7:
                    _bus(rng, grid, layout, c[None], heading, width, trim, stop_inside=0.5)
    return (x - r, y - r, x + sx + r, y + sy + r)


def _smd(rng, grid: Grid, layout: Layout) -> tuple[float, float, float, float] | None:
    """A two-terminal surface-mount land pattern (square pads, no holes)."""
    r = rng.uniform(4.5, 7.0)
    gap = r * rng.uniform(2.4, 3.4)
    vertical = rng.random() < 0.5
    x, y = rng.uniform(20, UNITS - 20 - gap), rng.uniform(20, UNITS - 20 - gap)
    b = (x, y + gap) if vertical else (x + gap, y)
    pads = [Pad((round(x, 2), round(y, 2)), round(r, 2), "square", 0.0, "smd"),
            Pad((round(b[0], 2), round(b[1], 2)), round(r, 2), "square", 0.0, "smd")]
    if not grid.fits(pads=pads, grow=CLEARANCE + 3):
        return None
    grid.add(pads=pads)
    layout.pads += pads
    return (x - r, y - r, b[0] + r, b[1] + r)


def _route(rng, grid: Grid, layout: Layout) -> None:
    """A free bus or a single track, from an edge or from a via."""
    width = rng.uniform(6.5, 12.0)
    if rng.random() < 0.55:
        n = int(rng.integers(1, 4))
        pitch = width + rng.uniform(6.0, 12.0)
        p, h = _edge_start(rng, pitch * n / 2)
        normal = np.array([-DIRS[h][1], DIRS[h][0]])
        starts = p + np.outer(np.arange(n) - (n - 1) / 2, normal) * pitch
        _bus(rng, grid, layout, starts, h, width, stop_inside=0.3 if n == 1 else 0.0)
        return
    c = rng.uniform(20, UNITS - 20, size=2)
    via = Pad((round(c[0], 2), round(c[1], 2)), round(width / 2 + rng.uniform(2.5, 4.0), 2), "round",
              round(rng.uniform(2.2, 3.2), 2), "via")
    if not grid.fits(pads=[via]):
        return
    h = int(rng.integers(0, 4)) * 2
    trim = via.radius + width / 2 + CLEARANCE + 1
    _bus(rng, grid, layout, c[None], h, width, trim=trim, stop_inside=0.4, start_pads=(via,))


def _glyph_marks(x: float, y: float, code: str, w: float, h: float, stroke: float) -> list[Mark]:
    segs = {0: ((0, 0), (1, 0)), 1: ((1, 0), (1, 0.5)), 2: ((1, 0.5), (1, 1)), 3: ((0, 1), (1, 1)),
            4: ((0, 0.5), (0, 1)), 5: ((0, 0), (0, 0.5)), 6: ((0, 0.5), (1, 0.5))}
    return [Mark((x + a[0] * w, y + a[1] * h), (x + b[0] * w, y + b[1] * h), stroke)
            for i, (a, b) in segs.items() if code[i] == "1"]


def _label(rng, grid: Grid, layout: Layout, near: tuple[float, float, float, float] | None) -> None:
    """A short silkscreen reference designator next to `near` (or anywhere)."""
    h = rng.uniform(7.0, 10.0)
    w, stroke = h * 0.55, rng.uniform(1.4, 2.0)
    n = int(rng.integers(2, 4))
    for _ in range(8):
        if near is None:
            x, y = rng.uniform(8, UNITS - 8 - n * w * 1.6), rng.uniform(8, UNITS - 8 - h)
        else:
            x0, y0, x1, y1 = near
            side = int(rng.integers(4))
            x = (x0, x0, x1 + 5, x0 - 5 - n * w * 1.6)[side] + rng.uniform(-3, 3)
            y = (y0 - 6 - h, y1 + 6, y0, y0)[side] + rng.uniform(-3, 3)
        if not (_inside(np.array([x, y]), 6) and _inside(np.array([x + n * w * 1.6, y + h]), 6)):
            continue
        marks = [m for i in range(n) for m in
                 _glyph_marks(x + i * w * 1.6, y, GLYPHS[int(rng.integers(len(GLYPHS)))], w, h, stroke)]
        if grid.fits(marks=marks, grow=3.0):
            grid.add(marks=marks)
            layout.marks += marks
            return


def _outline(rng, grid: Grid, layout: Layout, box: tuple[float, float, float, float]) -> None:
    """A silkscreen component outline around `box`: the sides that clear the copper."""
    gap = rng.uniform(4.0, 6.0)
    x0, y0, x1, y1 = box[0] - gap, box[1] - gap, box[2] + gap, box[3] + gap
    stroke = rng.uniform(1.4, 2.0)
    for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        m = Mark(a, b, stroke)
        if grid.fits(marks=[m], grow=2.5):
            grid.add(marks=[m])
            layout.marks.append(m)


def make_layout(rng: np.random.Generator) -> Layout:
    """One board: a main bus, components with through-hole pads, more routing, vias and silkscreen."""
    grid, layout = Grid(), Layout()
    _main_bus(rng, grid, layout)
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        for _ in range(25):
            box = _footprint(rng, grid, layout)
            if box is not None:
                boxes.append(box)
                break
    while sum(p.kind == "pad" for p in layout.pads) < 2:  # guarantee holes to leave out
        r = rng.uniform(7.5, 10.0)
        c = rng.uniform(16, UNITS - 16, size=2)
        pad = Pad((round(c[0], 2), round(c[1], 2)), round(r, 2), "round", round(r * 0.5, 2), "pad")
        if grid.fits(pads=[pad], grow=CLEARANCE + 3):
            grid.add(pads=[pad])
            layout.pads.append(pad)
    for _ in range(int(rng.integers(0, 3))):
        box = _smd(rng, grid, layout)
        if box is not None:
            boxes.append(box)
    target = rng.uniform(0.28, 0.4)
    for _ in range(80):
        if grid.fill() >= target:
            break
        _route(rng, grid, layout)
    for box in boxes:
        if rng.random() < 0.7:
            _outline(rng, grid, layout, box)
        _label(rng, grid, layout, box)
    for _ in range(int(rng.integers(0, 3))):
        _label(rng, grid, layout, None)
    return layout
