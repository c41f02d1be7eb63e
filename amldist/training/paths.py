"""Where a training run reads its inputs, checked up front with the exact command that fixes each gap.

Inputs (docs/ARCHITECTURE.md layout):
- the split pkl `ROOT/train/<dataset>/<dataset>.pkl` (`amldist data synth` or `amldist data download`);
- shards of its train and val splits, `data.shards` or `ROOT/shards/<dataset>-<image_size>/`
  (`amldist data shards`);
- with a teacher, its feature store of the train split, `data.teacher_features` or
  `ROOT/features/<teacher>/<dataset>-<image_size>/train` (`amldist features`), and one of the val split
  beside it (`.../val`, or `<store>-val` for a store named otherwise), computed by the driver from the
  same teacher network when missing.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from dataclasses import dataclass, replace
from pathlib import Path, PurePath

from amldist import feature_store, node_cache, storage
from amldist.config.resolve import TEACHER_FILE_SUFFIXES
from amldist.datasets import formats, layout
from amldist.errors import UserError
from amldist.feature_store import ChecksumMismatch, FeatureStore, file_sha256
from amldist.nets import OUTPUT_CHANNELS, TEACHERS, has_imagenet_weights, imagenet_state_dict
from amldist.shards.manifest import check_shard_files, read_manifest
from amldist.storage import is_uri, local_path
from amldist.training.plan import SplitLabels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPaths:
    root: str
    db_file: str
    train_shards: str
    val_shards: str
    train_store: str | None = None
    val_store: str | None = None


def teacher_label(teacher: str) -> str:
    """A folder name for a teacher: its public name, or `<folder>-<file stem>` of a network file."""
    if teacher in TEACHERS:
        return teacher
    path = PurePath(teacher)
    stem = path.name
    while PurePath(stem).suffix in TEACHER_FILE_SUFFIXES:
        stem = PurePath(stem).stem
    return f"{path.parent.name}-{stem}" if path.parent.name else stem


def default_store_dir(config, split: str = "train") -> Path:
    data = config.data
    return (Path(data.root) / "features" / teacher_label(config.model.teacher)
            / f"{data.dataset}-{data.image_size}" / split)


def val_store_dir(train_store: Path) -> Path:
    return (train_store.parent / "val" if train_store.name == "train"
            else train_store.with_name(f"{train_store.name}-val"))


def shard_root(config) -> Path:
    data = config.data
    return Path(data.shards) if data.shards else layout.shards_dir(data.root, data.dataset, data.image_size)


def _quote(path) -> str:
    return shlex.quote(str(path))


def shards_command(config) -> str:
    data = config.data
    out = "" if not data.shards else f" --out {_quote(data.shards)}"
    return (f"amldist data shards --root {_quote(data.root)} --dataset {data.dataset} "
            f"--image-size {data.image_size}{out}")


def features_command(config, split_dir: Path, out: Path) -> str:
    teacher = config.model.teacher
    network = teacher if teacher not in TEACHERS else f"<retrievalSfM120k-{teacher}-gem network file>"
    return f"amldist features --network {_quote(network)} --shards {_quote(split_dir)} --out {_quote(out)}"


def resolve_paths(config) -> TrainingPaths:
    """Check every input of a run exists; UserError naming the command that creates a missing one."""
    from amldist.training.remote_paths import resolve_remote_paths, uses_object_store

    if uses_object_store(config):  # URIs: the same layout, checked in the store
        return resolve_remote_paths(config)
    data = config.data
    db_file = _absolute(layout.train_db_path(data.root, data.dataset))  # workers run in other folders
    if not db_file.is_file():
        raise UserError(f"no training split file {db_file}; create the data root with `amldist data synth "
                        f"--root {_quote(data.root)}` or `amldist data download`")
    shards = shard_root(config)  # messages name the paths as the user gave them; the run gets absolute ones
    for split in ("train", "val"):
        if not (shards / split / "manifest.json").is_file():
            raise UserError(f"no {split} shards in {shards / split}; write them with "
                            f"`{shards_command(config)}`")
    root, shards = str(_absolute(Path(data.root))), _absolute(shards)
    paths = TrainingPaths(root, str(db_file), str(shards / "train"), str(shards / "val"))
    if config.model.teacher is not None:
        train_store = Path(data.teacher_features) if data.teacher_features else default_store_dir(config)
        if not (train_store / "manifest.json").is_file():
            raise UserError(f"no teacher features in {train_store}; compute them with "
                            f"`{features_command(config, shard_root(config) / 'train', train_store)}`")
        train_store = _absolute(train_store)
        paths = dataclasses.replace(paths, train_store=str(train_store),
                                    val_store=str(val_store_dir(train_store)))
    for split in (paths.train_shards, paths.val_shards):  # a missing shard: found now, not mid-epoch
        check_shard_files(split, read_manifest(split))
    return paths


def with_absolute_paths(config, cwd: str | Path):
    """The config with its relative paths (data root, shards, teacher stores, a teacher network file, the
    run folder base) taken relative to `cwd`: for a run whose driver works elsewhere (a Ray Tune trial
    runs in its trial folder). Object-store URIs stay as they are."""
    def absolute(value: str | None) -> str | None:
        if value is None or is_uri(value):
            return value
        return str((Path(cwd) / local_path(value).expanduser()).resolve())

    data, model = config.data, config.model
    teacher = model.teacher if model.teacher in TEACHERS else absolute(model.teacher)
    data = replace(data, root=absolute(data.root), shards=absolute(data.shards),
                   teacher_features=absolute(data.teacher_features))
    return replace(config, data=data, model=replace(model, teacher=teacher),
                   run=replace(config.run, out_dir=absolute(config.run.out_dir)))


def _absolute(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def read_labels(paths: TrainingPaths) -> tuple[SplitLabels, SplitLabels]:
    """(train, val) labels of the run's split file."""
    splits = formats.read_sfm_db(paths.db_file)
    for name in ("train", "val"):
        if name not in splits:
            raise UserError(f"{paths.db_file} has no {name!r} split")
    return SplitLabels.from_split(splits["train"]), SplitLabels.from_split(splits["val"])


