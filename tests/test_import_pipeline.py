"""From generated landmark folders to training: `data synth --layout folders` -> `data import` ->
`data shards` (local processes, and the same bytes from Ray workers) -> a short training run of the
one-process trainer."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from amldist.cli.main import main
from amldist.datasets.importing import ImportOptions, RunSettings, import_folders
from amldist.shards import shard_dataset
from amldist.synth import generate

REPO = Path(__file__).resolve().parents[1]
NAME = "my-landmarks"
IMAGE_SIZE = 64
IMPORTED = ImportOptions(min_side=16, val_fraction=0.25)


@pytest.fixture(scope="module")
def imported_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    generate(root, "micro", seed=0, workers=1, layout_name="folders")
    assert main(["data", "import", "--images", str(root / "landmarks"), "--root", str(root), "--name", NAME,
                 "--min-side", str(IMPORTED.min_side), "--val-fraction", str(IMPORTED.val_fraction),
                 "--workers", "0"]) == 0
    assert main(["data", "shards", "--root", str(root), "--dataset", NAME, "--image-size", str(IMAGE_SIZE),
                 "--workers", "0"]) == 0
    return root


def test_synth_layouts_are_part_of_the_root_identity(imported_root, capsys):
    record = json.loads((imported_root / "synth.json").read_text())
    assert record["layout"] == "folders" and record["complete"]
    assert not (imported_root / "train" / "retrieval-SfM-120k").exists()  # no SfM files in this layout
    assert main(["data", "synth", "--root", str(imported_root), "--preset", "micro", "--layout",
                 "gldv2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layout folders" in err and "--overwrite" in err


@pytest.mark.slow
def test_ray_workers_import_and_shard_the_same_bytes_as_local_processes(imported_root, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:  # one Ray for both steps (each joins a running Ray instead of starting its own)
        import_folders(imported_root / "landmarks", tmp_path / "data", NAME, IMPORTED,
                       RunSettings(ray_workers=2))
        manifests = shard_dataset(imported_root, NAME, out=tmp_path / "ray", image_size=IMAGE_SIZE,
                                  # several shards for 2 workers
                                  splits=["train"], ray_workers=2, shard_count=8)
    finally:
        ray.shutdown()
    for suffix in (".pkl", "-whiten.pkl", "-images.tsv"):
        ours = tmp_path / "data" / "train" / NAME / f"{NAME}{suffix}"
        assert ours.read_bytes() == (imported_root / "train" / NAME / f"{NAME}{suffix}").read_bytes()
    local = tmp_path / "local"
    shard_dataset(imported_root, NAME, out=local, image_size=IMAGE_SIZE, splits=["train"], workers=0,
                  shard_count=8)
    for split, manifest in manifests.items():
        assert manifest["num_samples"] > 0 and manifest["num_shards"] > 2
        theirs = json.loads((local / split / "manifest.json").read_text())
        assert manifest["shards"] == theirs["shards"] and manifest["index_sha256"] == theirs["index_sha256"]
        for path in (local / split).glob("*.tar"):
            assert (tmp_path / "ray" / split / path.name).read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_a_short_training_run_on_the_imported_set(imported_root, tmp_path):
    config = {"data": {"root": str(imported_root), "dataset": NAME, "image_size": IMAGE_SIZE, "workers": 0},
              "model": {"arch": "mini_cnn", "pooling": "gem", "pretrained": False, "teacher": None},
              "loss": {"name": "contrastive", "asym": False},
              "mining": {"num_negatives": 2, "queries_per_epoch": 20, "pool_size": 30},
              "optim": {"optimizer": "adam", "lr": 1e-3},
              "run": {"epochs": 1, "batch_size": 5, "num_workers": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "metrics.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train_one_process.py"), "--config",
                           str(tmp_path / "run.yaml"), "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (epoch,) = json.loads(out.read_text())["epochs"]
    assert epoch["tuples"] == 20 and np.isfinite(epoch["loss"]) and epoch["avg_neg_distance"] > 0
    assert 0 <= epoch["val_map_sym"] <= 100
