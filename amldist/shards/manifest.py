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
    path = Path(split_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no shard manifest in {split_dir} (write shards with `amldist data shards`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"unreadable shard manifest {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a version-{FORMAT_VERSION} shard manifest; rewrite the shards")
    return manifest


def find_split_dirs(path: str | Path) -> list[Path]:
    """`path` itself when it holds a manifest, else its sub-folders that do (a dataset's shard folder)."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return [path]
    found = sorted(p for p in path.glob(f"*/{MANIFEST_NAME}")) if path.is_dir() else []
    if not found:
        raise UserError(f"no shard manifest in {path} or its sub-folders")
    return [p.parent for p in found]
