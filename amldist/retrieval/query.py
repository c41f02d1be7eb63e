"""Asymmetric search: a query network (the student) against a gallery index built by its teacher.

    searcher = AsymmetricSearch(GalleryIndex.open("gallery.index"), load_query_network("student.onnx"))
    hits = searcher.search(Image.open("q.jpg"), bbx=None, k=10)     # [Hit(rank, row, name, score)]

Before any query, the pair is checked (`check_query_network`), each refusal one line:
- dimension: the query network's descriptors must have the index's dimension;
- teacher: a student records the teacher whose space it was trained in (meta['teacher'], the sha256 of
  the teacher file behind its feature store); it must be the file that built the index. A network that
  records no teacher (trained alone, or not by amldist) is refused unless the caller skips this check;
  the index's own network is always accepted (symmetric search);
- whitening: an index with learned whitening applies it to queries too; an exported file that bakes a
  whitening in must bake that one, and one that bakes none gets it applied after it.
A checkpoint embeds queries as the index embedded its gallery (image size, scales), an exported file as
it was exported.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from amldist.atomic import atomic_path
from amldist.errors import UserError, require
from amldist.extract import Box
from amldist.feature_store import file_sha256
from amldist.retrieval.index import GalleryIndex
from amldist.retrieval.query_net import CheckpointQuery, QueryNetwork
from amldist.whiten import apply_whitening

MAX_K = 1000


@dataclass(frozen=True)
class Hit:
    rank: int        # 1-based
    row: int         # the gallery row
    name: str
    score: float     # inner product of unit vectors (cosine similarity)

    def as_dict(self) -> dict:
        return {"rank": self.rank, "name": self.name, "score": round(float(self.score), 6), "row": self.row}


def _short(sha: str | None) -> str:
    return "unknown" if not sha else sha[:12]


def _query_source_sha(query: QueryNetwork) -> str:
    """sha256 of the checkpoint behind a query network (the file itself, or the one it was exported from)."""
    if query.kind == "checkpoint":
        return file_sha256(query.path)
    return str(query.details.get("network_sha256", ""))


def check_query_network(index: GalleryIndex, query: QueryNetwork, skip_teacher_check: bool = False) -> None:
    """Refuse (UserError, one line) a query network that does not belong to `index`; see the module
    docstring."""
    manifest = index.manifest
    baked = query.baked_whitening
    index_lw = manifest.get("whitening")
    if baked is not None:
        require(index_lw is not None and baked == index_lw["sha256"],
                f"{query.path} bakes in whitening {_short(baked)}, but {index.path} applies "
                f"{'none' if index_lw is None else _short(index_lw['sha256'])}; export it with the index's "
                f"whitening (--whitening {index.path}) or without one")
    expected = index.search_dim if baked is not None else index.dim
    require(query.dim == expected,
            f"{query.path} gives {query.dim}-D descriptors, {index.path} holds {expected}-D ones "
            f"({manifest['architecture']}); a student must be trained to the teacher's dimension "
            f"(model.projection_dim)")
    if skip_teacher_check or _query_source_sha(query) == manifest["network_sha256"]:
        return
    teacher = query.teacher or {}
    index_sha = manifest["network_sha256"]
    if not teacher.get("network_sha256"):
        raise UserError(f"{query.path} records no teacher (trained alone, or not by amldist), so its "
                        f"descriptors need not live in the space of {index.path} ({manifest['architecture']} "
                        f"{_short(index_sha)}); --skip-teacher-check queries anyway")
    require(teacher["network_sha256"] == index_sha,
            f"{query.path} was trained against teacher {teacher.get('architecture', '?')} "
            f"{_short(teacher['network_sha256'])}, but {index.path} was built by {manifest['architecture']} "
            f"{_short(index_sha)}; query it with a student of that teacher")


class AsymmetricSearch:
    """A checked (index, query network) pair that answers image queries; safe to call from threads."""

    def __init__(self, index: GalleryIndex, query: QueryNetwork, *, skip_teacher_check: bool = False,
                 image_size: int | None = None, scales: Sequence[float] | None = None):
        check_query_network(index, query, skip_teacher_check)
        self.index, self.query = index, query
        self.after = None  # whitening applied to the query network's output
        if isinstance(query, CheckpointQuery):
            query.configure(image_size or index.manifest["image_size"], scales or index.manifest["scales"],
                            index.whitening)
        elif query.baked_whitening is None:
            self.after = index.whitening
        # extract.embed switches the network's mode around each call: one checkpoint query at a time.
        self._lock = threading.Lock() if isinstance(query, CheckpointQuery) else None

    def embed(self, image: Image.Image, bbx: Box | None = None) -> np.ndarray:
        """The query's descriptor in the index's space: (search_dim,) float32."""
        if self._lock is not None:
            with self._lock:
                vector = self.query.embed(image, bbx)
        else:
            vector = self.query.embed(image, bbx)
        vector = np.asarray(vector, np.float32)[None]
        return (apply_whitening(vector, self.after) if self.after is not None else vector)[0]

    def search(self, image: Image.Image, bbx: Box | None = None, k: int = 10) -> list[Hit]:
        require(1 <= k <= MAX_K, f"k must be between 1 and {MAX_K}, got {k}")
        check_bbx(bbx, image.size)
        scores, rows = self.index.search(self.embed(image, bbx)[None], k)
        names = self.index.entries
        return [Hit(rank + 1, int(row), names[int(row)][0], float(score))
                for rank, (row, score) in enumerate(zip(rows[0], scores[0])) if row >= 0]

    def describe(self) -> str:
        q, m = self.query, self.index.manifest
        size = q.image_size or m["image_size"]
        white = "none" if m.get("whitening") is None else _short(m["whitening"]["sha256"])
        return (f"index {self.index.path}: {len(self.index)} images by {m['architecture']} "
                f"{_short(m['network_sha256'])} ({m['kind']}, whitening {white}); query network {q.path} "
                f"({q.kind}, {q.architecture}, {size} px)")


def parse_bbx(text: str) -> Box:
    """'x1,y1,x2,y2' -> a box; one line for anything else."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    require(len(values) == 4 and all(np.isfinite(values)),
            f"--bbx must be x1,y1,x2,y2 (four numbers), got {text!r}")
    return values  # type: ignore[return-value]


