"""Write the splits of a dataset as WebDataset shards: probe, plan, verify, write, then the manifest.

Resumable and idempotent. The assignment of images to shards depends only on the images and the
parameters. Each shard is written under a temporary name and renamed when complete; then a record
(`<split>-NNNNNN.json`: entries, checksum, fingerprint of its plan) is written beside it. A rerun
keeps every shard whose record, fingerprint and checksum agree and rewrites only the others. The
manifest is written last, atomically, and only when its content changed. While shards are being
rewritten there is no manifest, so a reader never pairs an old manifest with new shards.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from amldist import __version__
from amldist.atomic import atomic_path, ensure_writable_dir, is_temporary
from amldist.datasets import formats, layout
from amldist.errors import UserError
from amldist.shards import manifest as mf
from amldist.shards.runner import Runner, open_runner

TAR_BLOCK = 512
# What one sample adds to a shard besides its JPEG: two tar headers, the json member, padding.
SAMPLE_OVERHEAD_BYTES = 3 * TAR_BLOCK
# Shards are shared read-only data (cluster nodes, other users): readable by all, unlike mkstemp's 0600.
PUBLIC_FILE_MODE = 0o644
# Modes that resize well as they are; others (palette, 16-bit, alpha) go to RGB before resizing.
RESIZABLE_MODES = ("RGB", "L", "CMYK", "YCbCr")


@dataclass(frozen=True)
class SplitParams:
    dataset: str
    split: str
    image_size: int
    quality: int


@dataclass(frozen=True)
class ShardTask:
    split_dir: Path
    number: int
    params: SplitParams
    records: tuple[formats.ImageRecord, ...]
    fingerprint: str

    @property
    def tar_path(self) -> Path:
        return self.split_dir / mf.shard_name(self.params.split, self.number)

    @property
    def part_path(self) -> Path:
        return self.split_dir / mf.part_name(self.params.split, self.number)


def _write_public(path: Path, data: bytes) -> None:
    """Atomic write (temp + rename) of a file others read."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, PUBLIC_FILE_MODE)


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


def _skip_entry(record: formats.ImageRecord, reason: str) -> dict[str, Any]:
    return {"index": record.index, "name": record.name, "reason": reason}


def probe_image(record: formats.ImageRecord, image_size: int) -> tuple[int, int] | str:
    """(source bytes, estimated stored bytes), or why the image cannot be used.

    The estimate keeps the source's bytes per pixel at the stored size; it only serves to plan
    shards by bytes before anything is encoded (the manifest records the real sizes).
    """
    try:
        source_bytes = record.path.stat().st_size
        with Image.open(record.path) as img:
            width, height = img.size
    except Exception as err:  # noqa: BLE001 -- PIL raises many types for bad files; all mean "skip it"
        return _reason(err)
    scale = min(1.0, image_size / max(width, height, 1))
    return source_bytes, int(source_bytes * scale * scale) + SAMPLE_OVERHEAD_BYTES


