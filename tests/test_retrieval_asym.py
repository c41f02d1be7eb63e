"""Asymmetric search end to end on a synthetic landmark set: a student trained against a teacher (regression,
in one process, the `Trainer` every Ray worker runs) queries a gallery the teacher indexed, exported to ONNX,
and finds the query's landmark in its top 10 for most queries; a student trained alone does not.

The teacher is a randomly initialised small_cnn, as in tests/test_training_ray.py (training one costs
minutes). At 96 px it finds a landmark for about 90 % of whole query photos but only 50-70 % of the box
crops of the revisited protocol, so the queries here are whole photos; the demo (`make search-demo`,
docs/SEARCH.md) runs the box-crop protocol with a trained teacher.
"""

from __future__ import annotations

import pytest
import torch
from train_data import generate_preset

from amldist.checkpoints import export_network_file, save_checkpoint
from amldist.config import config_from_dict
from amldist.datasets import formats, layout
from amldist.demo.search import chance_hit_rate, hit_rate
from amldist.errors import UserError
from amldist.extract import FileSource
from amldist.feature_store import file_sha256
from amldist.miner_actor import Miner, MinerClient
from amldist.nets import create_net
from amldist.nets.meta import TEACHER_KEY
from amldist.retrieval.export import export_query_network
from amldist.retrieval.gallery import shard_gallery
from amldist.retrieval.index import GalleryIndex, IndexSettings, build_index
from amldist.retrieval.query import AsymmetricSearch
from amldist.retrieval.query_net import load_query_network
from amldist.shards import shard_dataset
from amldist.synth import presets as synth_presets
from amldist.teacher_features import compute_features
from amldist.training.epoch import Trainer
from amldist.training.paths import default_store_dir, prepare_inputs, read_labels, resolve_paths
from amldist.training.state import Progress

pytestmark = pytest.mark.slow
SIZE = 96
EPOCHS = 8
STUDENT = "small_cnn"  # the teacher's own layers learn a random teacher's function fastest (mini_cnn: 15
                       # epochs for 56 % of the queries); the demo's students are the smaller mini_cnn
# 12 training landmarks of 6 views; test sets of 8 query landmarks, 2 queries each, 8 positives per query
# among about 250 database images (like the tiny demo's 11 among 400).
PRESET = synth_presets.Preset(
    "search-test", image_max_side=SIZE, train_landmarks=12, train_views=6, val_landmarks=4, val_views=4,
    pairs_per_image=2, query_landmarks=8, queries_per_landmark=2, db_easy=4, db_hard=4, db_junk=0,
    lookalike_views=2, other_landmarks=40, other_views=4, distractors=1)


def _config(root, loss: str, mining: str):
    loss_section = {"name": loss, **({"asym": False} if loss == "contrastive" else {})}
    return config_from_dict({
        "data": {"root": str(root), "image_size": SIZE, "workers": 0},
        "model": {"arch": STUDENT, "pretrained": False, "projection_dim": 128,
                  "teacher": str(root / "teacher.pth")},
        "loss": loss_section,
        "mining": {"kind": mining, "num_negatives": 3, "queries_per_epoch": 72, "pool_size": 72},
        "optim": {"optimizer": "adam", "lr": 3e-3},
        "run": {"epochs": EPOCHS, "batch_size": 8, "val_freq": 0}})


def _train(root, loss: str, mining: str, name: str):
    """Train in this process (no Ray): the loop of amldist.worker without the reporting."""
    config = _config(root, loss, mining)
    paths = resolve_paths(config)
    labels, _ = read_labels(paths)
    trainer = Trainer(config, paths, MinerClient(Miner(labels.clusters, paths.train_store, paths.val_store,
                                                       pool_size=72)))
    progress = Progress()
    for epoch in range(EPOCHS):
        trainer.run_epoch(epoch, progress)
    return save_checkpoint(root / f"{name}.pt", trainer.net, epoch=EPOCHS, config=config)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data, a random teacher and its features, the two students, the teacher's gallery index."""
    root = tmp_path_factory.mktemp("asym-search")
    generate_preset(root, PRESET)
    shard_dataset(root, "retrieval-SfM-120k", image_size=SIZE, splits=["train", "val"], workers=0)
    shard_dataset(root, "roxford5k", image_size=SIZE, splits=["db"], workers=0)
    torch.manual_seed(2)
    export_network_file(root / "teacher.pth", create_net("small_cnn", "gem", None, pretrained=False))
    config = _config(root, "regression", "none")
    compute_features(root / "teacher.pth", root / "shards" / f"retrieval-SfM-120k-{SIZE}" / "train",
                     default_store_dir(config))
    prepare_inputs(config)
    students = {"reg": _train(root, "regression", "none", "reg"),
                "alone": _train(root, "contrastive", "random", "alone")}
    gallery = shard_gallery(root / "shards" / f"roxford5k-{SIZE}" / "db")
    build_index(root / "teacher.pth", gallery, root / "index", IndexSettings(image_size=SIZE, workers=0))
    return root, students


def _whole_queries(root) -> FileSource:
    return FileSource([r.path for r in formats.list_images(root, "roxford5k")["query"]])  # no boxes


def test_trained_students_record_their_teacher(world):
    root, students = world
    teacher = load_query_network(students["reg"]).teacher
    assert teacher["network_sha256"] == file_sha256(root / "teacher.pth") and teacher["dim"] == 128
    assert teacher["architecture"] == "small_cnn"
    assert TEACHER_KEY not in load_query_network(students["alone"]).net.meta.extra  # symmetric: its own space


def test_asymmetric_student_finds_the_landmark_from_its_exported_file(world, tmp_path):
    root, students = world
    index = GalleryIndex.open(root / "index")
    truth = formats.read_gnd(layout.gnd_path(root, "roxford5k"))
    images = [r.path for r in formats.list_images(root, "roxford5k")["db"][:4]]
    onnx = export_query_network(students["reg"], tmp_path / "reg.onnx", "onnx", check_images=images).path
    def rate(network, skip=False) -> float:
        searcher = AsymmetricSearch(index, load_query_network(network), skip_teacher_check=skip)
        return hit_rate(searcher, truth, _whole_queries(root))

    rates = {"teacher": rate(root / "teacher.pth"), "exported": rate(onnx),
             "alone": rate(students["alone"], skip=True)}
    chance = chance_hit_rate(truth)
    assert rates["exported"] > 0.5, rates                             # most queries
    assert rates["exported"] >= rates["alone"] + 0.3, rates           # clearly more often than alone
    assert rates["alone"] < chance + 0.2, (rates, chance)             # alone: about a random ranking
    with pytest.raises(UserError, match="records no teacher"):
        AsymmetricSearch(index, load_query_network(students["alone"]))