def check_bbx(bbx: Box | None, size: tuple[int, int]) -> None:
    """A query box must lie inside the image and have an area (cirtorch's query boxes do)."""
    if bbx is None:
        return
    x1, y1, x2, y2 = bbx
    width, height = size
    require(0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height,
            f"the box {x1:g},{y1:g},{x2:g},{y2:g} is not inside the {width} x {height} image with x1 < x2, "
            f"y1 < y2")


def open_query_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


# ---------------------------------------------------------------- contact sheet


def _thumb(image: Image.Image, side: int) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (side, side), (255, 255, 255))
    tile.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return tile


def contact_sheet(query_image: Image.Image, bbx: Box | None, hits: Sequence[Hit],
                  images: Sequence[Image.Image], out: str | Path, marks: Sequence[bool | None] | None = None,
                  columns: int = 5,
                  side: int = 160, title: str = "") -> Path:
    """A PNG: the query (its box drawn) and the ranked results with rank, score and name; `marks` frames a
    result green (right) or red (wrong) when the caller knows."""
    query = query_image.convert("RGB").copy()
    if bbx is not None:
        ImageDraw.Draw(query).rectangle(bbx, outline=(255, 200, 0), width=max(2, query.width // 100))
    label = 28
    rows = (len(hits) + columns - 1) // columns
    size = (side * (columns + 1) + 10, max(rows, 1) * (side + label) + label)
    sheet = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title or "query", fill=(0, 0, 0))
    sheet.paste(_thumb(query, side), (0, label))
    for i, (hit, image) in enumerate(zip(hits, images)):
        x, y = side * (1 + i % columns) + 10, label + (i // columns) * (side + label)
        sheet.paste(_thumb(image, side - 8), (x + 4, y + 4))
        mark = marks[i] if marks is not None else None
        if mark is not None:
            colour = (0, 160, 0) if mark else (210, 0, 0)
            draw.rectangle((x, y, x + side - 1, y + side - 1), outline=colour, width=4)
        draw.text((x + 4, y + side + 1), f"{hit.rank}. {hit.score:.3f} {hit.name[:18]}", fill=(0, 0, 0))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(out)
