"""The files an import writes beside the images, and the rules for writing over an earlier import.

ROOT/train/NAME/ holds, besides ims/ and the two pickles:
- NAME-import.json: the importer's record (source, options, counts, `complete`), written first with
  complete=false and rewritten last; a folder with this record is an import and may be redone;
- NAME-images.tsv: one line per kept image: cid, split, cluster, landmark, source (path or GLDv2 id);
- NAME-skipped.tsv: one line per listed file that was left out: source, landmark, reason, detail.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from amldist.atomic import atomic_path, atomic_write_json, ensure_writable_dir, is_temporary
from amldist.datasets import layout
from amldist.errors import UserError

IMPORTER = "amldist data import"
RECORD_VERSION = 1


def record_path(root: Path, name: str) -> Path:
    return layout.train_dir(root, name) / f"{name}-import.json"


def images_list_path(root: Path, name: str) -> Path:
    return layout.train_dir(root, name) / f"{name}-images.tsv"


def skipped_list_path(root: Path, name: str) -> Path:
    return layout.train_dir(root, name) / f"{name}-skipped.tsv"


def check_name(name: str) -> str:
    """A name the layout files as a training set with its own ims/ and pickles."""
    if name in layout.SHARES_DB_OF or (name in layout.ALL_DATASETS and name not in layout.TRAIN_DATASETS):
        raise UserError(f"--name {name} is taken by a public dataset of another kind or layout; "
                        "choose another")
    if layout.IMPORTED_NAME.fullmatch(name) is None:
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, not starting "
                        "with '.', '_' or '-')")
    return name


def prepare_target(root: Path, name: str, identity: dict, overwrite: bool) -> bool:
    """Refuse to write over anything but an import of the same source and options (or, with `overwrite`,
    any earlier import); create the folder. Returns True when an earlier import is being redone."""
    folder = layout.train_dir(root, name)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder")
    record = record_path(root, name)
    if not record.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(f"{folder} holds files that `amldist data import` did not write "
                            f"(no {record.name}); choose another --name or --root")
        ensure_writable_dir(folder, "dataset folder")
        return False
    try:
        earlier = json.loads(record.read_text())
        same = {key: earlier.get(key) for key in identity} == identity
    except (OSError, ValueError, AttributeError):
        earlier, same = {}, False
    if not same and not overwrite:
        source = earlier.get("source", {}) if isinstance(earlier, dict) else {}
        raise UserError(f"{folder} holds an import of "
                        f"{source.get('csv') or source.get('images') or 'another source'} "
                        "with other settings; pass --overwrite to replace it, or choose another --name")
    ensure_writable_dir(folder, "dataset folder")
    return True


def write_record(root: Path, name: str, record: dict) -> None:
    atomic_write_json(record_path(root, name), record)


def write_tsv(path: Path, header: list[str], rows: Iterable[list]) -> None:
    """Tab-separated, quoted where a field holds a tab or newline (csv's rules); atomic."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                        errors="backslashreplace") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def hex_ids(digests: np.ndarray) -> np.ndarray:
    """(N, 16) uint8 digests -> (N,) 32-character lower-case hex bytes ('S32')."""
    table = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
    return np.ascontiguousarray(table[digests]).view("S32").reshape(-1)


def prune_images(ims: Path, kept_cids: np.ndarray) -> int:
    """Remove files under ims/ whose name is not in `kept_cids` (sorted 'S32'), and interrupted temporary
    files; returns how many went. Runs after the pickles name the new set, so the set on disk is never
    missing a file that its pickle lists."""
    removed = 0
    if not ims.is_dir():
        return 0
    for current, _, files in os.walk(ims):
        if not files:
            continue
        names = np.array([f.encode("utf-8", "surrogateescape") for f in files], dtype="S")
        at = np.minimum(np.searchsorted(kept_cids, names), max(len(kept_cids) - 1, 0))
        known = kept_cids[at] == names if len(kept_cids) else np.zeros(len(names), bool)
        for name, keep in zip(files, known):
            if not keep or is_temporary(name):
                os.unlink(os.path.join(current, name))
                removed += 1
    return removed
