"""Turn board geometry into a photograph-like RGB image.

Copper, pads, holes and silkscreen are drawn as binary layers on a canvas SUPERSAMPLE times larger
than the image, box-filtered down to coverage in [0, 1], and composited over a textured, unevenly lit
solder mask. Texture and lighting are fixed per board, so re-rendering edited layers changes exactly
the pixels whose coverage changed.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

from dmgr.data.shapes import Mark, Pad, Trace, draw_disc, draw_mark, draw_pad, draw_trace

SUPERSAMPLE = 4
LAYERS = ("trace", "pad", "hole", "silk")

MASK_GREENS = np.array([(24, 92, 46), (30, 104, 54), (20, 80, 42), (34, 96, 40), (26, 88, 58)], dtype=np.float32)
COPPER = np.array((196, 152, 78), dtype=np.float32)
PAD = np.array((222, 184, 102), dtype=np.float32)
HOLE = np.array((16, 17, 16), dtype=np.float32)
SILK = np.array((232, 234, 226), dtype=np.float32)


def canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """An empty supersampled layer for an image of `size` pixels."""
    img = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    return img, ImageDraw.Draw(img)


def raster_layers(traces: Iterable[Trace], pads: Iterable[Pad], marks: Iterable[Mark], size: int
                  ) -> dict[str, np.ndarray]:
    """Supersampled uint8 layers (0/255); geometry in image pixels. Vias are tented: drawn with the tracks."""
    imgs = {name: canvas(size) for name in LAYERS}
    s = SUPERSAMPLE
    for t in traces:
        draw_trace(imgs["trace"][1], t, s)
    for p in pads:
        draw_pad(imgs["trace" if p.kind == "via" else "pad"][1], p, s)
        if p.hole > 0:
            draw_disc(imgs["hole"][1], p.center, p.hole, s)
    for m in marks:
        draw_mark(imgs["silk"][1], m, s)
    return {name: np.asarray(img) for name, (img, _) in imgs.items()}


def coverage(layer: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the fraction of each pixel a supersampled layer covers."""
    return np.asarray(Image.fromarray(layer).reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Unit-variance noise with about `cells` blobs across, bicubically upsampled to size x size."""
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = Image.fromarray(grid).resize((size * (cells + 3) // cells,) * 2, Image.BICUBIC)
    off = size * 3 // (2 * cells)
    out = np.asarray(big)[off:off + size, off:off + size]
    return (out - out.mean()) / (out.std() + 1e-6)


def make_fields(seed: int, size: int) -> dict[str, np.ndarray]:
    """Per-board palette, lighting and textures. Smooth parts depend on the seed only (not the size)."""
    rng = np.random.default_rng((seed, 1))  # size-independent: colours, lighting, mottling
    green = MASK_GREENS[rng.integers(len(MASK_GREENS))] * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    copper = COPPER * rng.uniform(0.92, 1.06, 3).astype(np.float32)
    pad = PAD * rng.uniform(0.94, 1.06) * rng.uniform(0.96, 1.04, 3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(-0.25, 0.25, 2)
    light = (1.0 + rng.uniform(0.05, 0.22) * (np.cos(angle) * xx + np.sin(angle) * yy)
             - rng.uniform(0.25, 0.6) * ((xx - cx) ** 2 + (yy - cy) ** 2)
             + 0.04 * smooth_noise(rng, 3, size))
    mottle = smooth_noise(rng, 8, size) * 0.5 + smooth_noise(rng, 24, size) * 0.5
    oxide = smooth_noise(rng, 12, size)
    fine = np.random.default_rng((seed, 2, size))  # per-pixel grain at this resolution
    grain = fine.standard_normal((size, size, 1)).astype(np.float32)
    tint = fine.standard_normal((size, size, 3)).astype(np.float32)
    return {
        "green": green, "copper": copper, "pad": pad,
        "light": (light / light.max() * rng.uniform(1.0, 1.12)).astype(np.float32),
        "mottle": mottle.astype(np.float32), "oxide": oxide.astype(np.float32),
        "grain": grain, "tint": tint,
    }


def composite(cov: dict[str, np.ndarray], f: dict[str, np.ndarray]) -> np.ndarray:
    """(H, W, 3) uint8 from layer coverages and a board's fields."""
    grain = f["grain"] * 0.8 + f["tint"] * 0.6
    mask = f["green"] * (1 + 0.05 * f["mottle"])[..., None] + 3.0 * grain
    copper = f["copper"] * (1 + 0.06 * f["oxide"])[..., None] + 5.0 * grain
    pad = f["pad"] * (1 + 0.04 * f["oxide"])[..., None] + 4.0 * grain
    hole = HOLE + 2.0 * grain
    silk = SILK + 4.0 * grain

    def over(bottom, top, alpha):
        return bottom + (top - bottom) * alpha[..., None]

    t, p = cov["trace"], cov["pad"]
    img = over(mask, copper * (1 - 0.5 * t * (1 - t))[..., None], t)  # slightly dark copper edges
    img = over(img, pad * (1 - 0.4 * p * (1 - p))[..., None], p)
    img = over(img, hole, cov["hole"])
    img = over(img, silk, cov["silk"] * 0.92)
    img = img * f["light"][..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
