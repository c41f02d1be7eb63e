"""Read shards: by dataset index (one positioned read per member) or as a WebDataset stream."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import random
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from amldist import storage
from amldist.errors import UserError
from amldist.shards import manifest as mf

logger = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 1000


class CorruptSampleError(UserError):
    """A stored sample that cannot be read or decoded; rewriting the shards repairs it."""


class ShardReader:
    """Random access to one split folder of shards by dataset index.

    Cheap to pickle (only the folder and the manifest travel); each process loads the index table
    (memory-mapped) and opens the shard files on first use, so it can be handed to DataLoader and
    Ray workers. Reads use os.pread, which needs no shared file position. Given an object-store URI
    (`amldist.storage`), each member is one ranged read of the stored shard instead.
    """

    def __init__(self, split_dir: str | Path):
        self.remote = storage.is_uri(split_dir)
        self.split_dir = str(split_dir).rstrip("/") if self.remote else Path(split_dir)
        self.manifest = mf.read_manifest(self.split_dir)
        self.num_corrupt = 0
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._table: np.ndarray | None = None  # (N, len(INDEX_COLUMNS)) int64, rows sorted by index
        self._row_of: np.ndarray | None = None  # (max_index + 1,) row of each dataset index, -1 if absent
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"split_dir": self.split_dir, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.split_dir, self.manifest = state["split_dir"], state["manifest"]
        self.remote = storage.is_uri(self.split_dir)
        self.num_corrupt = 0
        self._reset_process_state()

    def __repr__(self) -> str:
        return f"ShardReader({str(self.split_dir)!r}, samples={len(self)})"

    @property
    def table(self) -> np.ndarray:
        """(N, 10) int64 index table, columns as in manifest INDEX_COLUMNS."""
        if self._pid != os.getpid():
            self._reset_process_state()  # forked: file descriptors belong to the parent
        if self._table is None:
            self._table = self._load_table()
        return self._table

    def _load_table(self) -> np.ndarray:
        path = storage.join(self.split_dir, self.manifest.get("index_file", mf.INDEX_NAME))
        try:
            if self.remote:
                table = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
            else:
                table = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"unreadable shard index {path}: {err}") from None
        if (table.dtype.kind not in "iu" or table.ndim != 2 or table.shape[1] != len(mf.INDEX_COLUMNS)
                or len(table) != self.manifest["num_samples"]):
            raise UserError(f"shard index {path} does not match its manifest; rewrite the shards")
        indices = np.asarray(table[:, mf.COLUMN["index"]])
        problem = self._table_problem(table, indices)
        if problem is not None:
            raise UserError(f"damaged shard index in {self.split_dir}: {problem}; rewrite the shards")
        row_of = np.full(int(indices.max()) + 1 if len(indices) else 0, -1, dtype=np.int64)
        row_of[indices] = np.arange(len(indices))
        self._row_of = row_of
        return table

    def _table_problem(self, table: np.ndarray, indices: np.ndarray) -> str | None:
        """Bounds that keep the lookups below in range (and the row lookup array the dataset's size)."""
        if not len(table):
            return None
        if table.min() < 0:
            return "it holds negative values"
        if indices.max() >= self.manifest["num_images"] or np.any(np.diff(indices) <= 0):
            return f"its dataset indices are not ascending below num_images={self.manifest['num_images']}"
        if table[:, mf.COLUMN["shard"]].max() >= len(self.manifest["shards"]):
            return f"it names a shard beyond the manifest's {len(self.manifest['shards'])}"
        return None

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def indices(self) -> np.ndarray:
        """(N,) int64 dataset indices present, ascending."""
        return np.array(self.table[:, mf.COLUMN["index"]])

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) int64 stored (width, height), rows aligned with `indices` (for aspect-ratio batching)."""
        return np.array(self.table[:, [mf.COLUMN["width"], mf.COLUMN["height"]]])

    @property
    def original_sizes(self) -> np.ndarray:
        """(N, 2) int64 original (width, height), rows aligned with `indices`."""
        return np.array(self.table[:, [mf.COLUMN["original_width"], mf.COLUMN["original_height"]]])

    def __contains__(self, index: object) -> bool:
        try:
            self._row(index)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True

    def _row(self, index: int) -> np.ndarray:
        table = self.table
        row_of = self._row_of
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(row_of) or row_of[index] < 0:
            raise KeyError(f"sample {index!r} is not in {self.split_dir}")
        return table[row_of[index]]

    def _fd(self, shard: int) -> Any:
        """The open shard: a file descriptor, or a store's random-access file (see _pread)."""
        with self._lock:
            if shard not in self._fds:
                path = storage.join(self.split_dir, self.manifest["shards"][shard]["name"])
                self._fds[shard] = storage.open_ranged(path) if self.remote else os.open(path, os.O_RDONLY)
            return self._fds[shard]

    def _pread(self, shard: int, size: int, offset: int) -> bytes:
        handle = self._fd(shard)
        return handle.read_at(size, offset) if self.remote else os.pread(handle, size, offset)

    def _read_member(self, index: int, member: str) -> bytes:
        row = self._row(index)
        offset, size = int(row[mf.COLUMN[f"{member}_offset"]]), int(row[mf.COLUMN[f"{member}_size"]])
        try:
            data = self._pread(int(row[mf.COLUMN["shard"]]), size, offset)
        except OSError as err:
            raise self._corrupt(index, member, err) from None
        if len(data) != size:
            raise self._corrupt(index, member, EOFError(f"read {len(data)} of {size} bytes"))
        return data

    def _corrupt(self, index: int, member: str, err: BaseException) -> CorruptSampleError:
        """Count and log a corrupt member; returns the error for the caller to raise."""
        self.num_corrupt += 1
        logger.warning("corrupt sample %d (%s) in %s: %s", index, member, self.split_dir, err)
        return CorruptSampleError(f"sample {index} in {self.split_dir} is corrupt ({member}: {err}); "
                                  "rerun `amldist data shards` to rewrite it")

    def read_bytes(self, index: int) -> bytes:
        """The stored JPEG bytes of a dataset index (KeyError when absent)."""
        return self._read_member(index, "jpg")

    def meta(self, index: int) -> dict[str, Any]:
        """The sample's json member: index, name (cid), cluster, split, sizes, bbx for queries."""
        data = self._read_member(index, "json")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError) as err:
            raise self._corrupt(index, "json", err) from None

    def read_image(self, index: int) -> Image.Image:
        """The stored image as an RGB PIL image; CorruptSampleError when it does not decode."""
        data = self.read_bytes(index)
        try:
            return decode_jpeg(data)
        except Exception as err:  # noqa: BLE001 -- PIL raises many types for bad data; all mean corrupt
            raise self._corrupt(index, "jpg", err) from None

    def close(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}  # getattr: __init__ may have failed early
        if getattr(self, "_pid", None) == os.getpid():  # a forked copy must not close the parent's files
            for fd in fds.values():
                if isinstance(fd, int):
                    os.close(fd)
                else:
                    fd.close()

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


