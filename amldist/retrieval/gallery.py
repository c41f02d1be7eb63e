"""The images a gallery index holds: an image folder or a shard split, listed in a fixed order.

A folder gallery lists every image file under its root (recursively, hidden entries skipped) by relative
POSIX path, sorted; each entry's stamp is its size and modification time, so an incremental update sees
replaced files. A shard gallery (`amldist data shards` output, e.g. a test set's `db` split) lists its
samples in dataset-index order, named by their meta's name; its stamp is the dataset index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from amldist.errors import UserError, require
from amldist.extract import FileSource, ImageSource, ShardSource, SubsetSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
KINDS = ("images", "shards")


@dataclass(frozen=True)
class GalleryEntry:
    name: str    # relative path (folder) or sample name (shards): what a search result shows
    stamp: str   # changes when the image does: "size:mtime_ns" (folder), the dataset index (shards)


@dataclass
class Gallery:
    kind: str                    # images or shards
    root: Path                   # absolute
    entries: list[GalleryEntry]
    source: ImageSource          # row i = entries[i]

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, positions: Sequence[int]) -> ImageSource:
        return SubsetSource(self.source, positions)

    def load(self, position: int) -> Image.Image:
        return self.source.load(position)


def image_files(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under `root`, sorted (hidden files and folders skipped)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        base = Path(folder).relative_to(root)
        found += [(base / f).as_posix() for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def folder_gallery(root: str | Path) -> Gallery:
    root = Path(root).expanduser().resolve()
    require(root.is_dir(), f"--images {root} is not a folder")
    names = image_files(root)
    require(len(names) > 0, f"--images {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    entries = []
    for name in names:
        info = (root / name).stat()
        entries.append(GalleryEntry(name, f"{info.st_size}:{info.st_mtime_ns}"))
    return Gallery("images", root, entries, FileSource([root / name for name in names]))


def shard_gallery(split_dir: str | Path) -> Gallery:
    split_dir = Path(split_dir).expanduser().resolve()
    require((split_dir / "manifest.json").is_file(),
            f"--shards {split_dir} holds no shard manifest (write one with `amldist data shards`)")
    source = ShardSource(split_dir)
    require(len(source) > 0, f"--shards {split_dir} holds no images")
    entries = []
    for index in source.indices:
        meta = source.reader.meta(int(index))
        entries.append(GalleryEntry(str(meta.get("name") or meta.get("key") or index), str(int(index))))
    return Gallery("shards", split_dir, entries, source)


def open_gallery(kind: str, root: str | Path) -> Gallery:
    if kind == "images":
        return folder_gallery(root)
    if kind == "shards":
        return shard_gallery(root)
    raise UserError(f"unknown gallery kind {kind!r}; an index names one of {', '.join(KINDS)}")
