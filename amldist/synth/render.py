"""Render a landmark's whole scene (the "world" every view is photographed from) with PIL and numpy.

The canvas is twice the preset's image size across (4:3), so ordinary views sample it at about
one canvas pixel per image pixel and close-ups keep some detail.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from amldist.synth import textures
from amldist.synth.drawing import SafeDraw, shade
from amldist.synth.facade_draw import draw_facade
from amldist.synth.params import SCENE_HEIGHT, Landmark, Surroundings

RENDER_STREAM = 13
CANVAS_PER_IMAGE = 2.0  # canvas width / image max side


def canvas_size(image_max_side: int) -> tuple[int, int]:
    width = round(CANVAS_PER_IMAGE * image_max_side)
    return width, round(width * SCENE_HEIGHT)


def render_scene(seed: int, landmark: Landmark, image_max_side: int) -> Image.Image:
    """The landmark's scene as an RGB image of canvas_size(image_max_side)."""
    rng = np.random.default_rng([seed, RENDER_STREAM, landmark.spec.landmark_id])
    width, height = canvas_size(image_max_side)
    s = landmark.surroundings
    horizon = round(s.horizon * width)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:horizon] = textures.sky(horizon, width, s.sky_top, s.sky_bottom)
    pixels[horizon:] = textures.ground(s.ground_pattern, height - horizon, width, s.ground, rng)
    image = Image.fromarray(pixels)
    _clouds(image, s, width, rng)
    draw = SafeDraw(image)
    _hills(draw, s, width)
    _neighbours(image, s, width, rng)
    _trees(draw, s, width, rng)
    if landmark.facade is not None:
        draw_facade(image, landmark.facade, width, rng)
    return image


def _clouds(image: Image.Image, s: Surroundings, scale: int, rng: np.random.Generator) -> None:
    if not s.clouds:
        return
    bottom = int(s.horizon * scale)
    # Clouds are soft: drawn and blurred at a quarter of the resolution, then enlarged.
    small = 0.25
    mask = Image.new("L", (max(1, round(scale * small)), max(1, round(bottom * small))), 0)
    draw = SafeDraw(mask)
    for x, y, rx, ry in s.clouds:
        for _ in range(5):  # a cloud is a few overlapping puffs
            px, py = (x + rng.uniform(-rx, rx) * 0.6) * scale, (y + rng.uniform(-ry, ry) * 0.5) * scale
            prx, pry = rx * scale * rng.uniform(0.35, 0.7), ry * scale * rng.uniform(0.6, 1.2)
            draw.ellipse([v * small for v in (px - prx, py - pry, px + prx, py + pry)],
                         fill=int(rng.uniform(150, 230)))
    mask = mask.filter(ImageFilter.GaussianBlur(radius=max(0.5, scale * 0.006 * small)))
    mask = mask.resize((scale, bottom), Image.BILINEAR)
    white = Image.new("RGB", mask.size, (246, 246, 248))
    region = image.crop((0, 0, scale, bottom))
    image.paste(Image.composite(white, region, mask), (0, 0))


def _hills(draw: ImageDraw.ImageDraw, s: Surroundings, scale: int) -> None:
    if not s.hills:
        return
    horizon = s.horizon * scale
    points = [(0.0, horizon)]
    count = len(s.hills)
    for i in range(65):
        x = i / 64
        pos = x * (count - 1)
        left = min(int(pos), count - 2)
        t = (1 - math.cos((pos - left) * math.pi)) / 2  # cosine interpolation: rounded hill tops
        h = s.hills[left] * (1 - t) + s.hills[left + 1] * t
        points.append((x * scale, horizon - h * scale))
    points.append((scale, horizon))
    draw.polygon(points, fill=s.hill_color)


def _neighbours(image: Image.Image, s: Surroundings, scale: int, rng: np.random.Generator) -> None:
    draw = SafeDraw(image)
    base = round((s.horizon + 0.015) * scale)
    for x0, x1, top, color in s.neighbours:
        box = [round(x0 * scale), round(top * scale), round(x1 * scale), base]
        draw.rectangle(box, fill=color)
        roof = shade(color, 0.55)
        draw.polygon([(box[0] - 2, box[1]), (box[2] + 2, box[1]),
                      ((box[0] + box[2]) / 2, box[1] - (box[2] - box[0]) * 0.25)],
                     fill=roof)
        cols, rows = int(rng.integers(2, 4)), int(rng.integers(2, 5))
        cell_w, cell_h = (box[2] - box[0]) / cols, (box[3] - box[1]) / (rows + 0.5)
        for r in range(rows):
            for c in range(cols):
                wx, wy = box[0] + (c + 0.3) * cell_w, box[1] + (r + 0.3) * cell_h
                draw.rectangle([wx, wy, wx + cell_w * 0.4, wy + cell_h * 0.45], fill=shade(color, 0.35))


def _trees(draw: ImageDraw.ImageDraw, s: Surroundings, scale: int, rng: np.random.Generator) -> None:
    base = (s.horizon + 0.02) * scale
    for x, radius, color in s.trees:
        cx, r = x * scale, radius * scale
        draw.rectangle([cx - r * 0.1, base - r * 1.2, cx + r * 0.1, base], fill=(80, 60, 40))
        for _ in range(6):
            px, py = cx + rng.uniform(-0.6, 0.6) * r, base - r * 1.5 + rng.uniform(-0.6, 0.5) * r
            pr = r * rng.uniform(0.45, 0.7)
            draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=shade(color, rng.uniform(0.8, 1.2)))
