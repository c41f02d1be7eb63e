"""The demo report's figures, drawn from plain inputs and written atomically as PNG (no Ray, no training).

- `plot_training_curves`: loss, validation mAP (sym solid, asym dashed) and mean hard-negative
  distance per epoch, one colour per run, from each run's metrics.jsonl records;
- `plot_negatives_over_epochs`: the paper's Fig. 2 -- per anchor, one row per epoch: the anchor, then
  the hard negatives mined for it that epoch (images come through a callback, so any source works);
- `plot_tsne`: the paper's Fig. 3 -- 2-d points of the same images embedded by the teacher (circles)
  and a student (diamonds), joined by a line, one colour per landmark.

Matplotlib's object API (`Figure`) is used without pyplot, so no GUI backend or global state is involved.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from amldist.atomic import atomic_write_bytes
from amldist.training.grid import negatives_grid

CURVE_PANELS = (("loss", "training loss (per tuple)", False),
                ("val_map", "validation mAP (%)", False),
                ("avg_neg_distance", "mean distance to mined negatives", False))  # (key, title, log y)
GRID_CELL, GRID_GAP = 72, 4


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records holding a finite number under `key`; epochs counted from 1."""
    points = [(int(r["epoch"]) + 1, float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """runs[name] = metrics.jsonl records ({'epoch', 'loss', 'val_map_sym', ...}) -> PNG at `path`."""
    if not any(runs.values()):
        raise ValueError("no metrics to plot")
    fig = Figure(figsize=(4.2 * len(CURVE_PANELS), 3.6))
    axes = fig.subplots(1, len(CURVE_PANELS))
    colours = {name: f"C{i}" for i, name in enumerate(runs)}
    for ax, (key, title, log_scale) in zip(axes, CURVE_PANELS):
        drawn = False
        for name, records in runs.items():
            variants = (("val_map_sym", "-"), ("val_map_asym", "--")) if key == "val_map" else ((key, "-"),)
            for metric, style in variants:
                epochs, values = _series(records, metric)
                if epochs:
                    suffix = f" ({metric.rsplit('_', 1)[1]})" if key == "val_map" else ""
                    ax.plot(epochs, values, style, marker="o", ms=3, color=colours[name], label=name + suffix)
                    drawn = True
        if log_scale and drawn:
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[n], label=n) for n in runs]
    handles += [Line2D([], [], color="k", ls="-", label="sym"),
                Line2D([], [], color="k", ls="--", label="asym")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    return save_figure(fig, path)


def negatives_by_anchor(records: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[int, list[int]]]]:
    """negatives.jsonl records ({'epoch', 'anchors', 'negatives'}) -> {anchor: [(epoch, negatives)]}."""
    out: dict[int, list[tuple[int, list[int]]]] = {}
    for record in sorted(records, key=lambda r: int(r["epoch"])):
        for anchor, negatives in zip(record["anchors"], record["negatives"]):
            out.setdefault(int(anchor), []).append((int(record["epoch"]), [int(n) for n in negatives]))
    return out


def _spread(items: Sequence[Any], count: int) -> list[Any]:
    """At most `count` items, evenly spaced, always keeping the first and the last."""
    if len(items) <= count:
        return list(items)
    picks = np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))
    return [items[i] for i in picks]


def plot_negatives_over_epochs(records: Sequence[Mapping[str, Any]], load_image: Callable[[int], Image.Image],
                               path: str | Path, *, max_anchors: int = 3, max_epochs: int = 6,
                               title: str = "") -> Path:
    """One panel per anchor: rows = epochs, first column the anchor (green), then its mined negatives
    (red), most similar first. `load_image(id)` returns a training image by dataset index."""
    by_anchor = negatives_by_anchor(records)
    anchors = [a for a, rows in by_anchor.items() if any(negs for _, negs in rows)][:max_anchors]
    if not anchors:
        raise ValueError("no mined negatives to show")
    cache: dict[int, Image.Image] = {}

    def image(i: int) -> Image.Image:
        if i not in cache:
            cache[i] = load_image(i)
        return cache[i]

    panels = []
    for anchor in anchors:
        rows = _spread(by_anchor[anchor], max_epochs)
        grid = negatives_grid([[image(anchor)] + [image(n) for n in negs] for _, negs in rows],
                              cell=GRID_CELL, gap=GRID_GAP)
        panels.append((anchor, [epoch for epoch, _ in rows], grid))
    width = max(g.shape[1] for *_, g in panels) / 100 + 1.2
    heights = [g.shape[0] for *_, g in panels]
    fig = Figure(figsize=(width, sum(heights) / 100 + 0.5 * len(panels) + 0.4))
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (anchor, epochs, grid) in zip(axes, panels):
        ax.imshow(grid)
        centres = [GRID_GAP + r * (GRID_CELL + GRID_GAP) + GRID_CELL / 2 for r in range(len(epochs))]
        ax.set_yticks(centres, [f"epoch {e + 1}" for e in epochs], fontsize=8)
        ax.set_xticks([GRID_GAP + GRID_CELL / 2], ["anchor"], fontsize=8)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(f"anchor {anchor}: its hard negatives, most similar first", fontsize=9, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_tsne(teacher_xy: np.ndarray, student_xy: np.ndarray, labels: Sequence[Any], path: str | Path,
              title: str = "") -> Path:
    """teacher_xy, student_xy (N, 2): the same N images in both spaces; labels (N,) their landmark."""
    teacher_xy, student_xy = np.asarray(teacher_xy), np.asarray(student_xy)
    if teacher_xy.shape != student_xy.shape or teacher_xy.shape[0] != len(labels):
        raise ValueError(f"shapes differ: teacher {teacher_xy.shape}, student {student_xy.shape}, "
                         f"{len(labels)} labels")
    fig = Figure(figsize=(5.6, 5.0))
    ax = fig.subplots()
    names = list(dict.fromkeys(labels))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for (tx, ty), (sx, sy), label in zip(teacher_xy, student_xy, labels):
        ax.plot([tx, sx], [ty, sy], color=colour[label], lw=0.7, alpha=0.6)
    for name in names:
        rows = [i for i, label in enumerate(labels) if label == name]
        ax.scatter(teacher_xy[rows, 0], teacher_xy[rows, 1], marker="o", s=36, color=colour[name],
                   edgecolors="k", linewidths=0.4)
        ax.scatter(student_xy[rows, 0], student_xy[rows, 1], marker="D", s=30, color=colour[name],
                   edgecolors="k", linewidths=0.4)
    handles = [Line2D([], [], ls="", marker="o", color="grey", label="teacher"),
               Line2D([], [], ls="", marker="D", color="grey", label="student")]
    handles += [Line2D([], [], ls="", marker="s", color=colour[n], label=str(n)) for n in names]
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
