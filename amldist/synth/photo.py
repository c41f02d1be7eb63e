"""What happens between the viewpoint and the JPEG: foreground occluders, lighting, blur, noise.

Occluders (trees, people, cars, lamp posts, buses) are drawn in image space in front of the
scene. Their amount depends on the view's kind: a few small ones for easy views and queries,
some that cover part of the landmark for hard views, one that hides most of it for the
"occluded" junk mode. Lighting (brightness, contrast, gamma, colour cast, dusk/night), defocus
blur, sensor noise, vignetting and JPEG quality are stronger for hard views.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageFilter

from amldist.synth import camera
from amldist.synth.camera import View
from amldist.synth.drawing import SafeDraw, shade
from amldist.synth.params import hsv

OCCLUDER_STREAM, LOOK_STREAM = 31, 32


@dataclass(frozen=True)
class Look:
    gains: tuple[float, float, float]  # colour cast, per channel
    brightness: float
    contrast: float
    gamma: float
    blur: float  # Gaussian radius as a share of the image's longest side
    noise: float  # standard deviation, in 0..255 units
    vignette: float
    quality: int  # JPEG quality


def sample_look(rng: np.random.Generator, kind: str) -> Look:
    strong = kind in ("hard", "junk")
    cast = 0.15 if strong else 0.06
    gains = tuple(float(g) for g in rng.uniform(1 - cast, 1 + cast, size=3))
    brightness = rng.uniform(0.55, 1.35) if strong else rng.uniform(0.85, 1.15)
    if strong and rng.random() < 0.25:  # dusk or night: darker, warm or blue
        night = rng.random() < 0.4
        gains = (0.75, 0.85, 1.15) if night else (1.15, 0.92, 0.72)
        brightness *= 0.65 if night else 0.85
    return Look(gains, brightness,
                rng.uniform(0.6, 1.35) if strong else rng.uniform(0.85, 1.15),
                rng.uniform(0.65, 1.6) if strong else rng.uniform(0.85, 1.2),
                rng.uniform(0.0, 0.004) if strong else rng.uniform(0.0, 0.0015),
                rng.uniform(2.0, 12.0) if strong else rng.uniform(0.0, 4.0),
                rng.uniform(0.0, 0.25), int(rng.integers(60, 91) if strong else rng.integers(80, 96)))


def apply_look(image: Image.Image, look: Look, rng: np.random.Generator) -> Image.Image:
    radius = look.blur * max(image.size)
    if radius > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    image = image.point(_tone_table(look))
    w, h = image.size
    # Vignetting: a radial falloff, computed coarse and resized (it is smooth anyway).
    yy, xx = np.ogrid[-1:1:33j, -1:1:33j]
    falloff = np.clip(1.0 - look.vignette * (xx**2 + yy**2) / 2, 0, 1) * 255  # (33, 33)
    mask = Image.fromarray(falloff.astype(np.uint8)).resize((w, h), Image.BILINEAR)
    image = ImageChops.multiply(image, Image.merge("RGB", (mask, mask, mask)))
    # Sensor noise, mostly luminance: one draw per pixel shared by the three channels.
    noise = rng.standard_normal((h, w), dtype=np.float32) * look.noise  # (H, W)
    pixels = np.asarray(image, dtype=np.int16) + np.rint(noise).astype(np.int16)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _tone_table(look: Look) -> list[int]:
    """Colour cast, brightness, contrast and gamma as one 3 x 256 lookup table (PIL's point)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    table = []
    for gain in look.gains:
        x = np.clip((v * gain * look.brightness - 0.5) * look.contrast + 0.5, 0.0, 1.0) ** look.gamma
        table += np.rint(x * 255).astype(int).tolist()
    return table


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def draw_occluders(image: Image.Image, view: View, bbx: tuple[float, ...], rng: np.random.Generator) -> None:
    """Foreground objects; `bbx` is the landmark's box in the image (x1, y1, x2, y2)."""
    draw = SafeDraw(image)
    w, h = image.size
    if view.mode == "occluded":  # junk: one big object hides most of the landmark
        _big_occluder(draw, bbx, h, rng)
    count = {"query": (0, 2), "easy": (0, 3), "hard": (1, 5), "junk": (0, 4)}[view.kind]
    for _ in range(int(rng.integers(*count))):
        over_landmark = view.kind == "hard" and rng.random() < 0.6
        x = rng.uniform(bbx[0], bbx[2]) if over_landmark else rng.uniform(0, w)
        size = h * (rng.uniform(0.25, 0.6) if over_landmark else rng.uniform(0.08, 0.3))
        kind = str(rng.choice(["tree", "person", "car", "lamp"], p=[0.3, 0.35, 0.2, 0.15]))
        {"tree": _tree, "person": _person, "car": _car, "lamp": _lamp}[kind](
            draw, x, h * rng.uniform(0.92, 1.05), size, rng)


def _big_occluder(draw, bbx, image_height, rng) -> None:
    x0, y0, x1, y1 = bbx
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if rng.random() < 0.5:  # a tree right in front: a mass of leaves over the landmark
        color = hsv(rng.uniform(0.22, 0.35), rng.uniform(0.4, 0.7), rng.uniform(0.2, 0.4))
        draw.rectangle([cx - rx * 0.1, cy, cx + rx * 0.1, image_height], fill=(60, 45, 30))
        for _ in range(40):
            px, py = cx + rng.uniform(-1.0, 1.0) * rx, cy + rng.uniform(-1.0, 1.0) * ry
            r = max(rx, ry) * rng.uniform(0.3, 0.55)
            draw.ellipse((px - r, py - r, px + r, py + r), fill=shade(color, rng.uniform(0.75, 1.25)))
    else:  # a bus or a hoarding: a large box with a row of windows, on wheels
        color = hsv(rng.uniform(0, 1), rng.uniform(0.25, 0.6), rng.uniform(0.4, 0.8))
        box = [x0 - rx * rng.uniform(0.1, 0.3), y0 + ry * rng.uniform(0.0, 0.2),
               x1 + rx * rng.uniform(0.1, 0.3), image_height - ry * 0.12]
        draw.rectangle(box, fill=color)
        draw.rectangle([box[0], box[3] - ry * 0.25, box[2], box[3] - ry * 0.18], fill=shade(color, 0.6))
        count = int(rng.integers(3, 7))
        for k in range(count):
            wx = box[0] + (k + 0.15) * (box[2] - box[0]) / count
            draw.rectangle([wx, box[1] + ry * 0.15, wx + 0.7 * (box[2] - box[0]) / count, box[1] + ry * 0.6],
                           fill=shade(color, 0.3))
        for wx in (box[0] + (box[2] - box[0]) * 0.18, box[2] - (box[2] - box[0]) * 0.18):
            r = ry * 0.14
            draw.ellipse((wx - r, box[3] - r, wx + r, box[3] + r), fill=(25, 25, 25))


def _tree(draw, x, ground, size, rng) -> None:
    color = hsv(rng.uniform(0.2, 0.38), rng.uniform(0.35, 0.75), rng.uniform(0.18, 0.45))
    draw.rectangle([x - size * 0.04, ground - size * 0.5, x + size * 0.04, ground], fill=(70, 52, 35))
    for _ in range(8):
        px, py = x + rng.uniform(-0.3, 0.3) * size, ground - size * rng.uniform(0.55, 0.9)
        r = size * rng.uniform(0.15, 0.28)
        draw.ellipse((px - r, py - r, px + r, py + r), fill=shade(color, rng.uniform(0.75, 1.25)))


def _person(draw, x, ground, size, rng) -> None:
    clothes = hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
    skin = hsv(rng.uniform(0.04, 0.1), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.9))
    head = size * 0.075
    draw.rectangle([x - size * 0.1, ground - size * 0.45, x - size * 0.02, ground], fill=shade(clothes, 0.5))
    draw.rectangle([x + size * 0.02, ground - size * 0.45, x + size * 0.1, ground], fill=shade(clothes, 0.5))
    draw.rounded_rectangle([x - size * 0.14, ground - size * 0.85, x + size * 0.14, ground - size * 0.42],
                           radius=size * 0.05, fill=clothes)
    draw.ellipse((x - head, ground - size * 0.85 - 2 * head, x + head, ground - size * 0.85), fill=skin)


