"""Where each dataset lives under a data root: the cirtorch layout, so existing folders work as-is."""

from __future__ import annotations

import re
from pathlib import Path

from amldist.errors import UserError

TRAIN_DATASETS = ("retrieval-SfM-120k", "retrieval-SfM-30k")
TEST_DATASETS = ("roxford5k", "rparis6k", "oxford5k", "paris6k")
REVISITED_TEST_DATASETS = ("roxford5k", "rparis6k")
DISTRACTOR_DATASETS = ("revisitop1m",)
# cirtorch makes test/roxford5k/jpg a symlink to test/oxford5k/jpg (same images), likewise for Paris.
REVISITED_IMAGES_FROM = {"roxford5k": "oxford5k", "rparis6k": "paris6k"}
ALL_DATASETS = TRAIN_DATASETS + TEST_DATASETS + DISTRACTOR_DATASETS
# Training sets whose images and train/val db are another's: cirtorch's SfM-30k has only a whitening pkl.
SHARES_DB_OF = {"retrieval-SfM-30k": "retrieval-SfM-120k"}
# A training set made by `amldist data import` takes any such name and lives in ROOT/train/<name>/ with its
# own ims/, <name>.pkl and <name>-whiten.pkl (it may also take the name retrieval-SfM-120k).
IMPORTED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# The splits each kind of dataset is made of (shards are written per split).
TRAIN_SPLITS = ("train", "val", "whiten")
TEST_SPLITS = ("db", "query")
DISTRACTOR_SPLITS = ("db",)


def is_imported_name(name: str) -> bool:
    """True for a name that can only be an imported training set (not one of the public datasets)."""
    return name not in ALL_DATASETS and IMPORTED_NAME.fullmatch(name) is not None


def check_dataset(name: str, allowed: tuple[str, ...] | None = None) -> str:
    """`name` when it is one of `allowed`; by default any public dataset or imported training set."""
    if allowed is not None and name not in allowed:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(allowed)}")
    if allowed is None and not (name in ALL_DATASETS or is_imported_name(name)):
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(ALL_DATASETS)} or the name of a "
                        "training set made by `amldist data import` (letters, digits, '.', '_', '-')")
    return name


def dataset_kind(name: str) -> str:
    """'train', 'test' or 'distractors'."""
    check_dataset(name)
    if name in TRAIN_DATASETS or is_imported_name(name):
        return "train"
    return "test" if name in TEST_DATASETS else "distractors"


def splits_of(name: str) -> tuple[str, ...]:
    return {"train": TRAIN_SPLITS, "test": TEST_SPLITS, "distractors": DISTRACTOR_SPLITS}[dataset_kind(name)]


def cid2filename(cid: str, prefix: str | Path) -> Path:
    """SfM-120k image path of a cid: prefix/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid (no extension)."""
    return Path(prefix) / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def train_dir(root: str | Path, name: str) -> Path:
    return Path(root) / "train" / name


def train_images_dir(root: str | Path, name: str) -> Path:
    # retrieval-SfM-30k shares the SfM-120k images (cirtorch links its ims/ to ../retrieval-SfM-120k/ims).
    return train_dir(root, SHARES_DB_OF.get(name, name)) / "ims"


def train_images_link(root: str | Path, name: str) -> Path:
    """The ims/ entry inside a training dataset's own folder (for SfM-30k, cirtorch's symlink to
    SfM-120k's)."""
    return train_dir(root, name) / "ims"


def train_db_path(root: str | Path, name: str) -> Path:
    base = SHARES_DB_OF.get(name, name)
    return train_dir(root, base) / f"{base}.pkl"


def whiten_db_path(root: str | Path, name: str) -> Path:
    return train_dir(root, name) / f"{name}-whiten.pkl"


def test_dir(root: str | Path, name: str) -> Path:
    return Path(root) / "test" / name


def test_images_dir(root: str | Path, name: str) -> Path:
    return test_dir(root, name) / "jpg"


def test_images_owner(name: str) -> str:
    """The test set whose jpg/ really holds `name`'s images (the revisited sets link to the old ones)."""
    return REVISITED_IMAGES_FROM.get(name, name)


def gnd_path(root: str | Path, name: str) -> Path:
    return test_dir(root, name) / f"gnd_{name}.pkl"


def distractor_dir(root: str | Path, name: str = "revisitop1m") -> Path:
    return Path(root) / "datasets" / name


def distractor_images_dir(root: str | Path, name: str = "revisitop1m") -> Path:
    return distractor_dir(root, name) / "jpg"


def distractor_list_path(root: str | Path, name: str = "revisitop1m") -> Path:
    return distractor_dir(root, name) / f"{name}.txt"


def shards_dir(root: str | Path, name: str, image_size: int) -> Path:
    """Default home of a dataset's shards: ROOT/shards/<name>-<image_size>/ (one folder per split below)."""
    return Path(root) / "shards" / f"{name}-{image_size}"
