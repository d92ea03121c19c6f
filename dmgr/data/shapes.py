"""Board geometry (traces, pads, silkscreen marks) and how each piece is drawn with PIL.

Coordinates are floats; `draw_*` take a scale and an offset so the same shape can be drawn on the
coarse layout grid (design units), on the supersampled render canvas, or grown by a clearance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

Point = tuple[float, float]


@dataclass(frozen=True)
class Trace:
    """A copper track: a polyline with 45/90 degree bends and one width."""

    points: tuple[Point, ...]
    width: float


@dataclass(frozen=True)
class Pad:
    """A round or square copper land; `hole` is the drill radius (0 for none). Vias are small round pads."""

    center: Point
    radius: float  # half side for squares
    shape: str = "round"  # "round" | "square"
    hole: float = 0.0
    kind: str = "pad"  # "pad" | "via" | "smd"


@dataclass(frozen=True)
class Mark:
    """A white silkscreen stroke: a line segment of some width."""

    start: Point
    end: Point
    width: float


def scale_trace(trace: Trace, s: float) -> Trace:
    return Trace(tuple((x * s, y * s) for x, y in trace.points), trace.width * s)


def scale_pad(pad: Pad, s: float) -> Pad:
    return Pad((pad.center[0] * s, pad.center[1] * s), pad.radius * s, pad.shape, pad.hole * s, pad.kind)


def scale_mark(mark: Mark, s: float) -> Mark:
    return Mark((mark.start[0] * s, mark.start[1] * s), (mark.end[0] * s, mark.end[1] * s), mark.width * s)


def _xy(p: Point, scale: float, offset: float) -> tuple[float, float]:
    return (p[0] * scale + offset, p[1] * scale + offset)


def draw_disc(draw: ImageDraw.ImageDraw, center: Point, radius: float, scale=1.0, offset=0.0, fill=255) -> None:
    x, y = _xy(center, scale, offset)
    r = radius * scale
    if r > 0:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def draw_polyline(draw, points, width: float, scale=1.0, offset=0.0, fill=255) -> None:
    """A polyline with round caps and joints."""
    pts = [_xy(p, scale, offset) for p in points]
    w = max(1, int(round(width * scale)))
    draw.line(pts, fill=fill, width=w, joint="curve")
    for p in (points[0], points[-1]):
        draw_disc(draw, p, w / scale / 2, scale, offset, fill)


def draw_trace(draw, trace: Trace, scale=1.0, offset=0.0, grow=0.0, fill=255) -> None:
    draw_polyline(draw, trace.points, trace.width + 2 * grow, scale, offset, fill)


def draw_pad(draw, pad: Pad, scale=1.0, offset=0.0, grow=0.0, fill=255) -> None:
    r = pad.radius + grow
    if pad.shape == "round":
        draw_disc(draw, pad.center, r, scale, offset, fill)
    else:
        x, y = _xy(pad.center, scale, offset)
        draw.rectangle([x - r * scale, y - r * scale, x + r * scale, y + r * scale], fill=fill)


def draw_mark(draw, mark: Mark, scale=1.0, offset=0.0, grow=0.0, fill=255) -> None:
    w = mark.width + 2 * grow
    x0, y0 = _xy(mark.start, scale, offset)
    x1, y1 = _xy(mark.end, scale, offset)
    half = w * scale / 2
    # Square-capped stroke as a rectangle-like polygon (silkscreen ink has crisp ends).
    d = np.array([x1 - x0, y1 - y0], dtype=float)
    n = np.hypot(*d)
    u = d / n if n > 0 else np.array([1.0, 0.0])
    v = np.array([-u[1], u[0]])
    a, b = np.array([x0, y0]) - u * half, np.array([x1, y1]) + u * half
    poly = [tuple(a + v * half), tuple(b + v * half), tuple(b - v * half), tuple(a - v * half)]
    draw.polygon(poly, fill=fill)


def draw_polygon(draw, points, scale=1.0, offset=0.0, fill=255) -> None:
    draw.polygon([_xy(p, scale, offset) for p in points], fill=fill)


def segments(trace: Trace):
    """Yield (start, end, unit direction, unit normal, length) of each segment, as numpy arrays."""
    pts = np.asarray(trace.points, dtype=float)
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        d = b - a
        length = float(np.hypot(*d))
        if length == 0:
            continue
        u = d / length
        yield a, b, u, np.array([-u[1], u[0]]), length


def offset_polyline(points: np.ndarray, offset: float) -> np.ndarray:
    """Offset a polyline sideways by `offset` (mitred joints): the parallel neighbour in a bus."""
    d = np.diff(points, axis=0)
    u = d / np.hypot(d[:, 0], d[:, 1])[:, None]
    n = np.stack([-u[:, 1], u[:, 0]], axis=1)
    out = np.empty_like(points)
    out[0] = points[0] + n[0] * offset
    out[-1] = points[-1] + n[-1] * offset
    for i in range(1, len(points) - 1):
        m = n[i - 1] + n[i]
        m /= np.hypot(*m)
        out[i] = points[i] + m * offset / float(m @ n[i])
    return out