def _car(draw, x, ground, size, rng) -> None:
    color = hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.8), rng.uniform(0.2, 0.95))
    length, height = size * 1.6, size * 0.45
    draw.polygon([(x - length * 0.3, ground - height * 0.6), (x - length * 0.18, ground - height),
                  (x + length * 0.2, ground - height), (x + length * 0.32, ground - height * 0.6)],
                 fill=shade(color, 0.8))
    draw.rounded_rectangle([x - length / 2, ground - height * 0.62, x + length / 2, ground - height * 0.15],
                           radius=height * 0.12, fill=color)
    for wx in (x - length * 0.3, x + length * 0.3):
        r = height * 0.18
        draw.ellipse((wx - r, ground - height * 0.15 - r, wx + r, ground - height * 0.15 + r),
                     fill=(25, 25, 25))


def _lamp(draw, x, ground, size, rng) -> None:
    pole = max(1.0, size * 0.02)
    top = ground - size * 1.4
    draw.rectangle([x - pole, top, x + pole, ground], fill=(40, 40, 45))
    draw.ellipse((x - size * 0.08, top - size * 0.1, x + size * 0.08, top + size * 0.04),
                 fill=(230, 220, 170))


def photograph(seed: int, scene: Image.Image, view: View, box: tuple[float, float, float, float],
               landmark_id: int, view_id: int) -> bytes:
    """The JPEG bytes of one view of a rendered scene whose landmark box is `box` (scene units)."""
    image = camera.warp(scene, view)
    bbx, _ = camera.box_in_image(view, box)
    draw_occluders(image, view, bbx, camera.view_rng(seed, OCCLUDER_STREAM, landmark_id, view_id))
    look_rng = camera.view_rng(seed, LOOK_STREAM, landmark_id, view_id)
    look = sample_look(look_rng, view.kind)
    return encode_jpeg(apply_look(image, look, look_rng), look.quality)
