"""What an import reads: a folder per landmark, or GLDv2's CSV and image tree, listed as compact arrays.

Both sources give one row per listed image: its landmark (the future cluster id) in an int64 array, and
its file path on demand for an array of rows, so the checking pass can walk millions of images in chunks.
GLDv2's ids are kept as uint64 (a 16-hex-digit id is 64 bits): 4.1M rows of train.csv cost 16 bytes each
here, not a Python string and list apiece.
"""

from __future__ import annotations

import csv
import os
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amldist.errors import UserError

GLDV2_ID = re.compile(r"[0-9a-f]{16}")
GLDV2_IDS = re.compile(r"[0-9a-f]*")  # a chunk of ids joined together (its length is checked apart)
CHUNK_ROWS = 1 << 16
GLDV2_PER_IMAGE = ("id", "landmark_id")  # train.csv: id,url,landmark_id (Kaggle 2020: id,landmark_id)
GLDV2_PER_LANDMARK = ("landmark_id", "images")  # train_clean.csv: landmark_id,"id id id ..."
MAX_FIELD_CHARS = 1 << 30


def _hidden(name: str) -> bool:
    return name.startswith(".")


@dataclass
class FolderSource:
    """Images under DIR/<landmark>/... (any depth); the landmark is the first folder below DIR."""

    base: Path
    landmark: np.ndarray  # (N,) int64: index of the image's landmark in landmark_names
    landmark_names: list[str]  # sorted folder names, empty ones included
    relpaths: list[str]  # (N,) image paths relative to base, posix
    empty_landmarks: list[str] = field(default_factory=list)  # folders with no file at all
    loose_files: list[str] = field(default_factory=list)  # files directly in base: no landmark

    kind = "folders"

    def __len__(self) -> int:
        return len(self.relpaths)

    def names(self, indices: np.ndarray) -> list[str]:
        return [self.relpaths[i] for i in indices]

    def paths(self, indices: np.ndarray) -> list[str]:
        return [os.path.join(self.base, self.relpaths[i]) for i in indices]

    def landmark_label(self, cluster: int) -> str:
        return self.landmark_names[cluster]

    def identity(self) -> dict:
        return {"kind": self.kind, "images": str(self.base.resolve())}


def list_folders(images: str | Path) -> FolderSource:
    """Every non-hidden file under each non-hidden sub-folder of `images`, in sorted order."""
    base = Path(images).expanduser()
    if not base.is_dir():
        raise UserError(f"no such image folder: {images}")
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"cannot list {base}: {err.strerror or err}") from None
    names = [e.name for e in entries if e.is_dir() and not _hidden(e.name)]
    loose = [e.name for e in entries if not e.is_dir() and not _hidden(e.name)]
    relpaths: list[str] = []
    codes = array("q")
    empty = []
    for cluster, name in enumerate(names):
        files = _walk_files(base / name)
        if not files:
            empty.append(name)
        relpaths += [f"{name}/{rel}" for rel in files]
        codes.extend([cluster] * len(files))
    return FolderSource(base, np.frombuffer(codes, np.int64), names, relpaths, empty, loose)


