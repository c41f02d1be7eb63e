"""A small synthetic training set for the Ray tests: 64 px images, a random small_cnn teacher and its
feature stores, and the run config the tests train with (conftest's `data_root` builds one per session)."""

from pathlib import Path

import torch

from amldist.checkpoints import export_network_file
from amldist.config import config_from_dict
from amldist.nets import create_net
from amldist.shards import shard_dataset
from amldist.synth import presets as synth_presets
from amldist.synth.writer import generate
from amldist.teacher_features import compute_features
from amldist.training.paths import default_store_dir, prepare_inputs

IMAGE_SIZE = 64
# 10 training landmarks of 6 views, 5 val landmarks of 5 views, tiny test sets (unused here).
PRESET = synth_presets.Preset(
    "train-test", image_max_side=96, train_landmarks=10, train_views=6, val_landmarks=5, val_views=5,
    pairs_per_image=2, query_landmarks=1, queries_per_landmark=1, db_easy=1, db_hard=1, db_junk=0,
    lookalike_views=0, other_landmarks=0, other_views=1, distractors=1)


def make_train_data(root: Path) -> Path:
    """Synthesise, shard, and compute the teacher's features (train and val) into `root` (~2 s)."""
    generate_preset(root, PRESET)
    shard_dataset(root, "retrieval-SfM-120k", image_size=IMAGE_SIZE, splits=["train", "val"], workers=0)
    torch.manual_seed(1)
    export_network_file(root / "teacher.pth", create_net("small_cnn", "gem", None, pretrained=False))
    config = make_config(root, "contrastive_plus")
    compute_features(root / "teacher.pth", shard_folder(root) / "train", default_store_dir(config))
    prepare_inputs(config)  # also computes the val store
    return root


def generate_preset(root: Path, preset: synth_presets.Preset, seed: int = 0) -> None:
    """Synthesise a data set from a preset that is not in the registry (registered only meanwhile)."""
    synth_presets.PRESETS[preset.name] = preset
    try:
        generate(root, preset.name, seed=seed, workers=1)
    finally:
        del synth_presets.PRESETS[preset.name]


def shard_folder(root):
    return root / "shards" / f"retrieval-SfM-120k-{IMAGE_SIZE}"


def config_dict(root, loss, epochs=4, mining=None, data=None, **run):
    """The unresolved config of a run on the set (a search varies keys of it); `mining` and `data` update
    those sections, `run` keys the run section."""
    loss_section = {"name": loss}
    if loss.startswith("contr"):
        loss_section["asym"] = loss == "contrastive_plus"
    return {
        "data": {"root": str(root), "image_size": IMAGE_SIZE, "workers": 0, **(data or {})},
        "model": {"arch": "small_cnn", "pretrained": False, "teacher": str(root / "teacher.pth")},
        "loss": loss_section,
        "mining": {"num_negatives": 3, "queries_per_epoch": 60, "pool_size": 60, **(mining or {})},
        "optim": {"optimizer": "adam", "lr": 1e-3},
        "run": {"epochs": epochs, "batch_size": 10, "num_workers": 2, **run}}


def make_config(root, loss, epochs=4, mining=None, data=None, **run):
    """The tests' run config (finalized)."""
    return config_from_dict(config_dict(root, loss, epochs, mining, data, **run))
