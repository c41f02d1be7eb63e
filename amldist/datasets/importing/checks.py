"""The per-image work of an import, run in worker processes over chunks of paths.

`check_images` reads each file once: its bytes give the content digest (the future cid) and a full
decode proves the image is usable (JPEGs decode at 1/8 scale, which still reads every byte of the
entropy-coded data, so a truncated file fails here and not in the middle of sharding).
`store_images` puts a checked image into ims/ under its cid: a hard link when the file system allows
(no second copy of the data set), else a copy verified against the digest; both atomic (temp + rename).
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from amldist.atomic import atomic_write_bytes

DIGEST_BYTES = 16  # 128-bit digest -> the 32 hex digits of an SfM-120k cid

# Status of each listed image; OK is kept, every other one is skipped and counted under its reason.
OK, MISSING, UNREADABLE, NOT_IMAGE, DAMAGED, TINY, DUPLICATE, CONFLICT, SMALL_LANDMARK, CHANGED = range(10)
REASONS = {
    MISSING: "file not found",
    UNREADABLE: "file cannot be read",
    NOT_IMAGE: "not an image PIL can read",
    DAMAGED: "damaged image",
    TINY: "shorter side below --min-side",
    DUPLICATE: "same bytes as an earlier image of its landmark (one copy kept)",
    CONFLICT: "same bytes as an image of another landmark (all copies dropped)",
    SMALL_LANDMARK: "its landmark has fewer usable images than --min-per-landmark",
    CHANGED: "file changed or vanished during the import",
}
# Short names for the record and the summary.
REASON_KEYS = {MISSING: "missing", UNREADABLE: "unreadable", NOT_IMAGE: "not_image", DAMAGED: "damaged",
               TINY: "tiny", DUPLICATE: "duplicate", CONFLICT: "conflict", SMALL_LANDMARK: "small_landmark",
               CHANGED: "changed"}

# How a kept image reached ims/.
PRESENT, LINKED, COPIED, STORE_FAILED = range(4)


@dataclass(frozen=True)
class CheckJob:
    paths: list[str]
    min_side: int


@dataclass
class CheckResult:
    status: np.ndarray  # (n,) int8
    digest: np.ndarray  # (n, DIGEST_BYTES) uint8; zeros where the file could not be read
    nbytes: np.ndarray  # (n,) int64
    details: dict[int, str] = field(default_factory=dict)  # position -> what went wrong (damaged, unreadable)


def check_images(job: CheckJob) -> CheckResult:
    count = len(job.paths)
    result = CheckResult(np.zeros(count, np.int8), np.zeros((count, DIGEST_BYTES), np.uint8),
                         np.zeros(count, np.int64))
    for position, path in enumerate(job.paths):
        status, data, detail = check_one(path, job.min_side)
        result.status[position] = status
        if data is not None:
            result.digest[position] = np.frombuffer(content_digest(data), np.uint8)
            result.nbytes[position] = len(data)
        if detail:
            result.details[position] = detail
    return result


def content_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def check_one(path: str, min_side: int) -> tuple[int, bytes | None, str]:
    """(status, the file's bytes when it could be read, detail)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return MISSING, None, ""
    except OSError as err:
        return UNREADABLE, None, f"{type(err).__name__}: {err.strerror or err}"
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return NOT_IMAGE, data, ""
    except Exception as err:  # noqa: BLE001 -- a broken header makes PIL's plugins raise many types
        return DAMAGED, data, _detail(err)
    with image:
        if min(image.size) < min_side:
            return TINY, data, f"{image.size[0]}x{image.size[1]}"
        try:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
            image.load()
        except Exception as err:  # noqa: BLE001 -- truncated data, bad chunks, decompression bombs: all unusable
            return DAMAGED, data, _detail(err)
    return OK, data, ""


def _detail(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:200]


@dataclass(frozen=True)
class StoreJob:
    sources: list[str]
    targets: list[str]
    nbytes: list[int]
    digests: list[bytes]
    copy: bool  # never hard-link


def store_images(job: StoreJob) -> np.ndarray:
    """(n,) int8: PRESENT, LINKED, COPIED or STORE_FAILED (the source changed since it was checked)."""
    out = np.zeros(len(job.sources), np.int8)
    rows = zip(job.sources, job.targets, job.nbytes, job.digests)
    for k, (source, target, nbytes, digest) in enumerate(rows):
        out[k] = store_one(source, Path(target), nbytes, digest, job.copy)
    return out


def store_one(source: str, target: Path, nbytes: int, digest: bytes, copy: bool) -> int:
    # The name is the content's digest and files only ever appear under it complete (renamed into
    # place), so a file of the right size under that name already holds these bytes.
    if target.is_file() and target.stat().st_size == nbytes:
        return PRESENT
    target.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        linked = _link(source, target, nbytes)
        if linked is not None:
            return linked
    try:
        data = Path(source).read_bytes()
    except OSError:
        return STORE_FAILED
    if content_digest(data) != digest:
        return STORE_FAILED
    atomic_write_bytes(target, data)
    return COPIED


def _link(source: str, target: Path, nbytes: int) -> int | None:
    """LINKED, STORE_FAILED (the source changed or vanished), or None when no hard link can be made here."""
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(source, temporary)
    except FileNotFoundError:
        return STORE_FAILED
    except OSError:
        return None  # another device, or a file system without hard links: copy instead
    try:
        if temporary.stat().st_size != nbytes:
            return STORE_FAILED
        os.replace(temporary, target)
        return LINKED
    finally:
        temporary.unlink(missing_ok=True)
