"""The hard-negative grid of the paper's Fig. 2: anchors and the negatives mined for them (no Ray).

One row per anchor: the anchor (green frame) followed by its negatives, most similar first (red
frames). Returned as an (H, W, 3) uint8 array, the layout wandb.Image and PNG writers take.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

ANCHOR_COLOUR = (40, 170, 60)
NEGATIVE_COLOUR = (200, 40, 40)
BACKGROUND = (255, 255, 255)


def _framed(image: Image.Image, cell: int, border: int, colour: tuple[int, int, int]) -> Image.Image:
    inner = cell - 2 * border
    fitted = ImageOps.pad(image.convert("RGB"), (inner, inner), color=BACKGROUND)  # aspect kept, letterboxed
    return ImageOps.expand(fitted, border=border, fill=colour)


def negatives_grid(rows: Sequence[Sequence[Image.Image]], cell: int = 96, border: int = 3, gap: int = 4
                   ) -> np.ndarray:
    """rows[i] = [anchor, negative_1, ..., negative_N] as PIL images -> (H, W, 3) uint8."""
    if not rows or not rows[0]:
        raise ValueError("the grid needs at least one row with an anchor")
    columns = max(len(row) for row in rows)
    width = columns * cell + (columns + 1) * gap
    height = len(rows) * cell + (len(rows) + 1) * gap
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            colour = ANCHOR_COLOUR if c == 0 else NEGATIVE_COLOUR
            canvas.paste(_framed(image, cell, border, colour),
                         (gap + c * (cell + gap), gap + r * (cell + gap)))
    return np.asarray(canvas, dtype=np.uint8)
