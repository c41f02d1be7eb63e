"""scripts/teacher_space_stats.py: the similarities a contrastive margin meets in a teacher's space."""

import importlib.util
from pathlib import Path

import numpy as np

from amldist.datasets.formats import SfmSplit, write_sfm_db
from amldist.feature_store import write_feature_store

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "teacher_space_stats.py"


def load_script():
    spec = importlib.util.spec_from_file_location("teacher_space_stats", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_positive_and_hard_negative_similarities_follow_the_mining_rules():
    script = load_script()
    # clusters 0, 0, 1, 1, 2: image 0's most similar other-cluster images are 2 and 3 (both cluster 1,
    # only one counts), then 4 (cluster 2).
    features = unit([[1, 0, 0], [0.6, 0.8, 0], [0.9, 0.1, 0.1], [0.8, 0.2, 0.2], [0.5, 0, 0.5]])
    clusters = np.array([0, 0, 1, 1, 2])
    positive, negative = script.similarities(features, np.array([0, 2]), np.array([1, 3]), clusters, 2)
    assert np.allclose(positive, [features[0] @ features[1], features[2] @ features[3]])
    assert np.allclose(negative[0], [features[0] @ features[2], features[0] @ features[4]])
    assert np.all(np.diff(negative, axis=1) <= 0)


def test_a_store_that_does_not_match_the_split_is_refused_with_exit_2(tmp_path, capsys):
    script = load_script()
    split = SfmSplit(cids=[f"c{i}" for i in range(4)], cluster=np.array([0, 0, 1, 1]),
                     qidxs=np.array([0, 2]), pidxs=np.array([1, 3]))
    write_sfm_db(tmp_path / "db.pkl", {"train": split, "val": split})
    write_feature_store(tmp_path / "store", unit(np.eye(3)), network="t", network_sha256="0" * 64,
                        architecture="small_cnn", image_size=64, scales=[1.0], dataset="retrieval-SfM-120k",
                        split="train")
    assert script.main(["--store", str(tmp_path / "store"), "--db", str(tmp_path / "db.pkl")]) == 2
    assert "3 vectors" in capsys.readouterr().err
    assert script.main(["--store", str(tmp_path / "store"), "--db", str(tmp_path / "db.pkl"),
                        "--split", "test"]) == 2


def test_the_report_lists_positives_and_each_negative_rank(tmp_path, capsys):
    script = load_script()
    split = SfmSplit(cids=[f"c{i}" for i in range(6)], cluster=np.array([0, 0, 1, 1, 2, 2]),
                     qidxs=np.array([0, 2, 4]), pidxs=np.array([1, 3, 5]))
    write_sfm_db(tmp_path / "db.pkl", {"train": split, "val": split})
    features = unit(np.random.default_rng(0).normal(size=(6, 8)))
    write_feature_store(tmp_path / "store", features, network="t", network_sha256="0" * 64,
                        architecture="small_cnn", image_size=64, scales=[1.0], dataset="retrieval-SfM-120k",
                        split="train")
    assert script.main(["--store", str(tmp_path / "store"), "--db", str(tmp_path / "db.pkl"),
                        "--neg-num", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 images, 3 pairs, 3 queries" in out and "hard negative 2" in out and "hard negative 3" not in out
