"""A gallery indexed by the teacher: its descriptors, a faiss index over them, and what produced them.

    report = build_index("teacher.pth", folder_gallery("photos/"), "gallery.index", IndexSettings(...))
    report = add_to_index("gallery.index")            # embeds only images the index does not hold yet
    index = GalleryIndex.open("gallery.index"); scores, ids = index.search(queries, k=10)

An index is a folder holding
- `vectors-<sha12>.npy`: the teacher's raw descriptors (N, D) float32, row i = image i (kept so that an
  update never re-embeds an image, and a new whitening or index kind needs no extraction);
- `images-<sha12>.json`: the gallery entries [name, stamp], in gallery order;
- `index-<sha12>.faiss`: an inner-product faiss index of the (whitened) descriptors, exact flat or IVF-PQ;
- `whitening-<sha12>.pt`: the learned whitening, when one is applied (to the gallery and to every query);
- `manifest.json`: the network (path, sha256, architecture), image size, scales, whitening, gallery
  (kind, absolute root), index kind and settings, the file names. It is written last and atomically:
  every other file is named by its content, so an interrupted build or update leaves the previous index.

Descriptors are extracted as evaluation extracts a database (`extract.embed`: cirtorch's resize rule,
multi-scale), optionally over Ray tasks (`distributed_extract`). An update lists the gallery again, keeps
the rows of entries whose stamp is unchanged, embeds the rest, drops entries that are gone, and rebuilds
the faiss index from all rows: the result is what a full build of the current gallery gives.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amldist import search
from amldist.atomic import atomic_path, atomic_write_json, is_temporary
from amldist.checkpoints import load_checkpoint
from amldist.errors import UserError, require
from amldist.extract import embed
from amldist.feature_store import file_sha256
from amldist.retrieval.export import whitening_digest
from amldist.retrieval.gallery import Gallery, GalleryEntry, open_gallery
from amldist.whiten import Whitening, apply_whitening, load_whitening, save_whitening

log = logging.getLogger(__name__)

FORMAT = "amldist-gallery-index"
VERSION = 1
MANIFEST = "manifest.json"
RECALL_K = 10             # --compress prints recall@10 of IVF-PQ against the flat index
_ENTRY = re.compile(r"manifest\.json|(vectors|images|index|whitening)-[0-9a-f]{12}\.(npy|json|faiss|pt)")


@dataclass(frozen=True)
class IndexSettings:
    """How a gallery is embedded and indexed (`amldist index`'s flags)."""

    image_size: int = 1024
    scales: tuple[float, ...] = (1.0,)
    compress: bool = False               # IVF-PQ instead of the exact flat index
    nlist: int | None = None             # IVF-PQ settings; None: search.ivfpq_parameters decides
    pq_m: int | None = None
    nprobe: int | None = None
    device: str = "cpu"
    batch_size: int | None = None
    workers: int = 2                     # DataLoader decoding workers
    ray_workers: int = 0                 # embed over this many Ray tasks (0: this process)


@dataclass(frozen=True)
class IndexWhitening:
    whitening: Whitening
    source: str                          # where it came from, for the manifest


@dataclass
class BuildReport:
    path: Path
    count: int
    embedded: int                        # images embedded by this call
    kept: int                            # rows reused from the index (an update)
    removed: int                         # entries gone from the gallery (an update)
    kind: str
    params: dict[str, int] = field(default_factory=dict)
    recall: float | None = None          # IVF-PQ recall@RECALL_K against the flat index
    recall_queries: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lines = [(f"{self.path}: {self.count} images ({self.embedded} embedded, {self.kept} kept, "
                  f"{self.removed} removed) in {self.seconds:.1f} s, {self.kind} index")]
        if self.recall is not None:
            p = self.params
            lines.append(f"IVF-PQ ({p['nlist']} lists, {p['pq_m']} codes x {p['nbits']} bits, nprobe "
                         f"{p['nprobe']}): recall@{RECALL_K} {self.recall:.3f} against the exact flat index "
                         f"({self.recall_queries} gallery images as queries, each one's own row left out)")
        return lines


# ---------------------------------------------------------------- the folder


def not_an_index(folder: Path) -> str | None:
    """Why writing an index into `folder` would destroy something else; None when it may be written."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        return "it exists and is not a folder"
    others = sorted(p.name for p in folder.iterdir() if not (_ENTRY.fullmatch(p.name) or is_temporary(p)))
    if others:
        return f"it holds {others[0]!r}, which is not part of a gallery index"
    manifest = folder / MANIFEST
    if manifest.is_file() and _read_manifest(folder, strict=False) is None:
        return f"its {MANIFEST} is not a gallery index manifest"
    return None


def _read_manifest(folder: Path, strict: bool = True) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        if strict:
            raise UserError(f"{folder} is not a readable gallery index ({err})") from None
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        if strict:
            raise UserError(f"{folder} is not a gallery index (its {MANIFEST} is another file)")
        return None
    require(manifest.get("version") == VERSION,
            f"{folder}: index version {manifest.get('version')} is not {VERSION}")
    return manifest


def _content_named(folder: Path, prefix: str, suffix: str, write: Callable[[Path], None]) -> str:
    """Write a file through `write(tmp)` and name it by its content: <prefix>-<sha12><suffix>."""
    pending = folder / f"{prefix}{suffix}.pending"
    with atomic_path(pending) as tmp:
        write(tmp)
        checksum = file_sha256(tmp)
    name = f"{prefix}-{checksum[:12]}{suffix}"
    pending.replace(folder / name)
    return name


# ---------------------------------------------------------------- building


def _embed_gallery(net, gallery: Gallery, positions: list[int], settings: IndexSettings) -> np.ndarray:
    source = gallery.subset(positions)
    options = {"image_size": settings.image_size, "scales": list(settings.scales),
               "batch_size": settings.batch_size}
    if settings.ray_workers > 0:
        from amldist.distributed_extract import embed_distributed

        gpus = 1.0 if settings.device.startswith("cuda") else 0.0
        return embed_distributed(net, source, num_workers=settings.ray_workers, gpus_per_worker=gpus,
                                 **options)
    log.info("embedding %d gallery images", len(positions))
    return embed(net, source, device=settings.device, num_workers=settings.workers, desc="index", **options)


def _index_kind(settings: IndexSettings) -> str:
    return "ivfpq" if settings.compress else "flat"


def _commit(out: Path, entries: list[GalleryEntry], raw: np.ndarray, fields: dict[str, Any],
            whitening: IndexWhitening | None,
            settings: IndexSettings) -> tuple[dict[str, int], float | None, int]:
    """Write the index files, then the manifest; remove what the new manifest no longer names."""
    vectors = apply_whitening(raw, whitening.whitening) if whitening is not None else raw
    kind = _index_kind(settings)
    params = {}
    if kind == "ivfpq":
        params = search.ivfpq_parameters(len(vectors), vectors.shape[1], settings.nlist, settings.pq_m,
                                         settings.nprobe)
    faiss_index = search.build_faiss_index(vectors, kind, params)
    recall, queries = (search.recall_against_flat(faiss_index, vectors, RECALL_K) if kind == "ivfpq"
                       else (None, 0))
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "vectors": _content_named(out, "vectors", ".npy", lambda p: _save_array(p, raw)),
        "images": _content_named(out, "images", ".json",
                                 lambda p: p.write_text(json.dumps([[e.name, e.stamp] for e in entries]))),
        "index": _content_named(out, "index", ".faiss", lambda p: search.write_faiss_index(faiss_index, p)),
    }
    lw = None
    if whitening is not None:
        files["whitening"] = _content_named(out, "whitening", ".pt",
                                            lambda p: save_whitening(p, whitening.whitening))
        lw = {"sha256": whitening_digest(whitening.whitening), "source": whitening.source,
              "dim": whitening.whitening.dim, "file": files["whitening"]}
    manifest = {**fields, "format": FORMAT, "version": VERSION, "count": len(entries),
                "dim": int(raw.shape[1]), "search_dim": int(vectors.shape[1]), "whitening": lw, "kind": kind,
                "requested": {"nlist": settings.nlist, "pq_m": settings.pq_m, "nprobe": settings.nprobe},
                "ivfpq": params or None, "recall_at_10": recall, "files": files}
    atomic_write_json(out / MANIFEST, manifest)
    for path in out.iterdir():
        if _ENTRY.fullmatch(path.name) and path.name != MANIFEST and path.name not in files.values():
            path.unlink()
    return params, recall, queries


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array, dtype=np.float32))


def _network_fields(network: Path, net) -> dict[str, Any]:
    return {"network": str(network.resolve()), "network_sha256": file_sha256(network),
            "architecture": net.meta.architecture}


def _check_names(gallery: Gallery) -> None:
    names = [e.name for e in gallery.entries]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        duplicate = next(n for n in names if n in seen or seen.add(n))
        raise UserError(f"{gallery.root}: two images share the name {duplicate!r}")


def build_index(network: str | Path, gallery: Gallery, out: str | Path, settings: IndexSettings,
                whitening: IndexWhitening | None = None, replace: bool = False) -> BuildReport:
    """Embed every gallery image with `network` and write the index at `out` (see the module docstring)."""
    started = time.perf_counter()
    out, network = Path(out), Path(network)
    problem = not_an_index(out)
    require(problem is None, f"--out {out}: {problem}; choose another folder")
    require(replace or not (out / MANIFEST).exists(),
            f"--out {out} already holds an index; --add updates it, --force rebuilds it")
    _check_names(gallery)
    net, _ = load_checkpoint(network)
    if whitening is not None:
        require(whitening.whitening.P.shape[1] == net.meta.outputdim,
                f"the whitening expects {whitening.whitening.P.shape[1]}-D descriptors, the network gives "
                f"{net.meta.outputdim}")
    raw = _embed_gallery(net, gallery, list(range(len(gallery))), settings)
    fields = {**_network_fields(network, net), "image_size": settings.image_size,
              "scales": [float(s) for s in settings.scales],
              "gallery": {"kind": gallery.kind, "root": str(gallery.root)}}
    params, recall, queries = _commit(out, gallery.entries, raw, fields, whitening, settings)
    return BuildReport(out, len(gallery), len(gallery), 0, 0, _index_kind(settings), params, recall, queries,
                       time.perf_counter() - started)


def add_to_index(out: str | Path, gallery: Gallery | None = None, network: str | Path | None = None,
                 settings: IndexSettings | None = None) -> BuildReport:
    """Bring the index at `out` up to date with its gallery, embedding only new or changed images.

    The gallery, network, image size, scales, whitening and index kind are the index's; a `gallery` or
    `network` given must be the same ones (same root; same file content). `settings` supplies the
    extraction resources (device, batch size, workers, Ray workers) and may change the IVF-PQ settings."""
    started = time.perf_counter()
    index = GalleryIndex.open(out)
    manifest = index.manifest
    recorded = manifest["gallery"]
    if gallery is None:
        gallery = open_gallery(recorded["kind"], recorded["root"])
    require((gallery.kind, str(gallery.root)) == (recorded["kind"], recorded["root"]),
            f"{out} indexes the {recorded['kind']} gallery {recorded['root']}, not {gallery.root}; "
            f"a different gallery needs its own index")
    _check_names(gallery)
    network = Path(network or manifest["network"])
    require(network.is_file(), f"the index's network {network} is gone; give --network with the same file")
    require(file_sha256(network) == manifest["network_sha256"],
            f"{network} is not the network that built {out} (sha256 differs); a new network needs a new "
            f"index")
    base = settings or IndexSettings()
    settings = IndexSettings(image_size=manifest["image_size"], scales=tuple(manifest["scales"]),
                             compress=manifest["kind"] == "ivfpq",
                             nlist=base.nlist or manifest["requested"]["nlist"],
                             pq_m=base.pq_m or manifest["requested"]["pq_m"],
                             nprobe=base.nprobe or manifest["requested"]["nprobe"],
                             device=base.device, batch_size=base.batch_size, workers=base.workers,
                             ray_workers=base.ray_workers)
    old_rows = {(name, stamp): row for row, (name, stamp) in enumerate(index.entries)}
    rows = [old_rows.get((e.name, e.stamp)) for e in gallery.entries]
    new = [i for i, row in enumerate(rows) if row is None]
    old = index.raw_vectors()
    raw = np.zeros((len(gallery), old.shape[1]), np.float32)
    kept = [i for i, row in enumerate(rows) if row is not None]
    raw[kept] = old[[rows[i] for i in kept]]
    if new:
        net, _ = load_checkpoint(network)
        raw[new] = _embed_gallery(net, gallery, new, settings)
    fields = {key: manifest[key] for key in ("network", "network_sha256", "architecture", "image_size",
                                             "scales", "gallery")}
    whitening = (IndexWhitening(index.whitening, manifest["whitening"]["source"])
                 if index.whitening is not None else None)
    params, recall, queries = _commit(Path(out), gallery.entries, raw, fields, whitening, settings)
    removed = len({name for name, _ in index.entries} - {e.name for e in gallery.entries})
    return BuildReport(Path(out), len(gallery), len(new), len(kept), removed, _index_kind(settings), params,
                       recall, queries, time.perf_counter() - started)


# ---------------------------------------------------------------- reading


@dataclass
class GalleryIndex:
    path: Path
    manifest: dict[str, Any]
    entries: list[tuple[str, str]]         # (name, stamp) per row
    whitening: Whitening | None
    faiss_index: Any

    @classmethod
    def open(cls, path: str | Path) -> GalleryIndex:
        path = Path(path)
        require(path.is_dir(), f"no gallery index at {path}")
        manifest = _read_manifest(path)
        files = manifest["files"]
        try:
            listed = json.loads((path / files["images"]).read_text())
            entries = [(str(name), str(stamp)) for name, stamp in listed]
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"{path}: damaged image list {files['images']} ({err})") from None
        whitening = load_whitening(path / files["whitening"]) if manifest.get("whitening") else None
        faiss_index = search.read_faiss_index(path / files["index"])
        if manifest["kind"] == "ivfpq":
            faiss_index.nprobe = int(manifest["ivfpq"]["nprobe"])
        require(faiss_index.ntotal == len(entries) == manifest["count"],
                f"{path}: the index holds {faiss_index.ntotal} vectors for {len(entries)} images; rebuild it")
        return cls(path, manifest, entries, whitening, faiss_index)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.entries]

    @property
    def dim(self) -> int:
        """The teacher's descriptor dimension (before whitening)."""
        return int(self.manifest["dim"])

    @property
    def search_dim(self) -> int:
        return int(self.manifest["search_dim"])

    def raw_vectors(self) -> np.ndarray:
        array = np.load(self.path / self.manifest["files"]["vectors"], mmap_mode="r")
        require(array.shape == (len(self), self.dim),
                f"{self.path}: damaged descriptor file; rebuild the index")
        return array

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top k gallery rows for each of `vectors` (Q, search_dim), best first."""
        return search.index_search(self.faiss_index, vectors, k)

    def gallery(self) -> Gallery:
        """The indexed gallery, for showing its images (it must still be where it was indexed)."""
        recorded = self.manifest["gallery"]
        return open_gallery(recorded["kind"], recorded["root"])


def resolve_whitening(value: str, network: str | Path, settings: IndexSettings,
                      data_root: str | Path | None = None) -> IndexWhitening:
    """--whitening: a training set's name (Lw of `network` stored, cached or learned as evaluation does, on
    its whitening pairs under `data_root`), a whitening file, or another index folder (its whitening)."""
    from amldist.datasets import layout

    if value in layout.TRAIN_DATASETS:
        require(data_root is not None,
                f"--whitening {value} learns on that dataset's pairs: give --data-root")
        from amldist.evaluation import DescriptorCache, EvalSettings, load_net, whitening_for

        eval_settings = EvalSettings(Path(data_root), (), settings.image_size, tuple(settings.scales), value,
                                     device=settings.device, batch_size=settings.batch_size,
                                     workers=settings.workers)
        teacher = load_net("teacher", network, settings.device)
        lw = whitening_for(teacher, value, DescriptorCache(eval_settings))
        return IndexWhitening(lw, f"Lw learned on {value} at {settings.image_size} px, scales "
                                  f"{[round(s, 4) for s in settings.scales]}")
    path = Path(value).expanduser()
    if path.is_dir():
        other = GalleryIndex.open(path)
        require(other.whitening is not None, f"--whitening {path}: that index applies no whitening")
        return IndexWhitening(other.whitening, other.manifest["whitening"]["source"])
    require(path.is_file(), f"--whitening {value}: neither a training set "
                            f"({', '.join(layout.TRAIN_DATASETS)}), a whitening file nor an index folder")
    return IndexWhitening(load_whitening(path), str(path.resolve()))
