"""A run's inputs in an object store: the same layout as a local data root, under a URI (no Ray).

`data.root`, `data.shards` and `data.teacher_features` may each be a URI (s3://, gs://; see
`amldist.storage`) or a local/shared path. The folders below a URI root are those of a local root
(docs/ARCHITECTURE.md), so a root uploaded as it is works:

    amldist train --config tiny-student-contrplus-asym --set data.root=s3://bucket/data --storage s3://bucket/runs

The checks here only look (a few small requests for the manifests); every node then copies what it
reads into its own cache (`amldist.node_cache`): the driver the split pkl and the teacher stores (it
checks them), each worker the split pkl and the shards, the miner the teacher stores. The val teacher
store must be in the store too: it cannot be computed into a place every node sees, so a missing one
names the commands.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path, PurePath

from amldist import storage
from amldist.datasets import layout
from amldist.errors import UserError
from amldist.training.paths import TrainingPaths, default_store_dir, shards_command

# The inputs each process reads (the miner reads both teacher stores and serves their rows): the fields
# of TrainingPaths that `amldist.node_cache.localize` turns into this node's copies when they are URIs.
DRIVER_INPUTS = ("db_file", "train_store", "val_store")
WORKER_INPUTS = ("db_file", "train_shards", "val_shards")


def uses_object_store(config) -> bool:
    data = config.data
    return any(storage.is_uri(value) for value in (data.root, data.shards, data.teacher_features))


def _under(base: str, relative: PurePath) -> str:
    """`relative` (a path below a data root) below `base`, a URI or a local root made absolute."""
    if storage.is_uri(base):
        return storage.join(base, *relative.parts)
    return str(Path(base).expanduser().resolve().joinpath(relative))


def _given(location: str) -> str:
    return location if storage.is_uri(location) else str(Path(location).expanduser().resolve())


def _relative_store_dir(config, split: str = "train") -> PurePath:
    """The default store folder below the data root (the same rule as a local root)."""
    data = dataclasses.replace(config.data, root=".")
    return PurePath(default_store_dir(dataclasses.replace(config, data=data), split))


def _require(location: str, what: str, fix: str) -> None:
    if not storage.exists(location):
        raise UserError(f"no {what} in {location}; {fix}")


def resolve_remote_paths(config) -> TrainingPaths:
    """`amldist.training.paths.resolve_paths` for inputs of which at least one is in an object store."""
    data = config.data
    db_file = _under(data.root, PurePath(layout.train_db_path(".", data.dataset)))
    _require(db_file, "training split file", "upload the data root (`amldist data synth` or `data download` "
                                             "writes it) with its train/ folder")
    shards = (_given(data.shards) if data.shards
              else _under(data.root, PurePath(layout.shards_dir(".", data.dataset, data.image_size))))
    for split in ("train", "val"):
        _require(storage.join(shards, split, "manifest.json"), f"{split} shards",
                 f"write them with `{shards_command(config)}` and upload the folder")
    train_shards, val_shards = storage.join(shards, "train"), storage.join(shards, "val")
    root = _given(data.root)
    if config.model.teacher is None:
        return TrainingPaths(root, db_file, train_shards, val_shards)
    train_store = (_given(data.teacher_features) if data.teacher_features
                   else _under(data.root, _relative_store_dir(config)))
    val_store = _val_store(train_store)
    for store, split_shards in ((train_store, train_shards), (val_store, val_shards)):
        _require(storage.join(store, "manifest.json"), "teacher features",
                 f"compute them with `amldist features` from a local copy of {split_shards} and upload the "
                 f"folder to {store}")
    return TrainingPaths(root, db_file, train_shards, val_shards, train_store, val_store)


def _val_store(train_store: str) -> str:
    """Beside the train store, named as `amldist.training.paths.val_store_dir` names it."""
    if not storage.is_uri(train_store):
        from amldist.training.paths import val_store_dir

        return str(val_store_dir(Path(train_store)))
    parent, name = train_store.rstrip("/").rsplit("/", 1)
    return f"{parent}/val" if name == "train" else f"{parent}/{name}-val"