def plan_shards(sized: list[tuple[formats.ImageRecord, int]], shard_count: int,
                shard_bytes: int) -> list[list[formats.ImageRecord]]:
    """Cut the images, in index order, into shards of ≤ shard_count images and ≈ ≤ shard_bytes."""
    shards: list[list[formats.ImageRecord]] = []
    current: list[formats.ImageRecord] = []
    current_bytes = 0
    for record, estimate in sized:
        if current and (len(current) >= shard_count or current_bytes + estimate > shard_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(record)
        current_bytes += estimate
    if current:
        shards.append(current)
    return shards


def plan_fingerprint(params: SplitParams, records: list[formats.ImageRecord], source_bytes: list[int],
                     root: Path) -> str:
    """Hash of everything a shard's bytes depend on; a changed fingerprint means rewrite the shard."""
    items = [[r.index, r.name, r.cluster, r.bbx, os.path.relpath(r.path, root), size]
             for r, size in zip(records, source_bytes)]
    payload = [mf.FORMAT_VERSION, params.dataset, params.split, params.image_size, params.quality, items]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def encode_image(path: Path, image_size: int, quality: int) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """(JPEG bytes, original (w, h), stored (w, h)): longest side ≤ image_size, never upscaled, RGB."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        original = img.size
        if img.format == "JPEG" and img.mode == "RGB" and max(original) <= image_size:
            img.load()  # decode fully so a truncated file is caught now rather than during training
            return data, original, original  # already small enough: keep the bytes, no second loss
        if img.mode not in RESIZABLE_MODES:
            img = img.convert("RGB")  # palette images would otherwise be resized with NEAREST
        # thumbnail() lets libjpeg decode at a reduced scale first (draft), then resamples with LANCZOS.
        img.thumbnail((image_size, image_size), Image.Resampling.LANCZOS)
        rgb = img.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=quality)
    return out.getvalue(), original, rgb.size


class TarWriter:
    """A minimal ustar writer that returns where each member's data starts and hashes as it writes.

    Headers are fixed (mtime 0, mode 0444, no owner), so the same input gives the same bytes.
    """

    def __init__(self, handle: io.BufferedWriter):
        self._handle = handle
        self._digest = hashlib.sha256()
        self.offset = 0

    def _write(self, data: bytes) -> None:
        self._handle.write(data)
        self._digest.update(data)
        self.offset += len(data)

    def add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self._write(info.tobuf(format=tarfile.USTAR_FORMAT))
        start = self.offset
        self._write(data)
        self._write(b"\0" * (-len(data) % TAR_BLOCK))
        return start

    def finish(self) -> str:
        self._write(b"\0" * (2 * TAR_BLOCK))  # end-of-archive marker
        return self._digest.hexdigest()


def sample_meta(record: formats.ImageRecord, params: SplitParams, original: tuple[int, int],
                size: tuple[int, int]) -> dict[str, Any]:
    """The json member: queries keep their bbx in original pixels (they are stored uncropped)."""
    meta = {"index": record.index, "key": mf.sample_key(record.index), "name": record.name,
            "cluster": record.cluster, "split": params.split, "dataset": params.dataset,
            "original_size": list(original), "size": list(size),
            "bbx": list(record.bbx) if record.bbx is not None else None}
    if layout.dataset_kind(params.dataset) == "train":
        meta["cid"] = record.name
    return meta


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard (temp name → rename), then its record; returns the record."""
    entries, skipped = [], []
    with atomic_path(task.tar_path) as tmp, open(tmp, "wb") as handle:
        writer = TarWriter(handle)
        for record in task.records:
            try:
                jpg, original, size = encode_image(record.path, task.params.image_size, task.params.quality)
            except Exception as err:  # noqa: BLE001 -- a corrupt or vanished source image is skipped
                skipped.append(_skip_entry(record, _reason(err)))
                continue
            key = mf.sample_key(record.index)
            meta = json.dumps(sample_meta(record, task.params, original, size), sort_keys=True).encode()
            jpg_offset = writer.add(f"{key}.jpg", jpg)
            json_offset = writer.add(f"{key}.json", meta)
            entries.append([record.index, task.number, jpg_offset, len(jpg), json_offset, len(meta),
                            *size, *original])
        sha256 = writer.finish()
        total_bytes = writer.offset
        os.chmod(tmp, PUBLIC_FILE_MODE)
    part = {"format_version": mf.FORMAT_VERSION, "name": task.tar_path.name, "number": task.number,
            "fingerprint": task.fingerprint, "count": len(entries), "bytes": total_bytes, "sha256": sha256,
            "first_index": task.records[0].index, "last_index": task.records[-1].index,
            "entries": entries, "skipped": skipped}
    _write_public(task.part_path, json.dumps(part, separators=(",", ":")).encode())
    return part


def verified_part(task: ShardTask) -> dict[str, Any] | None:
    """The shard's record when shard and record are complete and match the plan, else None."""
    try:
        part = json.loads(task.part_path.read_text())
        if part["format_version"] != mf.FORMAT_VERSION or part["fingerprint"] != task.fingerprint:
            return None
        if task.tar_path.stat().st_size != part["bytes"] or mf.sha256_file(task.tar_path) != part["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return part


def _remove_leftovers(split_dir: Path, split: str, num_shards: int) -> None:
    """Drop interrupted temp files and shards an earlier plan had beyond this plan's last one."""
    for path in split_dir.iterdir():
        number = mf.shard_file_number(path, split)
        stale = number is not None and number >= num_shards
        if stale or (is_temporary(path) and path.name.startswith(f".{split}-")):
            path.unlink(missing_ok=True)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # a rerun that changed nothing rewrites nothing
    _write_public(path, data)


def _npy_bytes(table: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    return buffer.getvalue()


def _build_manifest(parts: list[dict[str, Any]], skipped: list[dict[str, Any]], source: dict[str, Any],
                    num_images: int, index_sha256: str) -> dict[str, Any]:
    shards = [{key: part[key] for key in ("name", "count", "bytes", "sha256", "fingerprint",
                                            "first_index", "last_index")} for part in parts]
    return {"format_version": mf.FORMAT_VERSION, "amldist_version": __version__,
            "dataset": source["dataset"], "split": source["split"], "image_size": source["image_size"],
            "quality": source["quality"], "source": source, "shards": shards,
            "num_images": num_images, "num_samples": sum(p["count"] for p in parts),
            "num_skipped": len(skipped), "total_bytes": sum(p["bytes"] for p in parts),
            "index_file": mf.INDEX_NAME, "index_columns": list(mf.INDEX_COLUMNS),
            "index_sha256": index_sha256, "skipped": skipped, "num_shards": len(shards)}


def _finish_split(split_dir: Path, parts: list[dict[str, Any]],
                  probe_skips: list[dict[str, Any]], source: dict[str, Any],
                  num_images: int) -> dict[str, Any]:
    """Write index.npy, then the manifest (last): together they say the split is complete."""
    width = len(mf.INDEX_COLUMNS)
    # Converted shard by shard: 1M samples as one list of Python lists would cost several hundred MB.
    blocks = [np.asarray(part["entries"], dtype=np.int64).reshape(-1, width) for part in parts]
    table = np.concatenate(blocks) if blocks else np.zeros((0, width), np.int64)  # (N, 10)
    table = table[np.argsort(table[:, mf.COLUMN["index"]], kind="stable")]
    index_bytes = _npy_bytes(table)
    skipped = sorted(probe_skips + [s for part in parts for s in part["skipped"]], key=lambda s: s["index"])
    manifest = _build_manifest(parts, skipped, source, num_images, hashlib.sha256(index_bytes).hexdigest())
    _write_if_changed(split_dir / mf.INDEX_NAME, index_bytes)
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _write_if_changed(split_dir / mf.MANIFEST_NAME, text.encode())
    return manifest


def _plan_tasks(records: list[formats.ImageRecord], root: Path, split_dir: Path, params: SplitParams,
                shard_count: int, shard_bytes: int, runner: Runner):
    """Probe every image, then fix which images go to which shard; returns (tasks, probe skips)."""
    probe = functools.partial(probe_image, image_size=params.image_size)
    probes = runner.run(probe, records, desc=f"probe {params.dataset}/{params.split}")
    sized, source_bytes, skipped = [], {}, []
    for record, result in zip(records, probes):
        if isinstance(result, str):
            skipped.append(_skip_entry(record, result))
        else:
            sized.append((record, result[1]))
            source_bytes[record.index] = result[0]
    tasks = []
    for number, group in enumerate(plan_shards(sized, shard_count, shard_bytes)):
        fingerprint = plan_fingerprint(params, group, [source_bytes[r.index] for r in group], root)
        tasks.append(ShardTask(split_dir, number, params, tuple(group), fingerprint))
    return tasks, skipped


def shard_split(records: list[formats.ImageRecord], root: Path, split_dir: Path, params: SplitParams,
                shard_count: int, shard_bytes: int, runner: Runner) -> dict[str, Any]:
    """Bring one split folder up to date with the plan; returns its manifest."""
    split_dir.mkdir(parents=True, exist_ok=True)
    tasks, probe_skips = _plan_tasks(records, root, split_dir, params, shard_count, shard_bytes, runner)
    kept = runner.run(verified_part, tasks, desc=f"verify {params.dataset}/{params.split}", unit="shard")
    todo = [task for task, part in zip(tasks, kept) if part is None]
    if todo:
        # The old manifest would describe shards that are about to change: withdraw it first.
        (split_dir / mf.MANIFEST_NAME).unlink(missing_ok=True)
    _remove_leftovers(split_dir, params.split, len(tasks))
    written = runner.run(write_shard, todo, desc=f"write {params.dataset}/{params.split}", unordered=True,
                         amount=lambda part: part["count"] + len(part["skipped"]), total=sum(
                             len(t.records) for t in todo))
    parts = sorted([p for p in kept if p is not None] + written, key=lambda p: p["number"])
    source = {"root": str(root.resolve()), "dataset": params.dataset, "split": params.split,
              "image_size": params.image_size, "quality": params.quality,
              "shard_count": shard_count, "shard_bytes": shard_bytes}
    return _finish_split(split_dir, parts, probe_skips, source, len(records))


def _check_arguments(root: Path, image_size: int, quality: int, shard_count: int, shard_bytes: int) -> None:
    if not root.is_dir():
        raise UserError(f"no such data root: {root}")
    for name, value in (("image size", image_size), ("shard count", shard_count),
                        ("shard bytes", shard_bytes)):
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"JPEG quality must be an integer in 1..100, got {quality!r}")


def _check_split_dir(split_dir: Path, params: SplitParams, force: bool) -> None:
    """Refuse to write over another dataset's or split's shards (unless force) or over a foreign
    manifest, and fail now, before any work, when the folder cannot be written."""
    path = split_dir / mf.MANIFEST_NAME
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or "format_version" not in old:
            raise UserError(f"{split_dir} holds a {mf.MANIFEST_NAME} that is not a shard manifest; "
                            f"choose another --out")
        theirs = (old.get("dataset"), old.get("split"))
        if theirs != (params.dataset, params.split) and not force:
            raise UserError(f"{split_dir} holds shards of {theirs[0]}/{theirs[1]}, not "
                            f"{params.dataset}/{params.split}; pass --force to replace them, "
                            "or choose another --out")
    ensure_writable_dir(split_dir, "shard folder")


def _choose_splits(name: str, splits: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    available = layout.splits_of(name)
    if not splits:
        return available
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise UserError(f"{name} has no split {unknown[0]!r}; choose from {', '.join(available)}")
    return tuple(dict.fromkeys(splits))


def shard_dataset(root: str | Path, name: str, out: str | Path | None = None, image_size: int | None = None,
                  splits: list[str] | tuple[str, ...] | None = None,
                  shard_count: int = mf.DEFAULT_SHARD_COUNT, shard_bytes: int = mf.DEFAULT_SHARD_BYTES,
                  workers: int | None = None, quality: int = mf.DEFAULT_QUALITY,
                  force: bool = False, ray_workers: int | None = None) -> dict[str, dict[str, Any]]:
    """Write (or bring up to date) `OUT/<split>/` for each split of `name`; returns {split: manifest}.

    OUT defaults to `layout.shards_dir(root, name, image_size)`; image_size defaults to 362 for
    training sets and 1024 for test sets and distractors. A split folder holding shards of another
    dataset or split is refused unless force. The work runs in `workers` local processes, or with
    `ray_workers` in that many Ray tasks at a time (the same bytes either way).
    """
    root = Path(root)
    layout.check_dataset(name)
    image_size = mf.default_image_size(name) if image_size is None else image_size
    _check_arguments(root, image_size, quality, shard_count, shard_bytes)
    chosen = _choose_splits(name, splits)
    runner = open_runner(workers, ray_workers)  # refuses both kinds of workers at once, before any work
    out = Path(out) if out is not None else layout.shards_dir(root, name, image_size)
    if out.exists() and not out.is_dir():
        raise UserError(f"shard output {out} exists and is not a folder")
    for split in chosen:
        _check_split_dir(out / split, SplitParams(name, split, image_size, quality), force)
    images = formats.list_images(root, name)
    manifests = {}
    with runner:
        for split in chosen:
            params = SplitParams(name, split, image_size, quality)
            manifests[split] = shard_split(images[split], root, out / split, params, shard_count,
                                           shard_bytes, runner)
    return manifests