def _walk_files(folder: Path) -> list[str]:
    """Non-hidden files below `folder` (symlinked files followed, symlinked folders not), sorted."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        prefix = os.path.relpath(current, folder)
        for name in sorted(files):
            if not _hidden(name):
                found.append(name if prefix == "." else f"{Path(prefix).as_posix()}/{name}")
    return found


@dataclass
class Gldv2Source:
    """GLDv2 rows: image ids and landmark ids from the CSV, images at DIR/a/b/c/<id>.jpg."""

    base: Path
    csv_path: Path
    csv_format: str  # "per-image" or "per-landmark"
    ids: np.ndarray  # (N,) uint64, the 16-hex-digit ids
    landmark: np.ndarray  # (N,) int64, GLDv2's landmark_id (kept as the cluster id)

    kind = "gldv2"

    def __len__(self) -> int:
        return len(self.ids)

    def names(self, indices: np.ndarray) -> list[str]:
        return [f"{v:016x}" for v in self.ids[indices].tolist()]

    def paths(self, indices: np.ndarray) -> list[str]:
        base = str(self.base)
        return [os.path.join(base, h[0], h[1], h[2], f"{h}.jpg") for h in self.names(indices)]

    def landmark_label(self, cluster: int) -> str:
        return str(cluster)

    def identity(self) -> dict:
        return {"kind": self.kind, "csv": str(self.csv_path.resolve()), "images": str(self.base.resolve())}


def list_gldv2(csv_path: str | Path, images: str | Path) -> Gldv2Source:
    csv_path, base = Path(csv_path).expanduser(), Path(images).expanduser()
    if not base.is_dir():
        raise UserError(f"no such image folder: {images}")
    csv_format, ids, landmarks = read_gldv2_csv(csv_path)
    return Gldv2Source(base, csv_path, csv_format, ids, landmarks)


def read_gldv2_csv(path: str | Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(format, ids (N,) uint64, landmark ids (N,) int64) of a GLDv2 train.csv or train_clean.csv, streamed:
    rows are read one at a time and converted a chunk at a time into two growing arrays of machine integers,
    so memory is 16 bytes per image plus one chunk of row texts."""
    path = Path(path)
    ids, landmarks = array("Q"), array("q")
    # A train_clean.csv row holds all ids of a landmark (17 characters each): more than csv's default
    # field limit of 131072 characters for landmarks of over 7,700 images. The limit is process-wide.
    field_limit = csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            columns = [c.strip() for c in next(reader, [])]
            if all(c in columns for c in GLDV2_PER_IMAGE):
                csv_format = "per-image"
                _read_per_image(reader, columns.index("id"), columns.index("landmark_id"), ids, landmarks,
                                path)
            elif tuple(columns[:2]) == GLDV2_PER_LANDMARK:
                csv_format = "per-landmark"
                _read_per_landmark(reader, ids, landmarks, path)
            else:
                raise UserError(f"{path}: header {','.join(columns)!r} is neither GLDv2's id,url,landmark_id "
                                "(train.csv) nor landmark_id,images (train_clean.csv)")
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UserError(f"expected a CSV file, found a folder: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as err:
        raise UserError(f"{path}: not a readable CSV file ({err})") from None
    finally:
        csv.field_size_limit(field_limit)
    return csv_format, np.frombuffer(ids, np.uint64), np.frombuffer(landmarks, np.int64)


class _Rows:
    """Collects (id text, landmark text, line) of up to CHUNK_ROWS rows, then converts them in bulk: one
    regular-expression match and one hex decode for all ids of the chunk, one numpy parse of the landmarks.
    Only a chunk that fails is looked at row by row, to name the first bad line."""

    def __init__(self, path: Path, ids: array, landmarks: array):
        self.path, self.ids, self.landmarks = path, ids, landmarks
        self.id_texts: list[str] = []
        self.landmark_texts: list[str] = []
        self.lines: list[int] = []

    def add(self, image_id: str, landmark: str, line: int) -> None:
        self.id_texts.append(image_id)
        self.landmark_texts.append(landmark)
        self.lines.append(line)
        if len(self.id_texts) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.id_texts:
            return
        joined = "".join(self.id_texts)
        if len(joined) != 16 * len(self.id_texts) or GLDV2_IDS.fullmatch(joined) is None:
            for text, line in zip(self.id_texts, self.lines):
                _image_id(text, self.path, line)
        self.ids.frombytes(np.frombuffer(bytes.fromhex(joined), ">u8").astype(np.uint64).tobytes())
        try:
            values = np.array(self.landmark_texts, dtype=np.int64)
            valid = values.min() >= 0
        except (ValueError, OverflowError):
            valid = False
        if not valid:
            values = np.array([_landmark_id(t, self.path, n)
                               for t, n in zip(self.landmark_texts, self.lines)])
        self.landmarks.frombytes(values.astype(np.int64).tobytes())
        self.id_texts, self.landmark_texts, self.lines = [], [], []


def _read_per_image(reader, id_column: int, landmark_column: int, ids: array, landmarks: array,
                    path: Path) -> None:
    width = max(id_column, landmark_column) + 1
    rows = _Rows(path, ids, landmarks)
    for row in reader:
        if len(row) >= width:
            rows.add(row[id_column], row[landmark_column], reader.line_num)
        elif row:
            raise UserError(f"{path}:{reader.line_num}: expected {width} or more fields, found {len(row)}")
    rows.flush()


def _read_per_landmark(reader, ids: array, landmarks: array, path: Path) -> None:
    rows = _Rows(path, ids, landmarks)
    for row in reader:
        if len(row) >= 2:
            for token in row[1].split():
                rows.add(token, row[0], reader.line_num)
        elif row:
            raise UserError(f"{path}:{reader.line_num}: expected landmark_id,images, "
                            f"found {len(row)} field(s)")
    rows.flush()


def _image_id(text: str, path: Path, line: int) -> int:
    if GLDV2_ID.fullmatch(text) is None:
        raise UserError(f"{path}:{line}: image id {text[:40]!r} is not 16 lower-case hex digits")
    return int(text, 16)


def _landmark_id(text: str, path: Path, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{path}:{line}: landmark_id {text[:40]!r} is not an integer") from None
    if not 0 <= value < 2**62:
        raise UserError(f"{path}:{line}: landmark_id {value} is out of range")
    return value
