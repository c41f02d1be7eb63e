"""Procedural wall and ground textures as numpy arrays (H, W, 3) uint8."""

from __future__ import annotations

import numpy as np
from PIL import Image

from amldist.synth.params import RGB


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], (H, W) float32: a coarse random grid resized bilinearly."""
    grid_w = max(2, cells)
    grid_h = max(2, round(cells * height / max(width, 1)))
    coarse = rng.uniform(0, 255, size=(grid_h, grid_w)).astype(np.uint8)
    resized = Image.fromarray(coarse).resize((max(width, 1), max(height, 1)), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)[:height, :width] / 127.5 - 1.0


def _blocks(rng: np.random.Generator, height: int, width: int, block_h: float, block_w: float,
            stagger: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel block value in [-1, 1] and a boolean joint (mortar) mask for a running-bond wall."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    row = np.floor(ys / block_h).astype(np.int64)
    shifted = xs + (row % 2) * (block_w / 2 if stagger else 0.0)
    col = np.floor(shifted / block_w).astype(np.int64)
    table = rng.uniform(-1, 1, size=(97, 89)).astype(np.float32)
    value = table[row % 97, col % 89]
    joint = ((ys % block_h) < max(1.0, block_h * 0.14)) | ((shifted % block_w) < max(1.0, block_w * 0.06))
    return value, joint


def wall(kind: str, height: int, width: int, color: RGB, trim: RGB, unit: float,
         rng: np.random.Generator) -> np.ndarray:
    """A wall texture; `unit` is the height of one brick course in pixels."""
    base = np.empty((height, width, 3), dtype=np.float32)
    base[:] = color
    trim_arr = np.asarray(trim, dtype=np.float32)
    if kind in ("brick", "stone"):
        block_h = max(2.0, unit * (1.0 if kind == "brick" else 2.4))
        block_w = block_h * (2.3 if kind == "brick" else 1.7)
        value, joint = _blocks(rng, height, width, block_h, block_w, stagger=True)
        base *= (1.0 + value * (0.09 if kind == "brick" else 0.05))[..., None]
        mortar = np.asarray(color, dtype=np.float32) * (1.18 if kind == "brick" else 0.82)
        base[joint] = mortar
    elif kind == "stripes":
        period = max(4.0, unit * 5)
        band = (np.arange(height)[:, None] % period) < period / 2
        base[np.broadcast_to(band, (height, width))] = trim_arr
    elif kind == "glass":
        # Sky reflected in glass: brighter at the top, with a diagonal sheen.
        ramp = np.linspace(1.2, 0.85, height, dtype=np.float32)[:, None]
        sheen = 0.08 * np.sin((np.arange(width)[None, :] + np.arange(height)[:, None]) / max(8.0, unit * 12))
        base *= (ramp + sheen)[..., None]
    base *= (1.0 + 0.05 * smooth_noise(rng, height, width, 12))[..., None]  # weathering
    base *= (1.0 + 0.02 * rng.standard_normal((height, width), dtype=np.float32))[..., None]
    return np.clip(base, 0, 255).astype(np.uint8)


def ground(pattern: str, height: int, width: int, color: RGB, rng: np.random.Generator) -> np.ndarray:
    """Ground below the horizon; lines converge to a vanishing point to suggest depth."""
    ys, xs = np.ogrid[0:height, 0:width]
    depth = (ys.astype(np.float32) + 2.0) / max(height, 1)  # (H, 1): 0 at the horizon, 1 at the bottom
    if pattern == "grass":
        factor = (1.0 + 0.12 * smooth_noise(rng, height, width, 40)
                  + 0.08 * smooth_noise(rng, height, width, 8))
        factor += 0.08 * rng.standard_normal((height, width), dtype=np.float32)
    else:
        tile = 0.12 if pattern == "paving" else 0.35
        along = (xs.astype(np.float32) - width / 2) / (depth * width * tile)  # (H, W) lateral, in tiles
        across = 2.0 / (depth * tile)  # (H, 1) distance from the viewer, in half tiles
        lines = ((np.abs(along - np.round(along)) < 0.04 / np.clip(depth, 0.2, None))
                 | (np.abs(across - np.round(across)) < 0.12 * depth))
        factor = 1.0 + 0.06 * smooth_noise(rng, height, width, 25) - 0.2 * lines
    factor *= 0.85 + 0.2 * depth  # the far ground is hazier and darker
    return np.clip(factor[..., None] * np.asarray(color, dtype=np.float32), 0, 255).astype(np.uint8)


def sky(height: int, width: int, top: RGB, bottom: RGB) -> np.ndarray:
    t = np.linspace(0.0, 1.0, max(height, 1), dtype=np.float32)[:, None]
    column = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)  # (H, 3)
    return np.broadcast_to(column[:, None, :], (height, width, 3)).astype(np.uint8)