def decode_jpeg(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img.copy()


def load_tensor(reader: ShardReader, index: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The normalised training tensor of a dataset index: (3, H, W) float32, (x / 255 - mean) / std."""
    image = reader.read_image(index)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3) uint8
    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))  # (3,)
    shift = torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)  # (3,)
    # (x / 255 - mean) / std = x * scale - shift, computed channel-last then made (3, H, W).
    return (pixels.to(torch.float32).mul_(scale).sub_(shift)).permute(2, 0, 1).contiguous()


class CorruptCounter:
    """WebDataset handler: log and count each corrupt sample or shard, then carry on."""

    def __init__(self, where: str):
        self.where = where
        self.count = 0

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        logger.warning("skipping a corrupt sample in %s (%d so far): %s", self.where, self.count, exn)
        return True


class ShardShuffle:
    """Shuffle the shard list with seed + epoch: every rank draws the same permutation before
    splitting by node, so ranks still read disjoint shards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        shards = list(src)
        random.Random(self.seed).shuffle(shards)
        yield from shards


def _sample_tuple(sample: dict[str, Any], decode: bool):
    meta = json.loads(sample["json"])
    image = decode_jpeg(sample["jpg"]) if decode else sample["jpg"]
    return int(meta["index"]), image, meta


def _open_store_shards(src: Iterable[dict[str, Any]], handler) -> Iterable[dict[str, Any]]:
    """WebDataset's url_opener for object-store URIs (its own opener knows only pipes, http and gsutil)."""
    for sample in src:
        try:
            yield {**sample, "stream": storage.open_stream(sample["url"])}
        except OSError as err:
            if not handler(err):
                break


def _store_tarfile_to_samples(handler):
    """wds.tarfile_to_samples with shards opened by `amldist.storage` (same expansion and grouping)."""
    from webdataset import tariterators

    def stage(src):
        streams = _open_store_shards(src, handler)
        files = tariterators.tar_file_expander(streams, handler=handler)
        return tariterators.group_by_keys(files, handler=handler)

    return stage


def stream_samples(split_dir: str | Path, *, shuffle: bool | int = False, seed: int = 0, epoch: int = 0,
                   split_by_node: bool = True, split_by_worker: bool = True, decode: bool = True):
    """A WebDataset pipeline yielding (index, PIL RGB image, meta) (JPEG bytes with decode=False).

    shuffle: False, or a sample-buffer size (True means 1000); shards are shuffled too, both with
    seed + epoch, so build one pipeline per epoch. split_by_node splits shards by RANK/WORLD_SIZE
    (or torch.distributed); split_by_worker by DataLoader worker. Corrupt samples are skipped and
    counted in `pipeline.corrupt.count` (per process). `split_dir` may be an object-store URI: each
    shard is then one streamed GET (`amldist.storage`).
    """
    import webdataset as wds  # deferred: it imports torch's data stack, which shard writers do not need

    manifest = mf.read_manifest(split_dir)
    urls = [storage.join(split_dir, shard["name"]) for shard in manifest["shards"] if shard["count"] > 0]
    buffer = DEFAULT_SHUFFLE_BUFFER if shuffle is True else int(shuffle)
    counter = CorruptCounter(str(split_dir))
    stages: list[Any] = [wds.SimpleShardList(urls)]
    if buffer > 0:
        stages.append(ShardShuffle(seed + epoch))
    if split_by_node:
        stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    stages.append(wds.tarfile_to_samples(handler=counter) if not storage.is_uri(split_dir)
                  else _store_tarfile_to_samples(counter))
    if buffer > 0:
        stages.append(wds.shuffle(buffer, initial=min(buffer, 100), seed=seed + epoch))
    stages.append(wds.map(functools.partial(_sample_tuple, decode=decode), handler=counter))
    pipeline = wds.DataPipeline(*stages)
    pipeline.corrupt = counter
    return pipeline
