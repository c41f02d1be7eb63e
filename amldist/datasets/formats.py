"""Typed readers and writers for the dataset files cirtorch and budnikm/aml use.

- `retrieval-SfM-120k.pkl`: {'train': split, 'val': split}, split = {'cids', 'cluster', 'qidxs', 'pidxs', ...}
- `retrieval-SfM-120k-whiten.pkl`: {'cids', 'qidxs', 'pidxs'}
- `gnd_<name>.pkl`: {'imlist', 'qimlist', 'gnd'}, gnd[i] = {'bbx', 'easy', 'hard', 'junk'} (revisited)
  or {'bbx', 'ok', 'junk'} (old Oxford/Paris protocol)

Readers go through the restricted unpickler and validate shape and index ranges, raising UserError
with the file name on any problem. Writers produce plain lists/ints/floats like the public files.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amldist.atomic import atomic_write_bytes
from amldist.datasets import layout
from amldist.errors import UserError
from amldist.safe_pickle import safe_load

REVISITED_KEYS = ("easy", "hard", "junk")
OLD_KEYS = ("ok", "junk")


@dataclass(frozen=True)
class SfmSplit:
    """One split (train or val) of an SfM-120k db: images, their 3D-model cluster, query/positive pairs."""

    cids: list[str]
    cluster: np.ndarray  # (N,) int64, cluster of each image
    qidxs: np.ndarray  # (M,) int64, query image of each pair
    pidxs: np.ndarray  # (M,) int64, positive image of each pair
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, kept verbatim (e.g. 'bbxs')

    def __len__(self) -> int:
        return len(self.cids)


@dataclass(frozen=True)
class WhitenDb:
    """The whitening db: images and matching pairs used to learn Lw."""

    cids: list[str]
    qidxs: np.ndarray  # (M,) int64
    pidxs: np.ndarray  # (M,) int64


@dataclass(frozen=True)
class GroundTruth:
    """A test set's gnd file: database names, query names, and per-query bbx + relevance lists."""

    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]  # bbx: (4,) float [x1, y1, x2, y2]; easy/hard/junk or ok/junk: int arrays

    @property
    def protocol(self) -> str:
        """'revisited' (easy/hard/junk) or 'old' (ok/junk)."""
        return "revisited" if self.gnd and "easy" in self.gnd[0] else "old"


def _as_array(values: Any, dtype: type, what: str, source: Path) -> np.ndarray:
    """A flat numpy array of `values`, or a UserError naming the field when they are not numbers."""
    try:
        return np.asarray(values, dtype=dtype).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{source}: {what} is not a flat list of numbers") from None


def _as_list(values: Any, what: str, source: Path) -> list:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise UserError(f"{source}: {what} is a {type(values).__name__}, expected a list")
    return list(values)


def _index_array(values: Any, upper: int, what: str, source: Path) -> np.ndarray:
    array = _as_array(values, np.int64, what, source)
    if array.size and (array.min() < 0 or array.max() >= upper):
        raise UserError(f"{source}: {what} holds an index outside [0, {upper})")
    return array


def _require_keys(obj: Any, keys: tuple[str, ...], what: str, source: Path) -> None:
    if not isinstance(obj, dict):
        raise UserError(f"{source}: {what} is a {type(obj).__name__}, expected a dict")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"{source}: {what} lacks key(s) {', '.join(missing)}")


def _parse_split(raw: Any, name: str, source: Path) -> SfmSplit:
    _require_keys(raw, ("cids", "cluster", "qidxs", "pidxs"), f"split {name!r}", source)
    cids = [str(c) for c in _as_list(raw["cids"], f"{name}.cids", source)]
    cluster = _as_array(raw["cluster"], np.int64, f"{name}.cluster", source)
    if len(cluster) != len(cids):
        raise UserError(f"{source}: split {name!r} has {len(cids)} cids but {len(cluster)} cluster ids")
    qidxs = _index_array(raw["qidxs"], len(cids), f"{name}.qidxs", source)
    pidxs = _index_array(raw["pidxs"], len(cids), f"{name}.pidxs", source)
    if len(qidxs) != len(pidxs):
        raise UserError(f"{source}: split {name!r} has {len(qidxs)} qidxs but {len(pidxs)} pidxs")
    extra = {k: v for k, v in raw.items() if k not in ("cids", "cluster", "qidxs", "pidxs")}
    return SfmSplit(cids, cluster, qidxs, pidxs, extra)


def read_sfm_db(path: str | Path) -> dict[str, SfmSplit]:
    """Read `retrieval-SfM-120k.pkl` into {'train': SfmSplit, 'val': SfmSplit}."""
    path = Path(path)
    raw = safe_load(path)
    _require_keys(raw, ("train", "val"), "db", path)
    return {name: _parse_split(raw[name], name, path) for name in ("train", "val")}


def write_sfm_db(path: str | Path, splits: dict[str, SfmSplit]) -> None:
    raw = {}
    for name, split in splits.items():
        raw[name] = {"cids": list(split.cids), "cluster": [int(c) for c in split.cluster],
                     "qidxs": [int(i) for i in split.qidxs], "pidxs": [int(i) for i in split.pidxs],
                     **split.extra}
    atomic_write_bytes(path, pickle.dumps(raw, protocol=4))


