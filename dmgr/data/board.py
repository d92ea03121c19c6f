"""Defect-free bare PCB boards: `make_board(seed, size)`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmgr.data.layout import UNITS, make_layout
from dmgr.data.render import LAYERS, composite, coverage, make_fields, raster_layers
from dmgr.data.shapes import Mark, Pad, Trace, scale_mark, scale_pad, scale_trace

MIN_SIZE, MAX_SIZE = 32, 1024


@dataclass(eq=False)
class Board:
    """A rendered board and its geometry, in image pixels (x right, y down).

    `pairs` are indices of adjacent parallel traces (one bus). `layers` are the supersampled binary
    layers and `fields` the board's palette, lighting and textures: `render(layers)` re-renders edited
    layers with everything else unchanged.
    """

    seed: int
    size: int
    image: np.ndarray  # (size, size, 3) uint8
    traces: tuple[Trace, ...]
    pads: tuple[Pad, ...]
    marks: tuple[Mark, ...]
    pairs: tuple[tuple[int, int], ...]
    layers: dict[str, np.ndarray] = field(repr=False)
    fields: dict[str, np.ndarray] = field(repr=False)
    coverage: dict[str, np.ndarray] = field(repr=False)

    @property
    def scale(self) -> float:
        """Image pixels per design unit (the geometry is designed on a 256-unit board)."""
        return self.size / UNITS

    def render(self, layers: dict[str, np.ndarray]) -> np.ndarray:
        """(size, size, 3) uint8 of this board with some layers replaced (unchanged arrays are reused)."""
        cov = {k: self.coverage[k] if layers[k] is self.layers[k] else coverage(layers[k]) for k in LAYERS}
        return composite(cov, self.fields)


def make_board(seed: int, size: int) -> Board:
    """A defect-free board; the same seed gives the same board, at any size the same layout."""
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"board size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if seed < 0:
        raise ValueError(f"board seed must be >= 0, got {seed}")
    size = int(size)
    layout = make_layout(np.random.default_rng(seed))
    s = size / UNITS
    traces = tuple(scale_trace(t, s) for t in layout.traces)
    pads = tuple(scale_pad(p, s) for p in layout.pads)
    marks = tuple(scale_mark(m, s) for m in layout.marks)
    layers = raster_layers(traces, pads, marks, size)
    cov = {k: coverage(v) for k, v in layers.items()}
    fields = make_fields(seed, size)
    image = composite(cov, fields)
    return Board(int(seed), size, image, traces, pads, marks, tuple(layout.pairs), layers, fields, cov)
