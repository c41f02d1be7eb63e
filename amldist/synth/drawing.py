"""Drawing helpers shared by the scene, facade and occluder painters."""

from __future__ import annotations

from PIL import ImageDraw

from amldist.synth.params import RGB


def shade(color: RGB, factor: float) -> RGB:
    return tuple(int(min(255, max(0, c * factor))) for c in color)  # type: ignore[return-value]


def _ordered(xy) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (*xy[0], *xy[1]) if len(xy) == 2 else xy
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


class SafeDraw(ImageDraw.ImageDraw):
    """ImageDraw that accepts boxes with swapped corners.

    Parts are laid out in proportions of their parent; on small canvases some proportions round
    to boxes whose corners cross, which PIL rejects. Such parts are a pixel or two in size, so
    drawing the ordered box is the right picture.
    """

    def rectangle(self, xy, *args, **kwargs):
        return super().rectangle(_ordered(xy), *args, **kwargs)

    def rounded_rectangle(self, xy, *args, **kwargs):
        return super().rounded_rectangle(_ordered(xy), *args, **kwargs)

    def ellipse(self, xy, *args, **kwargs):
        return super().ellipse(_ordered(xy), *args, **kwargs)

    def pieslice(self, xy, *args, **kwargs):
        return super().pieslice(_ordered(xy), *args, **kwargs)
