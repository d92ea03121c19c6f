"""Outer outlines of a mask's 4-connected parts, as polygons along pixel edges (no OpenCV needed).

`inset` moves an outline a small distance inward so that rasterisers which fill the boundary too
(OpenCV's `fillPoly` on integer-truncated vertices, as Ultralytics does) give back the part itself
instead of a mask one pixel wider and taller, while "pixel centre inside" rasterisers are unaffected.
"""

from __future__ import annotations

from collections import deque

import numpy as np

STEPS = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # right, down, left, up (image coordinates, y down)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected parts of a bool mask, each as its own bool mask."""
    seen = np.zeros_like(mask, dtype=bool)
    parts = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        part = np.zeros_like(seen)
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            part[cy, cx] = True
            for dx, dy in STEPS:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        parts.append(part)
    return parts


def outline(part: np.ndarray) -> list[tuple[int, int]]:
    """The outer boundary of one 4-connected part: pixel-corner vertices, clockwise on screen, corners only."""
    padded = np.pad(part, 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for y, x in zip(*np.nonzero(part)):
        py, px = y + 1, x + 1
        if not padded[py - 1, px]:
            edges.setdefault((x, y), []).append((x + 1, y))
        if not padded[py, px + 1]:
            edges.setdefault((x + 1, y), []).append((x + 1, y + 1))
        if not padded[py + 1, px]:
            edges.setdefault((x + 1, y + 1), []).append((x, y + 1))
        if not padded[py, px - 1]:
            edges.setdefault((x, y + 1), []).append((x, y))
    loops = []
    while edges:
        start = min(edges)
        loop, here, heading = [start], start, None
        while True:
            options = edges[here]
            if len(options) > 1 and heading is not None:  # pinch point: turn left, away from holes
                order = {STEPS[(STEPS.index(heading) + turn) % 4]: i for i, turn in enumerate((3, 0, 1))}
                options.sort(key=lambda p: order.get((p[0] - here[0], p[1] - here[1]), 9))
            nxt = options.pop(0)
            if not options:
                del edges[here]
            heading = (nxt[0] - here[0], nxt[1] - here[1])
            here = nxt
            if here == start and (start not in edges):
                break
            loop.append(here)
        loops.append(loop)
    outer = max(loops, key=lambda p: _area(p))
    return _corners(outer)


def _area(points: list[tuple[int, int]]) -> float:
    """Shoelace area, positive for clockwise-on-screen loops (the outer boundary)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))


def _corners(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    n = len(points)
    keep = []
    for i, p in enumerate(points):
        a, b = points[i - 1], points[(i + 1) % n]
        if (p[0] - a[0]) * (b[1] - p[1]) != (p[1] - a[1]) * (b[0] - p[0]):
            keep.append(p)
    return keep


INSET = 1 / 64  # pixels; below 1 / scale, so truncation at any integer upscaling up to 64x keeps the part's pixels


def inset(points: list[tuple[int, int]], delta: float = INSET) -> list[tuple[float, float]]:
    """The clockwise-on-screen outline `points` (corners only) moved `delta` pixels inward along both edges at
    every corner: truncating the vertices then gives the coordinates of the part's boundary pixels."""
    n, out = len(points), []
    for i, (x, y) in enumerate(points):
        (ax, ay), (bx, by) = points[i - 1], points[(i + 1) % n]
        dx_in, dy_in = np.sign(x - ax), np.sign(y - ay)
        dx_out, dy_out = np.sign(bx - x), np.sign(by - y)
        # the interior lies right of the direction of travel: normal (-dy, dx) in image coordinates
        out.append((x + delta * float(-dy_in - dy_out), y + delta * float(dx_in + dx_out)))
    return out
