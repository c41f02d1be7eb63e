"""Viewpoints: where a view looks at the scene (scale, crop, perspective, roll) and the warp itself.

A view is the quadrilateral of the scene (normalised coordinates) that the output image's
corners see. Its parameters depend on the view's kind:

- query: the landmark clearly in frame, nearly frontal (the query box is the landmark's box);
- easy: the landmark fills 45-90 % of the frame, mild perspective;
- hard: far away (20-32 %), a close-up of a detail (130-200 %), or a strongly oblique view;
- junk: the landmark tiny (6-12 %), or only a sliver of it in frame (a heavy occluder is the third
  junk mode, drawn by photo.py).

Sampling is cheap and needs no pixels, so the planner computes query boxes without rendering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

CAMERA_STREAM = 21
ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1))
ASPECT_PROBS = (0.47, 0.3, 0.1, 0.13)
KINDS = ("query", "easy", "hard", "junk")


@dataclass(frozen=True)
class View:
    size: tuple[int, int]  # output (width, height) in pixels
    quad: tuple[tuple[float, float], ...]  # scene points seen by the corners TL, TR, BR, BL
    kind: str  # one of KINDS
    mode: str  # how the kind was realised: frontal, far, close, oblique, tiny, sliver, occluded


def view_rng(seed: int, stream: int, landmark_id: int, view_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, landmark_id, view_id])


def sample_view(seed: int, landmark_id: int, view_id: int, kind: str, box: tuple[float, float, float, float],
                image_max_side: int) -> View:
    """The view `view_id` of a landmark whose scene box is `box` (normalised x0, y0, x1, y1)."""
    rng = view_rng(seed, CAMERA_STREAM, landmark_id, view_id)
    size = _sample_size(rng, image_max_side)
    aspect = size[0] / size[1]
    mode, fill, yaw, pitch, roll = _sample_geometry(rng, kind)
    bx0, by0, bx1, by1 = box
    bw, bh = bx1 - bx0, by1 - by0
    frame_w = max(bw, bh * aspect) / fill  # the landmark spans `fill` of the frame's limiting side
    frame_h = frame_w / aspect
    cx, cy = _sample_centre(rng, mode, box, frame_w, frame_h)
    return View(size, _quad(cx, cy, frame_w / 2, frame_h / 2, yaw, pitch, roll), kind, mode)


def _sample_size(rng: np.random.Generator, image_max_side: int) -> tuple[int, int]:
    aw, ah = ASPECTS[int(rng.choice(len(ASPECTS), p=ASPECT_PROBS))]
    side = image_max_side if rng.random() < 0.85 else int(image_max_side * rng.uniform(0.7, 1.0))
    if aw >= ah:
        return side, max(1, round(side * ah / aw))
    return max(1, round(side * aw / ah)), side


def _sample_geometry(rng: np.random.Generator, kind: str) -> tuple[str, float, float, float, float]:
    """(mode, fill, yaw, pitch, roll): fill = share of the frame the landmark spans."""
    sign = float(rng.choice([-1.0, 1.0]))
    if kind == "query":
        return "frontal", rng.uniform(0.55, 0.8), rng.uniform(-0.06, 0.06), rng.uniform(0.0, 0.06), \
            rng.uniform(-1.5, 1.5)
    if kind == "easy":
        return "frontal", rng.uniform(0.45, 0.9), rng.uniform(-0.12, 0.12), rng.uniform(0.0, 0.1), \
            rng.uniform(-2.5, 2.5)
    if kind == "hard":
        mode = str(rng.choice(["far", "close", "oblique"]))
        fill = {"far": rng.uniform(0.2, 0.32), "close": rng.uniform(1.3, 2.0),
                "oblique": rng.uniform(0.4, 0.75)}[mode]
        yaw = sign * (rng.uniform(0.3, 0.45) if mode == "oblique" else rng.uniform(0.08, 0.3))
        return mode, fill, yaw, rng.uniform(0.0, 0.2), rng.uniform(-6.0, 6.0)
    if kind == "junk":
        mode = str(rng.choice(["tiny", "sliver", "occluded"]))
        fill = {"tiny": rng.uniform(0.06, 0.12), "sliver": rng.uniform(0.7, 1.1),
                "occluded": rng.uniform(0.45, 0.8)}[mode]
        return mode, fill, sign * rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.15), rng.uniform(-5.0, 5.0)
    raise ValueError(f"unknown view kind {kind!r}")


def _sample_centre(rng, mode, box, frame_w, frame_h) -> tuple[float, float]:
    bx0, by0, bx1, by1 = box
    bcx, bcy, bw, bh = (bx0 + bx1) / 2, (by0 + by1) / 2, bx1 - bx0, by1 - by0
    if mode == "close":  # a detail of the landmark: the frame stays inside its box
        return bcx + rng.uniform(-0.5, 0.5) * max(0.0, bw - frame_w), \
            bcy + rng.uniform(-0.5, 0.5) * max(0.0, bh - frame_h)
    if mode == "sliver":  # the frame overlaps only 8-20 % of the landmark, from one side or from above
        overlap = rng.uniform(0.08, 0.2)
        if rng.random() < 0.7:
            side = float(rng.choice([-1.0, 1.0]))
            return bcx + side * (bw / 2 + frame_w / 2 - overlap * bw), bcy + rng.uniform(-0.2, 0.2) * bh
        return bcx + rng.uniform(-0.2, 0.2) * bw, by0 - frame_h / 2 + overlap * bh
    # The landmark stays in frame: the slack of the frame around it bounds the offset. Far
    # views keep the horizon near the middle, as people frame them.
    slack_x, slack_y = max(0.0, frame_w - bw) / 2, max(0.0, frame_h - bh) / 2
    vertical = 0.3 if mode in ("far", "tiny") else 0.8
    return bcx + rng.uniform(-0.8, 0.8) * slack_x, bcy + rng.uniform(-vertical, vertical) * slack_y


def _quad(cx, cy, hw, hh, yaw, pitch, roll_deg) -> tuple[tuple[float, float], ...]:
    """Scene quadrilateral of an image rectangle seen with yaw (one side nearer) and upward pitch."""
    corners = np.array([[-hw * (1 + pitch), -hh * (1 + yaw)], [hw * (1 + pitch), -hh * (1 - yaw)],
                        [hw * (1 - pitch), hh * (1 - yaw)], [-hw * (1 - pitch), hh * (1 + yaw)]])
    a = math.radians(roll_deg)
    rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    points = corners @ rotation.T + np.array([cx, cy])
    return tuple((float(x), float(y)) for x, y in points)


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 matrix mapping the 4 points `src` (4, 2) onto `dst` (4, 2)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def image_corners(view: View) -> np.ndarray:
    w, h = view.size
    return np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)


def scene_to_image(view: View) -> np.ndarray:
    """Homography from normalised scene coordinates to output pixels."""
    return homography(np.asarray(view.quad), image_corners(view))


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) points through a 3x3 homography."""
    homogeneous = np.c_[points, np.ones(len(points))] @ matrix.T
    return homogeneous[:, :2] / homogeneous[:, 2:3]


