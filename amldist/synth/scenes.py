"""Landmarks: the structure, palette and surroundings of each synthetic scene.

A landmark is a facade (body, roof, windows, arches, columns, towers, dome; see facades.py)
standing in its surroundings (sky, clouds, hills, ground, neighbouring houses, trees).

Look-alikes: landmarks of one family start from the same prototype (drawn from the family's
seed) and each perturbs its details and colours with its own seed, so hard negatives exist.
Everything is a pure function of (seed, LandmarkSpec).
"""

from __future__ import annotations

import numpy as np

from amldist.synth import facades
from amldist.synth.params import (
    LANDSCAPE_PROB,
    STYLE_WEIGHTS,
    STYLES,
    Landmark,
    LandmarkSpec,
    Surroundings,
    hsv,
)

# Separate random streams, so that adding draws to one never shifts another.
FAMILY_STREAM, LANDMARK_STREAM = 11, 12


def make_landmark(seed: int, spec: LandmarkSpec) -> Landmark:
    """The landmark of `spec`: its family prototype, perturbed by its own seed."""
    family_rng = np.random.default_rng([seed, FAMILY_STREAM, spec.family_id])
    own_rng = np.random.default_rng([seed, LANDMARK_STREAM, spec.landmark_id])
    if family_rng.random() < LANDSCAPE_PROB.get(spec.pool, 0.0):
        return Landmark(spec, "landscape", None, make_surroundings(own_rng, has_building=False))
    style = STYLES[int(family_rng.choice(len(STYLES), p=_normalised(STYLE_WEIGHTS[spec.pool])))]
    prototype = facades.prototype(style, family_rng)
    surroundings = make_surroundings(own_rng, has_building=True)
    # The building stands a little in front of the horizon line.
    facade = facades.perturb(prototype, own_rng, ground=surroundings.horizon + own_rng.uniform(0.01, 0.04))
    return Landmark(spec, style, facade, surroundings)


def _normalised(weights: tuple[float, ...]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def make_surroundings(rng: np.random.Generator, has_building: bool) -> Surroundings:
    horizon = rng.uniform(0.55, 0.62)
    weather = rng.choice(["clear", "hazy", "overcast", "evening"], p=[0.45, 0.25, 0.2, 0.1])
    sky_top, sky_bottom = {
        "clear": (hsv(rng.uniform(0.56, 0.62), rng.uniform(0.5, 0.75), rng.uniform(0.6, 0.85)),
                  hsv(rng.uniform(0.55, 0.6), rng.uniform(0.15, 0.35), rng.uniform(0.85, 0.98))),
        "hazy": (hsv(rng.uniform(0.55, 0.62), rng.uniform(0.2, 0.4), rng.uniform(0.75, 0.9)),
                 hsv(rng.uniform(0.1, 0.6), rng.uniform(0.05, 0.15), rng.uniform(0.88, 0.98))),
        "overcast": (hsv(0.6, rng.uniform(0.02, 0.1), rng.uniform(0.55, 0.75)),
                     hsv(0.6, rng.uniform(0.02, 0.08), rng.uniform(0.75, 0.9))),
        "evening": (hsv(rng.uniform(0.6, 0.7), rng.uniform(0.4, 0.6), rng.uniform(0.35, 0.55)),
                    hsv(rng.uniform(0.03, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.8, 0.95))),
    }[str(weather)]
    clouds = tuple((rng.uniform(0.15, 0.85), rng.uniform(0.06, horizon * 0.6), rng.uniform(0.04, 0.12),
                    rng.uniform(0.015, 0.04)) for _ in range(int(rng.integers(0, 6))))
    hills = tuple(rng.uniform(0.0, 0.08, size=int(rng.integers(4, 9)))) if rng.random() < 0.6 else ()
    hill_color = hsv(rng.uniform(0.2, 0.45), rng.uniform(0.15, 0.45), rng.uniform(0.35, 0.65))
    pattern = str(rng.choice(["paving", "grass", "plaza"]))
    ground = {"paving": hsv(rng.uniform(0.05, 0.12), rng.uniform(0.05, 0.25), rng.uniform(0.45, 0.7)),
              "grass": hsv(rng.uniform(0.2, 0.33), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.6)),
              "plaza": hsv(rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.15), rng.uniform(0.55, 0.8))}[pattern]
    return Surroundings(horizon, sky_top, sky_bottom, clouds, hills, hill_color, ground, pattern,
                        _neighbours(rng, horizon, has_building), _trees(rng, has_building))


def _neighbours(rng: np.random.Generator, horizon: float, has_building: bool):
    """Plain houses left and right of the landmark (none in the middle of the scene).

    The scene's left and right edges stay free: far views extend the scene by repeating its edge.
    """
    houses = []
    for side in (0, 1):
        x = rng.uniform(0.02, 0.05) if side == 0 else rng.uniform(0.78, 0.86)
        end = rng.uniform(0.14, 0.22) if side == 0 else rng.uniform(0.95, 0.98)
        while x < end and has_building:
            width = rng.uniform(0.04, 0.09)
            color = hsv(rng.uniform(0.0, 0.15), rng.uniform(0.05, 0.45), rng.uniform(0.45, 0.9))
            houses.append((x, min(x + width, end), horizon - rng.uniform(0.06, 0.16), color))
            x += width
    return tuple(houses)


def _trees(rng: np.random.Generator, has_building: bool):
    trees = []
    for _ in range(int(rng.integers(0, 5) if has_building else rng.integers(3, 9))):
        x = (rng.choice([rng.uniform(0.1, 0.22), rng.uniform(0.78, 0.9)]) if has_building
             else rng.uniform(0.1, 0.9))
        color = hsv(rng.uniform(0.22, 0.38), rng.uniform(0.35, 0.7), rng.uniform(0.25, 0.5))
        trees.append((float(x), rng.uniform(0.03, 0.06), color))
    return tuple(trees)
