"""Draw a Facade (body, roof, windows, arches, columns, rose window, towers, dome) onto a canvas."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from amldist.synth import textures
from amldist.synth.drawing import SafeDraw, shade
from amldist.synth.params import Facade, Tower


def draw_facade(image: Image.Image, f: Facade, scale: float, rng: np.random.Generator) -> None:
    """`scale` converts normalised scene units to pixels (the canvas width)."""
    draw = SafeDraw(image)
    unit = 0.0045 * scale * f.texture_scale  # height of one brick course, pixels
    box = [round(v * scale) for v in (f.x0, f.y0, f.x1, f.y1)]
    _paste_wall(image, box, f.texture, f.wall, f.trim, unit, rng)
    _roof(draw, f, box, scale)
    _bands(draw, f, box)
    _windows(draw, f, box)
    _arches(draw, f, box)
    _columns(draw, f, box)
    if f.rose:
        _rose(draw, f, box)
    for tower in f.towers:
        _tower(image, draw, tower, f, box, scale, unit, rng)
    if f.dome is not None:
        _dome(draw, f, box, scale)


def _paste_wall(image, box, kind, color, trim, unit, rng) -> None:
    x0, y0, x1, y1 = box
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    patch = textures.wall(kind, y1 - y0, x1 - x0, color, trim, unit, rng)
    # Light from one side: a gentle horizontal ramp makes the wall read as a lit surface.
    ramp = np.linspace(1.06, 0.9, x1 - x0, dtype=np.float32)[None, :, None]
    image.paste(Image.fromarray(np.clip(patch * ramp, 0, 255).astype(np.uint8)), (x0, y0))


def _roof(draw, f: Facade, box, scale) -> None:
    x0, y0, x1, _ = box
    rh = f.roof_height * scale
    cx = (x0 + x1) / 2
    if f.roof == "gable":
        draw.polygon([(x0, y0), (x1, y0), (cx, y0 - rh)], fill=f.roof_color, outline=f.trim)
        draw.line([(x0, y0), (x1, y0)], fill=f.trim, width=max(1, round(rh * 0.12)))
    elif f.roof == "mansard":
        inset = (x1 - x0) * 0.05
        draw.polygon([(x0, y0), (x1, y0), (x1 - inset, y0 - rh), (x0 + inset, y0 - rh)], fill=f.roof_color)
        for i in range(max(2, f.window_cols - 1)):
            dx = x0 + inset + (i + 0.5) * (x1 - x0 - 2 * inset) / max(2, f.window_cols - 1)
            draw.rectangle([dx - rh * 0.18, y0 - rh * 0.7, dx + rh * 0.18, y0 - rh * 0.15],
                           fill=f.window_color, outline=f.trim)
    elif f.roof == "crenel":
        _merlons(draw, x0, x1, y0, rh, shade(f.wall, 0.9))
    else:  # flat: a cornice
        draw.rectangle([x0 - rh * 0.3, y0 - rh, x1 + rh * 0.3, y0], fill=f.trim)


def _merlons(draw, x0, x1, y0, height, color) -> None:
    count = max(3, int((x1 - x0) / max(height * 1.2, 1)) | 1)
    width = (x1 - x0) / count
    for i in range(0, count, 2):
        draw.rectangle([x0 + i * width, y0 - height, x0 + (i + 1) * width, y0], fill=color)


def _window_zone(f: Facade, box) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    h = y1 - y0
    bottom = y1 - (0.34 * h if (f.arches or f.columns) else 0.12 * h)
    return x0 + 0.06 * (x1 - x0), y0 + 0.1 * h, x1 - 0.06 * (x1 - x0), bottom


def _bands(draw, f: Facade, box) -> None:
    _, zy0, _, zy1 = _window_zone(f, box)
    step = (zy1 - zy0) / max(1, f.window_rows)
    thick = max(1, round(step * 0.06))
    for i in range(1, min(f.bands, f.window_rows) + 1):
        y = zy0 + i * step - step * 0.05
        draw.rectangle([box[0], y, box[2], y + thick], fill=f.trim)


def _windows(draw, f: Facade, box) -> None:
    zx0, zy0, zx1, zy1 = _window_zone(f, box)
    cell_w, cell_h = (zx1 - zx0) / f.window_cols, (zy1 - zy0) / f.window_rows
    dense = f.window_rows * f.window_cols > 40  # office grids: wider panes, thin frames
    w, h = cell_w * (0.72 if dense else 0.5), cell_h * (0.72 if dense else 0.62)
    frame = max(1.0, min(w, h) * 0.12)
    for r in range(f.window_rows):
        for c in range(f.window_cols):
            cx, cy = zx0 + (c + 0.5) * cell_w, zy0 + (r + 0.5) * cell_h
            _window(draw, f.window_shape, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
                    f.window_color, f.trim, frame)


def _window(draw, shape, rect, color, trim, frame) -> None:
    x0, y0, x1, y1 = rect
    outer = (x0 - frame, y0 - frame, x1 + frame, y1 + frame)
    if shape == "round":
        draw.ellipse(outer, fill=trim)
        draw.ellipse(rect, fill=color)
        return
    if shape == "arch":
        radius = min((x1 - x0) / 2, (y1 - y0) / 2)  # squat openings get an elliptic top
        draw.pieslice((outer[0], outer[1], outer[2], outer[1] + 2 * (radius + frame)), 180, 360, fill=trim)
        draw.rectangle((outer[0], outer[1] + radius + frame, outer[2], outer[3]), fill=trim)
        draw.pieslice((x0, y0, x1, y0 + 2 * radius), 180, 360, fill=color)
        draw.rectangle((x0, y0 + radius, x1, y1), fill=color)
    else:
        draw.rectangle(outer, fill=trim)
        draw.rectangle(rect, fill=color)
    # Mullions: a cross of the frame colour, and a pale reflection in the upper-left pane.
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    thin = max(1, round(frame * 0.5))
    draw.line([(mx, y0), (mx, y1)], fill=trim, width=thin)
    draw.line([(x0, my), (x1, my)], fill=trim, width=thin)
    draw.rectangle((x0 + thin, my - (my - y0) * 0.45, mx - thin, my - thin), fill=shade(color, 1.35))


def _arches(draw, f: Facade, box) -> None:
    if not f.arches:
        return
    x0, y0, x1, y1 = box
    span = (x1 - x0) * 0.7
    width = span / f.arches * 0.62
    height = (y1 - y0) * 0.28
    for i in range(f.arches):
        cx = (x0 + x1) / 2 - span / 2 + (i + 0.5) * span / f.arches
        rect = (cx - width / 2, y1 - height, cx + width / 2, y1)
        _window(draw, "arch", rect, shade(f.wall, 0.25), shade(f.trim, 0.85), max(1.0, width * 0.08))


def _columns(draw, f: Facade, box) -> None:
    if not f.columns:
        return
    x0, y0, x1, y1 = box
    span, top = (x1 - x0) * 0.8, y1 - (y1 - y0) * 0.55
    step = span / f.columns
    width = step * 0.34
    light, dark = shade(f.trim, 1.12), shade(f.trim, 0.8)
    draw.rectangle([x0 + (x1 - x0) * 0.08, top - step * 0.35, x1 - (x1 - x0) * 0.08, top], fill=f.trim)
    for i in range(f.columns):
        cx = (x0 + x1) / 2 - span / 2 + (i + 0.5) * step
        draw.rectangle([cx - width / 2, top, cx + width / 2, y1], fill=light)
        draw.rectangle([cx + width * 0.15, top, cx + width / 2, y1], fill=dark)  # shaded flank
        draw.rectangle([cx - width * 0.7, top, cx + width * 0.7, top + step * 0.12], fill=f.trim)
        draw.rectangle([cx - width * 0.7, y1 - step * 0.12, cx + width * 0.7, y1], fill=f.trim)


def _rose(draw, f: Facade, box) -> None:
    x0, y0, x1, y1 = box
    r = min(x1 - x0, y1 - y0) * 0.14
    cx, cy = (x0 + x1) / 2, y0 + (y1 - y0) * 0.3
    draw.ellipse((cx - r * 1.15, cy - r * 1.15, cx + r * 1.15, cy + r * 1.15), fill=f.trim)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=f.window_color)
    for k in range(12):
        a = k * math.pi / 6
        draw.line([(cx, cy), (cx + r * math.cos(a), cy + r * math.sin(a))], fill=f.trim,
                  width=max(1, round(r * 0.07)))
    draw.ellipse((cx - r * 0.3, cy - r * 0.3, cx + r * 0.3, cy + r * 0.3), fill=f.trim)


def _tower(image, draw, t: Tower, f: Facade, box, scale, unit, rng) -> None:
    x0, x1 = round((t.cx - t.width / 2) * scale), round((t.cx + t.width / 2) * scale)
    top, bottom = round(t.top * scale), box[3]
    _paste_wall(image, [x0, top, x1, bottom], f.texture if f.texture != "glass" else "plain",
                shade(f.wall, 0.93), f.trim, unit, rng)
    w, rh = x1 - x0, t.roof_height * scale
    step = (bottom - top) * 0.55 / max(1, t.windows)
    start = top + (bottom - top) * (0.22 if t.clock else 0.08)
    for i in range(t.windows):
        y = start + i * step
        _window(draw, "rect" if f.window_shape == "rect" else "arch",
                (x0 + w * 0.32, y, x1 - w * 0.32, y + step * 0.7), f.window_color, f.trim,
                max(1.0, w * 0.05))
    if t.clock:
        r, cy = w * 0.3, top + (bottom - top) * 0.1
        cx = (x0 + x1) / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(236, 230, 210), outline=f.trim,
                     width=max(1, round(r * 0.15)))
        draw.line([(cx, cy), (cx + r * 0.55, cy - r * 0.3)], fill=(30, 30, 30), width=max(1, round(r * 0.1)))
        draw.line([(cx, cy), (cx - r * 0.1, cy - r * 0.8)], fill=(30, 30, 30), width=max(1, round(r * 0.08)))
    cx = (x0 + x1) / 2
    if t.roof in ("spire", "pyramid"):
        overhang = w * (0.04 if t.roof == "spire" else 0.12)
        draw.polygon([(x0 - overhang, top), (x1 + overhang, top), (cx, top - rh)], fill=f.roof_color)
        draw.line([(cx, top - rh), (cx, top - rh - w * 0.25)], fill=shade(f.roof_color, 0.7),
                  width=max(1, round(w * 0.04)))
    elif t.roof == "dome":
        draw.pieslice((x0, top - rh, x1, top + rh), 180, 360, fill=f.roof_color)
    elif t.roof == "crenel":
        _merlons(draw, x0 - w * 0.08, x1 + w * 0.08, top, max(2.0, w * 0.2), shade(f.wall, 0.88))
    else:
        draw.rectangle([x0 - w * 0.05, top - max(2.0, w * 0.06), x1 + w * 0.05, top], fill=f.trim)


def _dome(draw, f: Facade, box, scale) -> None:
    d = f.dome
    cx, base = d.cx * scale, box[1]
    half, drum, height = d.width * scale / 2, d.drum * scale, d.height * scale
    draw.rectangle([cx - half * 0.85, base - drum, cx + half * 0.85, base], fill=shade(f.wall, 0.95))
    for k in range(9):  # pilasters around the drum
        x = cx - half * 0.8 + k * half * 1.6 / 8
        draw.line([(x, base - drum), (x, base)], fill=shade(f.trim, 0.8), width=max(1, round(half * 0.03)))
    top = base - drum
    draw.pieslice((cx - half, top - height, cx + half, top + height), 180, 360, fill=d.color)
    for k in range(1, 6):  # ribs of the cap
        x = cx - half + k * 2 * half / 6
        dy = height * math.sqrt(max(0.0, 1 - ((x - cx) / half) ** 2))
        draw.line([(x, top), (cx + (x - cx) * 0.15, top - dy * 0.98)], fill=shade(d.color, 0.75),
                  width=max(1, round(half * 0.02)))
    if d.lantern:
        lw, lh = half * 0.12, 0.02 * scale
        draw.rectangle([cx - lw, top - height - lh, cx + lw, top - height + 1], fill=shade(f.trim, 0.95))
        draw.pieslice((cx - lw * 1.2, top - height - lh - lw, cx + lw * 1.2, top - height - lh + lw), 180,
                      360, fill=d.color)