def store_expectations(config, split: str, count: int) -> dict:
    """Manifest fields a teacher store of `split` must match for this run."""
    expected = {"dataset": config.data.dataset, "split": split, "count": int(count)}
    teacher = Path(config.model.teacher).expanduser()
    if config.model.teacher not in TEACHERS and teacher.is_file():
        expected["network_sha256"] = file_sha256(teacher)
    return expected


def teacher_record(store_dir: str | Path) -> dict:
    """The teacher a student trained on this store learns the space of, as its meta records it
    (`nets.meta.TEACHER_KEY`): the sha256 of the teacher file that computed the store, and what it is.

    A worker of an object-store run has no copy of the store (only the driver and the miner read it, and
    the driver has checked it), so there the record comes from its manifest alone, one small request."""
    if storage.is_uri(store_dir):
        manifest = storage.read_json(storage.join(store_dir, feature_store.MANIFEST))
    else:
        manifest = FeatureStore.open(store_dir, verify=False).manifest
    return {key: manifest[key] for key in ("network_sha256", "architecture", "dim", "network")}


def check_train_store(config, paths: TrainingPaths, num_images: int, student_dim: int) -> FeatureStore:
    """Open the train store, require its checksum to hold, it to match this split and teacher, and its d to
    be the student's. (One read of the array, before any worker starts.)"""
    try:
        store = FeatureStore.open(paths.train_store, expected=store_expectations(config, "train", num_images))
    except ChecksumMismatch as err:
        command = features_command(config, Path(paths.train_shards), Path(paths.train_store))
        raise UserError(f"{err}; recompute them with `{command} --force`") from None
    if store.dim != student_dim:
        raise UserError(f"the teacher features in {paths.train_store} have d={store.dim}, the student's "
                        f"descriptors d={student_dim}; set model.projection_dim={store.dim}")
    return store


def ensure_val_store(config, paths: TrainingPaths, train_store: FeatureStore, num_images: int,
                     num_workers: int = 0) -> FeatureStore:
    """The teacher's vectors of the val split, computed with the train store's network when missing."""
    expected = {**store_expectations(config, "val", num_images),
                "network_sha256": train_store.manifest["network_sha256"]}
    if (Path(paths.val_store) / "manifest.json").is_file():
        try:  # a damaged or stale val store is the driver's own to recompute
            return FeatureStore.open(paths.val_store, expected=expected)
        except UserError as err:
            log.info("recomputing the val teacher features: %s", err)
    teacher_file = Path(config.model.teacher).expanduser()
    # The teacher file (already checked against the train store), else the file the store names.
    network = teacher_file if teacher_file.is_file() else Path(train_store.manifest["network"])
    if not network.is_file():
        raise UserError(f"no val teacher features in {paths.val_store} and the teacher network {network} "
                        "is not here to compute them; run "
                        f"`{features_command(config, Path(paths.val_shards), Path(paths.val_store))}`")
    from amldist.teacher_features import compute_features

    log.info("computing the teacher's val features into %s", paths.val_store)
    return compute_features(network, paths.val_shards, paths.val_store,
                            image_size=train_store.manifest["image_size"],
                            scales=train_store.manifest["scales"], num_workers=num_workers)


def student_dim(config) -> int:
    """d of the student's descriptors: its projection, else its backbone's channels."""
    return config.model.projection_dim or OUTPUT_CHANNELS[config.model.arch]


def prepare_inputs(config, num_feature_workers: int = 0) -> tuple[TrainingPaths, SplitLabels]:
    """Check data, shards and teacher stores (computing the val store if needed); fetch ImageNet weights.
    Runs once on the driver, before any trainer starts. Returns the paths and the training split's labels
    (read here anyway; the miner needs them)."""
    from amldist.training.remote_paths import DRIVER_INPUTS

    paths = resolve_paths(config)
    # Inputs in an object store: this node's copies of what the driver reads (workers make their own).
    local = node_cache.localize(paths, DRIVER_INPUTS)
    train_labels, val_labels = read_labels(local)
    if local.train_store is not None:
        store = check_train_store(config, local, train_labels.num_images, student_dim(config))
        ensure_val_store(config, local, store, val_labels.num_images, num_workers=num_feature_workers)
    if config.model.pretrained and has_imagenet_weights(config.model.arch):
        imagenet_state_dict(config.model.arch)  # once here, so workers find the weights in the hub cache
    return paths, train_labels
