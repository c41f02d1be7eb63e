"""Import landmark photos into a training set in SfM-120k's layout and pickle format.

    list the source -> check every image (read, digest, decode) -> drop duplicates and small landmarks
    -> store the kept images in ims/ -> split by landmark -> draw pairs -> write pickles, lists, record

Every image is read once by the check pass (in worker processes, chunk by chunk) and once more only when
it must be copied; the per-image state lives in numpy arrays, so the pass scales to GLDv2's 4.1M rows.
A cid is the 128-bit BLAKE2b digest of the file's bytes in hex: the same bytes get the same cid whatever
the folder names or the order of listing (so a rerun reproduces the set exactly and byte-identical
duplicates are found by the same pass), and a file under ims/ can be checked against its name.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from amldist.datasets import formats, layout
from amldist.datasets.importing import checks, output, pairs
from amldist.datasets.importing.sources import FolderSource, Gldv2Source, list_folders, list_gldv2
from amldist.datasets.importing.state import ImageState
from amldist.errors import UserError
from amldist.shards.runner import open_runner

log = logging.getLogger(__name__)

CHUNK_IMAGES = 256  # images per worker job
JOBS_PER_ROUND = 256  # jobs handed to the pool at once: bounds the paths held in memory (65k)


@dataclass(frozen=True)
class ImportOptions:
    """What decides the content of an imported set (the record compares these on a rerun)."""

    val_fraction: float = 0.1  # share of the landmarks that form the val split
    min_per_landmark: int = 2  # landmarks with fewer usable images are left out (a pair needs two)
    min_side: int = 64  # images whose shorter side is below this many pixels are left out
    pairs_per_image: int = 2  # query/positive pairs per query image (SfM-120k has about two)
    max_pairs_per_landmark: int = 200  # cap of each landmark's pairs (train/val and whitening alike)
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        for flag, value, least in (("--min-per-landmark", self.min_per_landmark, 2),
                                   ("--min-side", self.min_side, 1),
                                   ("--pairs-per-image", self.pairs_per_image, 1),
                                   ("--max-pairs-per-landmark", self.max_pairs_per_landmark, 1)):
            if not isinstance(value, int) or value < least:
                raise UserError(f"{flag} must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True)
class RunSettings:
    """How the import runs; no influence on what it writes."""

    workers: int | None = None  # local processes (None: all CPUs)
    ray_workers: int | None = None  # Ray tasks at a time instead of local processes
    copy: bool = False  # copy into ims/ even where a hard link is possible
    overwrite: bool = False  # replace an import of another source or with other options


def import_folders(images: str | Path, root: str | Path, name: str, options: ImportOptions = ImportOptions(),
                   settings: RunSettings = RunSettings()) -> dict:
    """Import DIR/<landmark>/**/<image>; returns the import record (also written as NAME-import.json)."""
    return run_import(list_folders(images), Path(root), name, options, settings)


def import_gldv2(csv_path: str | Path, images: str | Path, root: str | Path, name: str,
                 options: ImportOptions = ImportOptions(), settings: RunSettings = RunSettings()) -> dict:
    """Import the images a GLDv2 train.csv / train_clean.csv lists, found at DIR/a/b/c/<id>.jpg."""
    return run_import(list_gldv2(csv_path, images), Path(root), name, options, settings)


def run_import(source: FolderSource | Gldv2Source, root: Path, name: str, options: ImportOptions,
               settings: RunSettings) -> dict:
    start = time.perf_counter()
    output.check_name(name)
    options.check()
    _require_images(source)
    identity = {"importer": output.IMPORTER, "format_version": output.RECORD_VERSION, "name": name,
                "source": source.identity(), "options": asdict(options)}
    redo = output.prepare_target(root, name, identity, settings.overwrite)
    state = ImageState.for_source(source)
    with open_runner(settings.workers, settings.ray_workers) as runner:
        _check_all(source, state, options.min_side, runner)
        _require_found(source, state)
        state.mark_duplicates(source)
        state.mark_small_landmarks(options.min_per_landmark)
        _require_landmarks(source, state, options)  # bad input ends here, before anything is written
        output.write_record(root, name, {**identity, "complete": False})
        stored = _store_kept(source, state, root, name, settings.copy, runner)
    dropped_after_store = state.mark_small_landmarks(options.min_per_landmark)
    _require_landmarks(source, state, options)  # images that changed during the store may have cost some
    splits, whiten = _assemble(state, options)
    formats.write_sfm_db(layout.train_db_path(root, name), splits)
    formats.write_whiten_db(layout.whiten_db_path(root, name), whiten)
    _write_lists(source, state, splits, root, name)
    pruned = 0
    if redo or dropped_after_store:
        pruned = output.prune_images(layout.train_images_dir(root, name), np.sort(state.hex[state.kept()]))
    record = {**identity, "complete": True, "seconds": round(time.perf_counter() - start, 1),
              "counts": _counts(source, state, splits, whiten, stored, pruned)}
    output.write_record(root, name, record)
    return record


def _require_images(source) -> None:
    if len(source):
        return
    if isinstance(source, FolderSource):
        raise UserError(f"no images under {source.base}: it needs one sub-folder per landmark holding that "
                        f"landmark's images ({len(source.landmark_names)} sub-folder(s), all empty)")
    raise UserError(f"{source.csv_path} lists no images")


def _check_all(source, state: ImageState, min_side: int, runner) -> None:
    """The check pass over every listed image, one round of jobs at a time."""
    round_size = CHUNK_IMAGES * JOBS_PER_ROUND
    for first in range(0, len(source), round_size):
        last = min(first + round_size, len(source))
        bounds = list(range(first, last, CHUNK_IMAGES)) + [last]
        jobs = [checks.CheckJob(source.paths(np.arange(a, b)), min_side)
                for a, b in itertools.pairwise(bounds)]
        results = runner.run(checks.check_images, jobs, desc=f"check {first // round_size + 1}/"
                             f"{-(-len(source) // round_size)}", amount=lambda r: len(r.status),
                             total=last - first)
        for a, result in zip(bounds, results):
            state.take(a, result)


def _require_found(source, state: ImageState) -> None:
    if isinstance(source, Gldv2Source) and np.all(state.status == checks.MISSING):
        example = source.paths(np.arange(1))[0]
        raise UserError(f"none of the {len(source)} images {source.csv_path} lists is under {source.base} "
                        f"(expected DIR/a/b/c/<id>.jpg, e.g. {example})")


def _store_kept(source, state: ImageState, root: Path, name: str, copy: bool, runner) -> dict[str, int]:
    """Link or copy every kept image into ims/; an image that changed since its check is dropped."""
    ims = layout.train_images_dir(root, name)
    kept = state.kept()
    outcome = np.zeros(len(kept), np.int8)
    round_size = CHUNK_IMAGES * JOBS_PER_ROUND
    for first in range(0, len(kept), round_size):
        part = kept[first:first + round_size]
        jobs = []
        for a in range(0, len(part), CHUNK_IMAGES):
            idx = part[a:a + CHUNK_IMAGES]
            jobs.append(checks.StoreJob(
                source.paths(idx), [str(layout.cid2filename(c.decode(), ims)) for c in state.hex[idx]],
                state.nbytes[idx].tolist(), [bytes(d) for d in state.digest[idx]], copy))
        results = runner.run(checks.store_images, jobs, desc="store", amount=len, total=len(part))
        outcome[first:first + len(part)] = np.concatenate(results) if results else []
    state.status[kept[outcome == checks.STORE_FAILED]] = checks.CHANGED
    return {"present": int(np.sum(outcome == checks.PRESENT)),
            "linked": int(np.sum(outcome == checks.LINKED)), "copied": int(np.sum(outcome == checks.COPIED))}


def _require_landmarks(source, state: ImageState, options: ImportOptions) -> None:
    """Two landmarks at least (one for train, one for val), else an error that says why there are fewer."""
    count = len(np.unique(state.landmark[state.kept()]))
    if count >= 2:
        return
    skipped = [f"{n} {key.replace('_', ' ')}" for key, n in state.reason_counts().items() if n]
    raise UserError(f"{count} landmark(s) left, an imported set needs at least 2 (one for train, "
                    f"one for val); {len(source)} images "
                    f"listed{': ' + ', '.join(skipped) if skipped else ''}; landmarks need "
                    f"--min-per-landmark {options.min_per_landmark} usable images each")


def _assemble(state: ImageState, options: ImportOptions):
    """The train/val splits (val = whole landmarks) with their pairs, and the whitening db."""
    kept = state.kept()
    landmarks = np.unique(state.landmark[kept])
    in_val = np.isin(state.landmark[kept],
                     pairs.choose_val_landmarks(landmarks, options.val_fraction, options.seed))
    rng = pairs.rng_for(options.seed, pairs.PAIR_DRAW)
    splits, members = {}, {}
    for split, mask in (("train", ~in_val), ("val", in_val)):
        members[split] = kept[mask]
        clusters = state.landmark[members[split]]
        qidxs, pidxs = pairs.cycle_pairs(clusters, options.pairs_per_image, options.max_pairs_per_landmark,
                                         rng)
        splits[split] = formats.SfmSplit(state.cids(members[split]), clusters, qidxs, pidxs)
    every = np.concatenate([members["train"], members["val"]])  # like SfM-120k's: train and val images
    used, qidxs, pidxs = pairs.whiten_pairs(state.landmark[every], options.max_pairs_per_landmark,
                                            options.seed)
    whiten = formats.WhitenDb(state.cids(every[used]), qidxs, pidxs)
    state.split_of = {"train": members["train"], "val": members["val"]}
    return splits, whiten


def _write_lists(source, state: ImageState, splits: dict, root: Path, name: str) -> None:
    output.write_tsv(output.images_list_path(root, name), ["cid", "split", "cluster", "landmark", "source"],
                     _kept_rows(source, state, splits))
    output.write_tsv(output.skipped_list_path(root, name), ["source", "landmark", "reason", "detail"],
                     _skipped_rows(source, state))


def _kept_rows(source, state: ImageState, splits: dict):
    """Rows made a round of images at a time, so the list costs no Python objects per image."""
    step = CHUNK_IMAGES * JOBS_PER_ROUND
    for split in ("train", "val"):
        positions, cids = state.split_of[split], splits[split].cids
        for first in range(0, len(positions), step):
            part = positions[first:first + step]
            for position, cid, name_ in zip(part, cids[first:first + step], source.names(part)):
                cluster = int(state.landmark[position])
                yield [cid, split, cluster, source.landmark_label(cluster), name_]


def _skipped_rows(source, state: ImageState):
    if isinstance(source, FolderSource):
        for loose in source.loose_files:
            yield [loose, "", "outside any landmark folder", ""]
    skipped = np.flatnonzero(state.status != checks.OK)
    for first in range(0, len(skipped), CHUNK_IMAGES * JOBS_PER_ROUND):
        part = skipped[first:first + CHUNK_IMAGES * JOBS_PER_ROUND]
        for position, name_ in zip(part, source.names(part)):
            status = int(state.status[position])
            yield [name_, source.landmark_label(int(state.landmark[position])), checks.REASON_KEYS[status],
                   state.details.get(int(position), checks.REASONS[status])]


def _counts(source, state: ImageState, splits: dict, whiten: formats.WhitenDb, stored: dict,
            pruned: int) -> dict:
    listed_landmarks = (len(source.landmark_names) if isinstance(source, FolderSource)
                        else len(np.unique(state.landmark)))
    counts = {"listed": len(source), "kept": len(state.kept()), "skipped": state.reason_counts(),
              "kept_bytes": int(state.nbytes[state.kept()].sum()),
              "landmarks": {"listed": listed_landmarks,
                            "kept": len(np.unique(state.landmark[state.kept()]))},
              "stored": stored, "pruned": pruned}
    if isinstance(source, FolderSource):
        counts["skipped"]["outside_landmark_folders"] = len(source.loose_files)
        counts["landmarks"]["empty_folders"] = len(source.empty_landmarks)
    for split, db in splits.items():
        counts[split] = {"images": len(db.cids), "landmarks": len(np.unique(db.cluster)),
                         "pairs": len(db.qidxs)}
    counts["whiten"] = {"images": len(whiten.cids), "pairs": len(whiten.qidxs)}
    return counts