def box_in_image(view: View, box: tuple[float, float, float, float]) -> tuple[tuple[float, ...], float]:
    """(bbx [x1, y1, x2, y2] of the landmark in the image, clipped; share of the landmark in frame)."""
    x0, y0, x1, y1 = box
    gx, gy = np.meshgrid(np.linspace(x0, x1, 24), np.linspace(y0, y1, 24))
    projected = apply_homography(scene_to_image(view), np.c_[gx.ravel(), gy.ravel()])  # (576, 2)
    w, h = view.size
    inside = (projected[:, 0] >= 0) & (projected[:, 0] < w) & (projected[:, 1] >= 0) & (projected[:, 1] < h)
    corners = apply_homography(scene_to_image(view), np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    bbx = (float(np.clip(corners[:, 0].min(), 0, w - 1)), float(np.clip(corners[:, 1].min(), 0, h - 1)),
           float(np.clip(corners[:, 0].max(), 0, w - 1)), float(np.clip(corners[:, 1].max(), 0, h - 1)))
    return bbx, float(inside.mean())


def warp(scene: Image.Image, view: View) -> Image.Image:
    """Photograph the scene: perspective warp into view.size, extending the scene by its edges."""
    quad = np.asarray(view.quad) * scene.width  # scene pixels (4, 2)
    edges = np.linalg.norm(quad - np.roll(quad, -1, axis=0), axis=1)  # top, right, bottom, left
    density = min(view.size[0] / max(edges[0], edges[2]), view.size[1] / max(edges[1], edges[3]))
    if density < 0.67:  # far views: shrink the scene first, which also antialiases it
        factor = density * 1.5
        scene = scene.resize((max(8, round(scene.width * factor)), max(6, round(scene.height * factor))),
                             Image.BOX)
        quad = quad * factor
    pad = _padding(quad, scene.size)
    if any(pad):
        scene, quad = Image.fromarray(_extend(np.asarray(scene), pad)), quad + np.array(pad[:2])
    coeffs = homography(image_corners(view), quad)  # output pixel -> source pixel, as PIL expects
    return scene.transform(view.size, Image.PERSPECTIVE, tuple(coeffs.ravel()[:8]), Image.BILINEAR)


def _extend(pixels: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """Extend the scene beyond its borders with plain sky and ground.

    Each row continues sideways with the median colour of its outermost pixels, the top with the
    top row's and the bottom with the bottom row's. Replicating the border pixels instead would
    smear whatever touches the border into long streaks.
    """
    left, top, right, bottom = pad
    height, width = pixels.shape[:2]
    # The outermost columns hold only sky, hills and ground (scenes keep their borders free).
    edge = max(1, width // 64)
    border = np.concatenate([pixels[:, :edge], pixels[:, -edge:]], axis=1)  # (H, 2 * edge, 3)
    row_colour = np.median(border, axis=1).astype(np.uint8)  # (H, 3)
    out = np.empty((height + top + bottom, width + left + right, 3), dtype=np.uint8)
    out[top:top + height, :left] = row_colour[:, None]
    out[top:top + height, left + width:] = row_colour[:, None]
    out[top:top + height, left:left + width] = pixels
    out[:top] = row_colour[0]
    out[top + height:] = row_colour[-1]
    return out


def _padding(quad: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    x_min, y_min = np.floor(quad.min(axis=0)) - 2
    x_max, y_max = np.ceil(quad.max(axis=0)) + 2
    return (int(max(0, -x_min)), int(max(0, -y_min)), int(max(0, x_max - size[0])),
            int(max(0, y_max - size[1])))
