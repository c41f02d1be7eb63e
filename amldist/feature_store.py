"""Teacher feature store: the fixed teacher descriptors of every image of a training split (no Ray).

Asymmetric training never runs the teacher: anchors come from the student, positives and negatives
from these stored vectors (REFERENCE §7.43/45). A store is a folder holding

- `features-<sha12>.npy`: (N, D) float16, row i = image i of the split (its dataset index), memory-mappable;
- `manifest.json`: what produced it (network file and its sha256, architecture, image size, scales,
  dataset, split), count, dim, and the array's sha256.

The manifest is the commit point: the array is written under a name derived from its content, then the
manifest is replaced atomically, then older arrays are removed. A crash at any moment leaves either the
old store or the new one readable, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amldist.atomic import atomic_path, atomic_write_json
from amldist.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "amldist-teacher-features"
VERSION = 1
STORE_DTYPE = np.float16
# Manifest fields a caller may require to match (a different teacher or resolution is a different store).
MATCH_FIELDS = ("network_sha256", "architecture", "image_size", "scales", "dataset", "split", "count", "dim")
# What a store folder may hold: its manifest, arrays, and the temporary files of an interrupted write.
_STORE_ENTRY = re.compile(r"manifest\.json|features-[0-9a-f]{12}\.npy|features\.npy\.pending"
                          r"|\.(manifest\.json|features\.npy\.pending)\..+\.tmp")


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so large arrays and checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_feature_store(directory: str | Path, features: np.ndarray, *, network: str, network_sha256: str,
                        architecture: str, image_size: int, scales: list[float], dataset: str,
                        split: str) -> FeatureStore:
    """Write `features` (N, D), row i = image i of the split, as a float16 store; return it opened."""
    features = np.asarray(features)
    if features.ndim != 2 or min(features.shape) == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {features.shape}")
    with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
        half = features.astype(STORE_DTYPE)
    if not np.isfinite(half).all():
        raise ValueError("features hold values that are not finite in float16 (NaN, inf or beyond 65504)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    array_file, checksum = _write_array(directory, half)
    manifest = {
        "format": FORMAT, "version": VERSION, "array_file": array_file, "dtype": "float16",
        "count": int(half.shape[0]), "dim": int(half.shape[1]),
        "array_sha256": checksum,
        "network": str(network), "network_sha256": network_sha256, "architecture": architecture,
        "image_size": int(image_size), "scales": [float(s) for s in scales],
        "dataset": dataset, "split": split,
    }
    atomic_write_json(directory / MANIFEST, manifest)
    _remove_stale_arrays(directory, keep=array_file)
    log.info("wrote %d teacher features of dim %d to %s", manifest["count"], manifest["dim"], directory)
    return FeatureStore.open(directory, verify=False)


def not_a_store(directory: str | Path) -> str | None:
    """Why writing a store into `directory` would destroy something else; None when it may be written.

    A missing or empty folder may be written, and so may a store, even a damaged one (an unreadable
    manifest beside store files only): writes are atomic. A folder holding any other file, or another
    program's manifest.json (a shard folder), may not.
    """
    directory = Path(directory)
    if not directory.exists():
        return None
    if not directory.is_dir():
        return "it exists and is not a folder"
    others = sorted(p.name for p in directory.iterdir() if not _STORE_ENTRY.fullmatch(p.name))
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        return f"it holds {others[0]!r}{more}, which is not part of a teacher feature store"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):  # missing, or a damaged store of ours: rewritten atomically
        return None
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        return None
    return f"its {MANIFEST} is not a teacher feature manifest"


def _write_array(directory: Path, half: np.ndarray) -> tuple[str, str]:
    """Save the array atomically under a content-derived name (so it never overwrites a live one).

    Returns (file name, sha256 of the file)."""
    pending = directory / "features.npy.pending"
    with atomic_path(pending) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, half)
        checksum = file_sha256(tmp)
    name = f"features-{checksum[:12]}.npy"
    pending.replace(directory / name)
    return name, checksum


def _remove_stale_arrays(directory: Path, keep: str) -> None:
    for path in directory.glob("features-*.npy"):
        if path.name != keep:
            path.unlink(missing_ok=True)


class ChecksumMismatch(UserError):
    """The store's array does not hold what its manifest's checksum says (a damaged file)."""


class FeatureStore:
    """An opened store: `features` is a read-only memory map (N, D) float16; rows are read on demand."""

    def __init__(self, directory: Path, manifest: dict[str, Any], features: np.ndarray):
        self.directory = directory
        self.manifest = manifest
        self.features = features  # (N, D) float16, memory-mapped

    @classmethod
    def open(cls, directory: str | Path, expected: Mapping[str, Any] | None = None,
             verify: bool = True) -> FeatureStore:
        """Open and validate a store; `expected` maps manifest fields (MATCH_FIELDS) to required values.

        verify=True also recomputes the array's sha256 (reads the whole file once).
        """
        directory = Path(directory)
        manifest = _read_manifest(directory)
        path = directory / manifest["array_file"]
        if not path.is_file():
            raise UserError(f"teacher feature store {directory} lacks its array {manifest['array_file']}")
        if verify and file_sha256(path) != manifest["array_sha256"]:
            raise ChecksumMismatch(f"teacher features in {path} do not match the checksum in the manifest "
                                   "(corrupt file)")
        features = _load_array(path, manifest)
        store = cls(directory, manifest, features)
        if expected:
            store.require_match(expected)
        return store

    def require_match(self, expected: Mapping[str, Any]) -> None:
        """Raise UserError naming the first field whose value differs from what the caller needs."""
        difference = self.mismatch(expected)
        if difference is not None:
            raise UserError(f"teacher features in {self.directory} were computed with {difference}; "
                            f"recompute them with `amldist features`")

    def mismatch(self, expected: Mapping[str, Any]) -> str | None:
        """'FIELD HAVE, not WANT' for the first field that differs from `expected`, else None."""
        for key, want in expected.items():
            if key not in MATCH_FIELDS:
                raise ValueError(f"cannot match on {key!r}; choose from {', '.join(MATCH_FIELDS)}")
            have = self.manifest[key]
            if key == "scales":
                same = len(have) == len(want) and np.allclose(have, [float(s) for s in want])
            else:
                same = have == want
            if not same:
                return f"{key} {have!r}, not {want!r}"
        return None

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32 (len(ids), D); reads only those rows from disk."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"image ids must lie in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        return np.asarray(self.features[ids], dtype=np.float32)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"no teacher feature store in {directory} (missing {MANIFEST}); "
                        f"create one with `amldist features`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    needed = ("format", "version", "array_file", "count", "dim", "array_sha256", *MATCH_FIELDS)
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or any(k not in manifest for k in needed)):
        raise UserError(f"{path} is not an amldist teacher feature manifest")
    if manifest["version"] != VERSION:
        raise UserError(f"{path} has format version {manifest['version']}; "
                        f"this amldist reads version {VERSION}")
    if Path(manifest["array_file"]).name != manifest["array_file"]:
        raise UserError(f"{path} names an array outside its folder: {manifest['array_file']!r}")
    return manifest


def _load_array(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read teacher features {path}: {err}") from None
    want = (manifest["count"], manifest["dim"])
    if features.dtype != STORE_DTYPE or features.shape != want:
        raise UserError(f"teacher features {path} hold {features.dtype} {features.shape}, "
                        f"the manifest says float16 {want}")
    return features