def read_whiten_db(path: str | Path) -> WhitenDb:
    path = Path(path)
    raw = safe_load(path)
    _require_keys(raw, ("cids", "qidxs", "pidxs"), "whitening db", path)
    cids = [str(c) for c in _as_list(raw["cids"], "cids", path)]
    qidxs = _index_array(raw["qidxs"], len(cids), "qidxs", path)
    pidxs = _index_array(raw["pidxs"], len(cids), "pidxs", path)
    if len(qidxs) != len(pidxs):
        raise UserError(f"{path}: {len(qidxs)} qidxs but {len(pidxs)} pidxs")
    return WhitenDb(cids, qidxs, pidxs)


def write_whiten_db(path: str | Path, db: WhitenDb) -> None:
    raw = {"cids": list(db.cids), "qidxs": [int(i) for i in db.qidxs], "pidxs": [int(i) for i in db.pidxs]}
    atomic_write_bytes(path, pickle.dumps(raw, protocol=4))


def _parse_query(raw: Any, i: int, num_db: int, source: Path) -> dict[str, Any]:
    keys = REVISITED_KEYS if isinstance(raw, dict) and "easy" in raw else OLD_KEYS
    _require_keys(raw, ("bbx",) + keys[:-1], f"gnd[{i}]", source)
    query = {"bbx": _as_array(raw["bbx"], np.float64, f"gnd[{i}]['bbx']", source)}
    if query["bbx"].size != 4:
        raise UserError(f"{source}: gnd[{i}]['bbx'] must hold 4 numbers")
    for key in keys:
        query[key] = _index_array(raw.get(key, []), num_db, f"gnd[{i}]['{key}']", source)
    return query


def read_gnd(path: str | Path) -> GroundTruth:
    path = Path(path)
    raw = safe_load(path)
    _require_keys(raw, ("imlist", "qimlist", "gnd"), "gnd file", path)
    imlist = [str(x) for x in _as_list(raw["imlist"], "imlist", path)]
    qimlist = [str(x) for x in _as_list(raw["qimlist"], "qimlist", path)]
    queries = _as_list(raw["gnd"], "gnd", path)
    if len(queries) != len(qimlist):
        raise UserError(f"{path}: {len(qimlist)} queries but {len(queries)} gnd entries")
    gnd = [_parse_query(q, i, len(imlist), path) for i, q in enumerate(queries)]
    return GroundTruth(imlist, qimlist, gnd)


def write_gnd(path: str | Path, truth: GroundTruth) -> None:
    gnd = [{k: ([float(x) for x in v] if k == "bbx" else [int(x) for x in v]) for k, v in q.items()}
           for q in truth.gnd]
    raw = {"imlist": list(truth.imlist), "qimlist": list(truth.qimlist), "gnd": gnd}
    atomic_write_bytes(path, pickle.dumps(raw, protocol=4))


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset split, as sharding and extraction need it."""

    index: int  # position in the split's own list (cids, imlist, qimlist, revisitop1m.txt)
    path: Path
    name: str  # cid, or image name without extension
    cluster: int = -1  # SfM 3D-model id; -1 where the dataset has none
    bbx: tuple[float, float, float, float] | None = None  # query crop box (original pixels)


def list_images(root: str | Path, dataset: str) -> dict[str, list[ImageRecord]]:
    """Every split of `dataset` under `root` as ImageRecords, in dataset-index order."""
    kind = layout.dataset_kind(dataset)
    if kind == "train":
        return _train_images(root, dataset)
    if kind == "test":
        return _test_images(root, dataset)
    return {"db": _distractor_images(root, dataset)}


def _train_images(root: str | Path, dataset: str) -> dict[str, list[ImageRecord]]:
    ims = layout.train_images_dir(root, dataset)
    db_path = layout.train_db_path(root, dataset)
    if layout.is_imported_name(dataset) and not db_path.is_file():
        raise UserError(f"no training set {dataset!r} under {root}: {db_path} is missing "
                        "(make it with `amldist data import`)")
    splits = read_sfm_db(db_path)
    whiten = read_whiten_db(layout.whiten_db_path(root, dataset))
    out = {name: [ImageRecord(i, layout.cid2filename(cid, ims), cid, int(split.cluster[i]))
                  for i, cid in enumerate(split.cids)]
           for name, split in splits.items()}
    out["whiten"] = [ImageRecord(i, layout.cid2filename(cid, ims), cid) for i, cid in enumerate(whiten.cids)]
    return out


def _test_images(root: str | Path, dataset: str) -> dict[str, list[ImageRecord]]:
    jpg = layout.test_images_dir(root, dataset)
    truth = read_gnd(layout.gnd_path(root, dataset))
    db = [ImageRecord(i, jpg / f"{name}.jpg", name) for i, name in enumerate(truth.imlist)]
    queries = [ImageRecord(i, jpg / f"{name}.jpg", name, bbx=tuple(float(v) for v in truth.gnd[i]["bbx"]))
               for i, name in enumerate(truth.qimlist)]
    return {"db": db, "query": queries}


def _distractor_images(root: str | Path, dataset: str) -> list[ImageRecord]:
    listing = layout.distractor_list_path(root, dataset)
    if not listing.is_file():
        raise UserError(f"no image list for {dataset}: {listing}")
    jpg = layout.distractor_images_dir(root, dataset)
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    # List entries already carry their extension (ext = '' in revisitop's configdataset).
    return [ImageRecord(i, jpg / name, name) for i, name in enumerate(names)]
