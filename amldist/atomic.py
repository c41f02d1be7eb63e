"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A crash or a kill at any point leaves either the old file or the new one, never a half-written file
under the final name.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from amldist.errors import UserError


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`, else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


# A full disk, a full quota, a file-size limit (RLIMIT_FSIZE): writing again will fail again.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def disk_full_is_fatal(what: str, advice: str) -> Iterator[None]:
    """A write of `what` that fails for lack of space becomes one UserError line ending with `advice`
    (a retry would fill the disk again); other errors pass. Files written through `atomic_path` keep
    their earlier contents."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        raise UserError(f"cannot write {what}: {err.strerror or err}{where}; {advice}") from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def json_ready(value: Any, digits: int | None = None) -> Any:
    """`value` as standard JSON can hold it: NaN and infinities (e.g. a mAP with no query to score)
    become null, numpy scalars plain numbers, floats rounded to `digits` when given; dicts, lists and
    tuples are walked."""
    if isinstance(value, dict):
        return {key: json_ready(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item, digits) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return value if digits is None else round(value, digits)
    return value


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the leftovers of an interrupted atomic write (safe to delete)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def ensure_writable_dir(folder: Path, what: str) -> None:
    """Create `folder` and write a probe file in it, so that an output on a read-only disk or under a
    file is a UserError before any work, not an OSError after it."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write {what} {folder}: {err.strerror or err}") from None
