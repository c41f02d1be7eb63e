"""A node-local copy of data held in an object store, filled once and checked against its manifest.

Training reads each image many times, in random order (tuples by dataset index, hard negatives from
the miner), and the teacher store is memory-mapped: both want a local file. So a worker or the miner
given a URI copies the folder into the node's cache on first use and then reads it exactly as a local
one (`ShardReader`'s positioned reads, `FeatureStore`'s memory map). docs/SCALING.md compares this
with streaming whole shards and with ranged reads of single samples.

What is copied and how it is checked comes from the folder's own manifest:
- a shard split: every shard (size and sha256 from the manifest) and the index table (index_sha256);
- a teacher feature store: its array (array_sha256);
- a single file (the split pkl): compared by size.
A finished copy leaves a marker holding the sha256 of the manifest it was checked against. Later
uses re-read only the remote manifest: the same manifest means the same files (the writers never
change a file a manifest names), a different one refills what changed. Workers on one node share
the copy; a file lock makes the first one fill it while the others wait.

The cache lives in `$AMLDIST_CACHE`, else `~/.cache/amldist`; one folder per URI.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from amldist import storage
from amldist.atomic import atomic_path, atomic_write_json
from amldist.errors import UserError

log = logging.getLogger(__name__)

CACHE_VARIABLE = "AMLDIST_CACHE"
MARKER = ".amldist-cache.json"
MANIFEST = "manifest.json"
STORE_FORMAT = "amldist-teacher-features"  # amldist.feature_store.FORMAT, not imported: no numpy needed here
DEFAULT_WORKERS = 8  # parallel downloads: one stream is latency-bound, several fill the link


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "amldist").expanduser()


def entry_dir(location: str, root: Path | None = None) -> Path:
    """The cache folder of one URI: readable name + a digest (distinct URIs never share a folder)."""
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    tail = "-".join(p for p in location.split("://", 1)[-1].rstrip("/").split("/")[-2:] if p)
    return (root or cache_root()) / f"{tail[:60]}-{digest}"


@dataclasses.dataclass(frozen=True)
class Expected:
    """One file a manifest names: its name in the folder, its bytes (None: unknown) and sha256."""
    name: str
    size: int | None
    sha256: str | None


def expected_files(manifest: dict[str, Any], location: str) -> list[Expected]:
    """The files a shard-split or feature-store manifest names, with what each must be."""
    if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
        shards = [Expected(s["name"], int(s["bytes"]), s.get("sha256")) for s in manifest["shards"]]
        index = Expected(manifest.get("index_file", "index.npy"), None, manifest.get("index_sha256"))
        return [*shards, index]
    if isinstance(manifest, dict) and manifest.get("format") == STORE_FORMAT:
        return [Expected(manifest["array_file"], None, manifest["array_sha256"])]
    raise UserError(f"{location} holds neither a shard split nor a teacher feature store manifest")


def cached_copy(location: str | os.PathLike, root: Path | None = None, workers: int = DEFAULT_WORKERS) -> str:
    """A local path holding the data of `location`: itself when local, else the node's checked copy."""
    location = str(location)
    if not storage.is_uri(location):
        return location
    target = entry_dir(location, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if storage.is_file(location):
            return str(_fill_file(location, target))
        return str(_fill_folder(location, target, workers))


@contextmanager
def _locked(path: Path):
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fill_file(location: str, target: Path) -> Path:
    local = target / Path(location.rstrip("/")).name
    size = storage.file_size(location)
    if not (local.is_file() and local.stat().st_size == size):
        _download(location, local, Expected(local.name, size, None))
    return local


def _fill_folder(location: str, target: Path, workers: int) -> Path:
    try:
        manifest_bytes = storage.read_bytes(storage.join(location, MANIFEST))
    except FileNotFoundError:
        raise UserError(f"no {MANIFEST} in {location}") from None
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as err:
        raise UserError(f"unreadable {MANIFEST} in {location}: {err}") from None
    checksum = hashlib.sha256(manifest_bytes).hexdigest()
    files = expected_files(manifest, location)
    if _marker_matches(target, checksum, files):
        return target
    started = time.perf_counter()
    (target / MARKER).unlink(missing_ok=True)
    missing = [f for f in files if not _already_there(target / f.name, f)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = list(pool.map(lambda f: _download(storage.join(location, f.name), target / f.name, f),
                              missing))
    _remove_strays(target, {f.name for f in files})
    with atomic_path(target / MANIFEST) as tmp:  # the manifest that was checked, beside what it names
        tmp.write_bytes(manifest_bytes)
    atomic_write_json(target / MARKER, {"location": location, "manifest_sha256": checksum,
                                        "files": {f.name: (target / f.name).stat().st_size for f in files}})
    log.info("cached %s in %s: %d files, %.1f MB fetched in %.1f s", location, target, len(missing),
             sum(sizes) / 1e6, time.perf_counter() - started)
    return target


def _marker_matches(target: Path, checksum: str, files: list[Expected]) -> bool:
    """A complete copy of this very manifest (files still there with the sizes they had)."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("manifest_sha256") != checksum:
        return False
    sizes = marker.get("files", {})
    return all((target / f.name).is_file() and (target / f.name).stat().st_size == sizes.get(f.name)
               for f in files)


def _already_there(path: Path, expected: Expected) -> bool:
    """A file of an earlier (interrupted or older) fill that is still right: kept, not fetched again."""
    if not path.is_file() or (expected.size is not None and path.stat().st_size != expected.size):
        return False
    return expected.sha256 is None or _sha256(path) == expected.sha256


def _download(source: str, local: Path, expected: Expected) -> int:
    """Copy one file atomically, hashing it on the way; UserError when it is not what the manifest says."""
    digest = hashlib.sha256()
    copied = 0
    with atomic_path(local) as tmp, storage.open_stream(source) as reader, open(tmp, "wb") as writer:
        while block := reader.read(storage.COPY_CHUNK):
            digest.update(block)
            writer.write(block)
            copied += len(block)
        writer.flush()
        if expected.size is not None and copied != expected.size:
            raise UserError(f"{source} has {copied} bytes, its manifest says {expected.size}; "
                            "upload the folder again")
        if expected.sha256 is not None and digest.hexdigest() != expected.sha256:
            raise UserError(f"{source} does not match the sha256 in its manifest; upload the folder again")
    return copied


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(storage.COPY_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _remove_strays(target: Path, keep: set[str]) -> None:
    """Files of an older manifest that the new one no longer names (a rewritten split or store)."""
    for path in target.iterdir():
        if path.name not in keep and path.name not in (MANIFEST, MARKER):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def localize(paths, fields: tuple[str, ...] | None = None):
    """A copy of a dataclass of locations (e.g. `TrainingPaths`) with each URI field replaced by the
    node's cached copy; local fields are left as they are. `fields`: only these (default all)."""
    names = fields or tuple(f.name for f in dataclasses.fields(paths))
    changes = {name: cached_copy(getattr(paths, name)) for name in names
               if storage.is_uri(getattr(paths, name))}
    return dataclasses.replace(paths, **changes) if changes else paths
