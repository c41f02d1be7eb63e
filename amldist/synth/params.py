"""Parameter records of a synthetic landmark scene, and colour helpers.

Coordinates are normalised: x in [0, 1] across the scene, y in [0, SCENE_HEIGHT] downwards;
render.py scales them to pixels.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

SCENE_HEIGHT = 0.75  # scene height / scene width (a 4:3 canvas)
STYLES = ("gothic", "classical", "castle", "modern", "townhall")
# Style mix of each pool of landmarks: the two test sets differ in flavour like Oxford and Paris.
STYLE_WEIGHTS = {
    "train": (1.0, 1.0, 1.0, 1.0, 1.0),
    "roxford5k": (4.0, 1.5, 2.5, 0.0, 2.0),
    "rparis6k": (1.5, 4.0, 0.0, 2.0, 2.5),
    "distractors": (1.0, 1.0, 1.0, 1.0, 1.0),
}
LANDSCAPE_PROB = {"distractors": 0.2}  # scenes without any building

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class LandmarkSpec:
    landmark_id: int  # global id, unique over the whole synthetic root (also the SfM cluster id)
    family_id: int  # landmarks with the same family id are look-alikes
    pool: str  # key of STYLE_WEIGHTS


@dataclass(frozen=True)
class Tower:
    cx: float
    width: float
    top: float  # y where the tower's roof starts
    roof: str  # spire | pyramid | dome | crenel | flat
    roof_height: float
    windows: int
    clock: bool


@dataclass(frozen=True)
class Dome:
    cx: float
    width: float
    height: float
    drum: float  # height of the cylinder under the cap
    color: RGB
    lantern: bool


@dataclass(frozen=True)
class Facade:
    x0: float
    y0: float
    x1: float
    y1: float  # the ground line
    wall: RGB
    trim: RGB
    texture: str  # brick | stone | stripes | plain | glass
    texture_scale: float
    roof: str  # gable | flat | mansard | crenel
    roof_color: RGB
    roof_height: float
    window_rows: int
    window_cols: int
    window_shape: str  # rect | arch | round
    window_color: RGB
    arches: int
    columns: int
    bands: int
    rose: bool
    towers: tuple[Tower, ...]
    dome: Dome | None


@dataclass(frozen=True)
class Surroundings:
    horizon: float
    sky_top: RGB
    sky_bottom: RGB
    clouds: tuple[tuple[float, float, float, float], ...]  # (x, y, rx, ry)
    hills: tuple[float, ...]  # hill heights above the horizon at evenly spaced x
    hill_color: RGB
    ground: RGB
    ground_pattern: str  # paving | grass | plaza
    neighbours: tuple[tuple[float, float, float, RGB], ...]  # (x0, x1, top, colour)
    trees: tuple[tuple[float, float, RGB], ...]  # (x, radius, colour)


@dataclass(frozen=True)
class Landmark:
    spec: LandmarkSpec
    style: str  # one of STYLES, or 'landscape'
    facade: Facade | None
    surroundings: Surroundings

    def box(self) -> tuple[float, float, float, float]:
        """The landmark's bounding box (x0, y0, x1, y1), towers and dome included."""
        f = self.facade
        if f is None:  # a landscape: the central part of the view stands in for the "landmark"
            return (0.3, 0.25, 0.7, self.surroundings.horizon + 0.05)
        x0, y0, x1 = f.x0, f.y0 - f.roof_height, f.x1
        for t in f.towers:
            x0, x1 = min(x0, t.cx - t.width / 2), max(x1, t.cx + t.width / 2)
            y0 = min(y0, t.top - t.roof_height)
        if f.dome is not None:
            y0 = min(y0, f.y0 - f.dome.drum - f.dome.height - (0.02 if f.dome.lantern else 0.0))
        return (x0, y0, x1, f.y1)


def hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return (int(r * 255), int(g * 255), int(b * 255))


def jitter(color: RGB, rng: np.random.Generator, amount: float) -> RGB:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in color))
    return hsv(h + rng.uniform(-0.25, 0.25) * amount, s + rng.uniform(-1, 1) * amount * 2,
               v + rng.uniform(-1, 1) * amount * 2)
