"""Facade styles: a prototype per family, perturbed per landmark into look-alikes.

A prototype is a plain dict of structure and palette in units relative to the body, so that a
member can widen the body or raise a tower without the parts falling apart. `perturb` changes
colours a little and details (window counts, roof shapes, arches, rose window) now and then:
members of a family share a silhouette but are different buildings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from amldist.synth.params import Dome, Facade, Tower, hsv, jitter

TOWER_ROOFS = ("spire", "pyramid", "dome", "crenel", "flat")
TEXTURES = ("brick", "stone", "stripes", "plain", "glass")


def prototype(style: str, rng: np.random.Generator) -> dict[str, Any]:
    proto = {"gothic": _gothic, "classical": _classical, "castle": _castle,
             "modern": _modern, "townhall": _townhall}[style](rng)
    proto.setdefault("texture_scale", rng.uniform(0.7, 1.4))
    proto.setdefault("trim", jitter(proto["wall"], rng, 0.15))
    return proto


def _tower(rel_x, width, above, roof, roof_height, windows, clock=False) -> dict[str, Any]:
    return {"rel_x": rel_x, "width": width, "above": above, "roof": roof, "roof_height": roof_height,
            "windows": windows, "clock": clock}


def _gothic(rng: np.random.Generator) -> dict[str, Any]:
    roof = str(rng.choice(["spire", "pyramid", "crenel"], p=[0.6, 0.25, 0.15]))
    width, above, spire = rng.uniform(0.05, 0.08), rng.uniform(0.08, 0.18), rng.uniform(0.06, 0.14)
    layout = rng.choice(["twin", "single_side", "central"], p=[0.5, 0.25, 0.25])
    xs = {"twin": (-0.5, 0.5), "single_side": (float(rng.choice([-0.5, 0.5])),),
          "central": (0.0,)}[str(layout)]
    return {"width": rng.uniform(0.26, 0.38), "height": rng.uniform(0.16, 0.24),
            "wall": hsv(rng.uniform(0.07, 0.13), rng.uniform(0.1, 0.35), rng.uniform(0.55, 0.85)),
            "texture": str(rng.choice(["stone", "brick"], p=[0.7, 0.3])), "roof": "gable",
            "roof_color": hsv(rng.uniform(0.55, 0.65), rng.uniform(0.05, 0.25), rng.uniform(0.2, 0.4)),
            "roof_height": rng.uniform(0.03, 0.07), "window_rows": int(rng.integers(1, 4)),
            "window_cols": int(rng.integers(3, 7)), "window_shape": "arch",
            "window_color": hsv(rng.uniform(0.55, 0.7), rng.uniform(0.2, 0.5), rng.uniform(0.15, 0.35)),
            "arches": int(rng.integers(1, 4)), "columns": 0, "bands": int(rng.integers(0, 2)),
            "rose": bool(rng.random() < 0.6), "rose_varies": True, "dome": None,
            "towers": [_tower(x, width, above, roof, spire, int(rng.integers(2, 5))) for x in xs]}


def _classical(rng: np.random.Generator) -> dict[str, Any]:
    dome = None
    if rng.random() < 0.6:
        color = [hsv(0.45, 0.35, 0.55), hsv(0.6, 0.15, 0.5), hsv(0.13, 0.6, 0.8)][int(rng.integers(0, 3))]
        dome = {"rel_width": rng.uniform(0.3, 0.5), "height": rng.uniform(0.07, 0.12),
                "drum": rng.uniform(0.03, 0.06), "color": jitter(color, rng, 0.05),
                "lantern": bool(rng.random() < 0.7)}
    towers = []
    if rng.random() < 0.3:
        towers = [_tower(x, 0.05, rng.uniform(0.04, 0.08), "dome", 0.04, 1) for x in (-0.5, 0.5)]
    return {"width": rng.uniform(0.32, 0.46), "height": rng.uniform(0.13, 0.2),
            "wall": hsv(rng.uniform(0.08, 0.13), rng.uniform(0.05, 0.25), rng.uniform(0.75, 0.95)),
            "texture": str(rng.choice(["plain", "stone"])), "roof": str(rng.choice(["gable", "flat"])),
            "roof_color": hsv(rng.uniform(0.08, 0.12), rng.uniform(0.05, 0.2), rng.uniform(0.7, 0.9)),
            "roof_height": rng.uniform(0.03, 0.06), "window_rows": int(rng.integers(2, 4)),
            "window_cols": int(rng.integers(4, 9)), "window_shape": "rect",
            "window_color": hsv(rng.uniform(0.55, 0.65), rng.uniform(0.1, 0.3), rng.uniform(0.2, 0.4)),
            "arches": int(rng.integers(0, 4)), "columns": int(rng.integers(4, 9)),
            "bands": int(rng.integers(1, 3)), "rose": False, "dome": dome, "towers": towers}


def _castle(rng: np.random.Generator) -> dict[str, Any]:
    count = int(rng.integers(2, 5))
    xs = np.linspace(-0.5, 0.5, count)
    roof = str(rng.choice(["crenel", "pyramid"], p=[0.6, 0.4]))
    width, above = rng.uniform(0.05, 0.08), rng.uniform(0.04, 0.1)
    return {"width": rng.uniform(0.3, 0.42), "height": rng.uniform(0.12, 0.2),
            "wall": hsv(rng.uniform(0.05, 0.1), rng.uniform(0.2, 0.45), rng.uniform(0.4, 0.7)),
            "texture": str(rng.choice(["stone", "brick"])), "roof": "crenel",
            "roof_color": hsv(0.6, 0.2, 0.3), "roof_height": rng.uniform(0.015, 0.03),
            "window_rows": int(rng.integers(1, 3)), "window_cols": int(rng.integers(2, 5)),
            "window_shape": "rect", "window_color": hsv(0.6, 0.2, rng.uniform(0.1, 0.25)),
            "arches": 1, "columns": 0, "bands": 0, "rose": False, "dome": None,
            "towers": [_tower(float(x) + rng.uniform(-0.05, 0.05) * (0 < i < count - 1),
                              width * rng.uniform(0.9, 1.2), above * rng.uniform(0.8, 1.3), roof,
                              rng.uniform(0.03, 0.08) if roof == "pyramid" else 0.02, 2)
                       for i, x in enumerate(xs)]}


def _modern(rng: np.random.Generator) -> dict[str, Any]:
    towers = []
    if rng.random() < 0.5:
        towers = [_tower(float(rng.uniform(-0.4, 0.4)), rng.uniform(0.06, 0.1), rng.uniform(0.08, 0.16),
                         "flat", 0.0, int(rng.integers(4, 9)))]
    return {"width": rng.uniform(0.2, 0.4), "height": rng.uniform(0.2, 0.34),
            "wall": hsv(rng.uniform(0.5, 0.62), rng.uniform(0.05, 0.4), rng.uniform(0.4, 0.8)),
            "texture": str(rng.choice(["glass", "plain"], p=[0.6, 0.4])), "roof": "flat",
            "roof_color": hsv(0.6, 0.05, rng.uniform(0.3, 0.6)), "roof_height": 0.01,
            "window_rows": int(rng.integers(6, 13)), "window_cols": int(rng.integers(5, 12)),
            "window_shape": "rect",
            "window_color": hsv(rng.uniform(0.5, 0.62), rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.6)),
            "arches": 0, "columns": 0, "bands": int(rng.integers(0, 4)), "rose": False, "dome": None,
            "towers": towers}


def _townhall(rng: np.random.Generator) -> dict[str, Any]:
    wall = (hsv(rng.uniform(0.01, 0.05), rng.uniform(0.4, 0.65), rng.uniform(0.45, 0.7)) if rng.random() < 0.6
            else hsv(rng.uniform(0.09, 0.13), rng.uniform(0.2, 0.4), rng.uniform(0.65, 0.85)))
    roof = str(rng.choice(["pyramid", "spire", "dome"]))
    return {"width": rng.uniform(0.32, 0.44), "height": rng.uniform(0.14, 0.2), "wall": wall,
            "texture": str(rng.choice(["brick", "stripes", "plain"])), "roof": "mansard",
            "roof_color": hsv(rng.uniform(0.55, 0.62), rng.uniform(0.1, 0.3), rng.uniform(0.25, 0.45)),
            "roof_height": rng.uniform(0.03, 0.06), "window_rows": int(rng.integers(2, 5)),
            "window_cols": int(rng.integers(5, 10)), "window_shape": str(rng.choice(["rect", "arch"])),
            "window_color": hsv(rng.uniform(0.55, 0.65), rng.uniform(0.1, 0.3), rng.uniform(0.15, 0.35)),
            "arches": int(rng.integers(2, 6)), "columns": 0, "bands": int(rng.integers(1, 3)), "rose": False,
            "dome": None, "towers": [_tower(0.0, rng.uniform(0.06, 0.09), rng.uniform(0.12, 0.22), roof,
                                            rng.uniform(0.04, 0.1), int(rng.integers(2, 4)), clock=True)]}


def perturb(proto: dict[str, Any], rng: np.random.Generator, ground: float) -> Facade:
    """One family member: the prototype with jittered colours, sizes and some changed details."""
    p = dict(proto)
    width, height = p["width"] * rng.uniform(0.9, 1.1), p["height"] * rng.uniform(0.9, 1.1)
    for key in ("window_rows", "window_cols", "arches", "bands"):
        if rng.random() < 0.4:
            p[key] = max(0 if key in ("arches", "bands") else 1, p[key] + int(rng.choice([-1, 1])))
    if p["columns"] and rng.random() < 0.4:
        p["columns"] = max(2, p["columns"] + int(rng.choice([-2, 2])))
    if p.get("rose_varies") and rng.random() < 0.3:
        p["rose"] = not p["rose"]
    if rng.random() < 0.25:
        p["texture"] = str(rng.choice(TEXTURES))
    roof_swap = rng.random() < 0.25
    new_roof = str(rng.choice(TOWER_ROOFS[:4]))
    vertical = _vertical_scale(p, height, ground)
    top = ground - height * vertical
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    towers = tuple(_member_tower(t, rng, cx, top, width, vertical, new_roof if roof_swap else None)
                   for t in p["towers"])
    dome = None
    if p["dome"] is not None:
        d = p["dome"]
        color = jitter(d["color"], rng, 0.06) if rng.random() < 0.7 else jitter(p["roof_color"], rng, 0.1)
        dome = Dome(cx, d["rel_width"] * width, d["height"] * vertical * rng.uniform(0.9, 1.1),
                    d["drum"] * vertical, color, d["lantern"])
    return Facade(cx - width / 2, top, cx + width / 2, ground, jitter(p["wall"], rng, 0.05),
                  jitter(p["trim"], rng, 0.05), p["texture"], p["texture_scale"], p["roof"],
                  jitter(p["roof_color"], rng, 0.05), p["roof_height"] * vertical, p["window_rows"],
                  p["window_cols"], p["window_shape"], jitter(p["window_color"], rng, 0.04), p["arches"],
                  p["columns"], p["bands"], p["rose"], towers, dome)


def _vertical_scale(p: dict[str, Any], height: float, ground: float) -> float:
    """Shrink vertical sizes so the tallest part stays below the top of the scene."""
    extra = max([t["above"] + t["roof_height"] for t in p["towers"]] + [p["roof_height"]])
    if p["dome"] is not None:
        extra = max(extra, p["dome"]["height"] + p["dome"]["drum"] + 0.02)
    return min(1.0, (ground - 0.06) / (height + extra * 1.15))


def _member_tower(t: dict[str, Any], rng: np.random.Generator, body_cx: float, body_top: float,
                  body_width: float, vertical: float, new_roof: str | None) -> Tower:
    # Positions are relative to the body, so towers at its edges stay at its edges.
    cx = body_cx + t["rel_x"] * body_width
    roof = new_roof if new_roof is not None and t["roof"] != "flat" else t["roof"]
    roof_height = t["roof_height"] if t["roof_height"] > 0 else (0.0 if roof == "flat" else 0.05)
    return Tower(cx, t["width"] * rng.uniform(0.92, 1.08),
                 body_top - t["above"] * vertical * rng.uniform(0.85, 1.15), roof,
                 roof_height * vertical * rng.uniform(0.85, 1.15), t["windows"], t["clock"])
