"""Names, constants and the manifest reader shared by the shard writer and the readers.

A split folder holds `<split>-%06d.tar` shards, one `<split>-%06d.json` record per finished shard
(what the writer verifies on a rerun), `index.npy` (the by-index lookup table) and `manifest.json`,
written last.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from amldist import storage
from amldist.datasets import layout
from amldist.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.npy"
# Columns of index.npy, one row per stored sample, rows sorted by dataset index. Offsets are byte
# positions of the member's data inside its shard, so a sample is one seek + read away.
INDEX_COLUMNS = ("index", "shard", "jpg_offset", "jpg_size", "json_offset", "json_size",
                 "width", "height", "original_width", "original_height")
COLUMN = {name: i for i, name in enumerate(INDEX_COLUMNS)}

DEFAULT_TRAIN_IMAGE_SIZE = 362
DEFAULT_TEST_IMAGE_SIZE = 1024
DEFAULT_SHARD_COUNT = 1000
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
DEFAULT_QUALITY = 95

_SHARD_FILE = re.compile(r"^(?P<split>.+)-(?P<number>\d{6})\.(?:tar|json)$")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def part_name(split: str, number: int) -> str:
    """The record the writer leaves beside a finished shard (entries, checksum, plan fingerprint)."""
    return f"{split}-{number:06d}.json"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def shard_file_number(path: Path, split: str) -> int | None:
    """The shard number of a `<split>-NNNNNN.tar|json` file of this split, else None."""
    match = _SHARD_FILE.match(path.name)
    if match is None or match["split"] != split:
        return None
    return int(match["number"])


def default_image_size(dataset: str) -> int:
    """362 for training sets, 1024 for test sets and distractors (the paper's sizes)."""
    kind = layout.dataset_kind(dataset)
    return DEFAULT_TRAIN_IMAGE_SIZE if kind == "train" else DEFAULT_TEST_IMAGE_SIZE


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(split_dir: str | Path) -> dict[str, Any]:
    """The manifest of one split folder; UserError when it is missing, unreadable or too new."""
    path = storage.join(split_dir, MANIFEST_NAME)  # a local path or an object-store URI
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"no shard manifest in {split_dir} (write shards with `amldist data shards`)"
                        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"unreadable shard manifest {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a version-{FORMAT_VERSION} shard manifest; rewrite the shards")
    problem = manifest_problem(manifest)
    if problem is not None:
        raise UserError(f"damaged shard manifest in {split_dir}: {problem}; rewrite the shards with "
                        f"`amldist data shards`")
    return manifest


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields (readers index with them, so a bad one would crash later)."""
    for key in ("dataset", "split"):
        if not isinstance(manifest.get(key), str):
            return f"{key} is {manifest.get(key)!r}, not a name"
    if not _plain_name(manifest.get("index_file", INDEX_NAME)):
        return f"index_file {manifest.get('index_file')!r} is not a file name in the folder"
    for key in ("image_size", "num_images", "num_samples", "num_skipped", "num_shards", "total_bytes"):
        if not _count(manifest.get(key)):
            return f"{key} is {manifest.get(key)!r}, not a count"
    shards, skipped = manifest.get("shards"), manifest.get("skipped")
    if not isinstance(shards, list) or len(shards) != manifest["num_shards"]:
        return f"shards is not a list of num_shards={manifest['num_shards']} entries"
    if not all(isinstance(s, dict) and _plain_name(s.get("name")) and _count(s.get("count")) for s in shards):
        return "a shards entry lacks a file name or a count"
    if sum(s["count"] for s in shards) != manifest["num_samples"]:
        return (f"the shards hold {sum(s['count'] for s in shards)} samples, "
                f"not num_samples={manifest['num_samples']}")
    if not isinstance(skipped, list) or len(skipped) != manifest["num_skipped"] or not all(
            isinstance(s, dict) and {"index", "name", "reason"} <= s.keys() for s in skipped):
        return f"skipped is not a list of num_skipped={manifest['num_skipped']} entries"
    # Every image is stored or skipped: this bounds the dataset indices the index table may hold.
    if manifest["num_samples"] + manifest["num_skipped"] != manifest["num_images"]:
        return "num_samples + num_skipped differs from num_images"
    return None


def find_split_dirs(path: str | Path) -> list[Path]:
    """`path` itself when it holds a manifest, else its sub-folders that do (a dataset's shard folder)."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return [path]
    found = sorted(p for p in path.glob(f"*/{MANIFEST_NAME}")) if path.is_dir() else []
    if not found:
        raise UserError(f"no shard manifest in {path} or its sub-folders")
    return [p.parent for p in found]
