"""A training run whose shards, teacher stores and checkpoints all live in an S3 bucket (moto's S3-API
server on loopback, reached through the standard AWS variables): it trains, writes its checkpoints to
the bucket, and a second run of the same name resumes from them."""

from __future__ import annotations

import dataclasses
import os

import pytest
from train_data import make_config, make_train_data, shard_folder

from amldist import node_cache, storage
from amldist.checkpoints import safe_torch_load
from amldist.errors import UserError
from amldist.feature_store import file_sha256
from amldist.nets.meta import TEACHER_KEY
from amldist.training.paths import resolve_paths
from amldist.training.state import CHECKPOINT_FILE
from amldist.wandb_log import read_metrics

ray = pytest.importorskip("ray")
pytest.importorskip("moto")
from amldist.driver import run_training
from amldist.loopback_s3 import loopback_s3

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """The training data root uploaded to s3://data/root; Ray started after the AWS variables are set,
    so its workers (and the miner) reach the same server."""
    root = make_train_data(tmp_path_factory.mktemp("s3-train-data"))
    cache = tmp_path_factory.mktemp("node-cache")
    saved = os.environ.get(node_cache.CACHE_VARIABLE)
    os.environ[node_cache.CACHE_VARIABLE] = str(cache)
    try:
        with loopback_s3(buckets=["data", "runs"]) as s3:
            storage.upload_tree(root, "s3://data/root")
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                     logging_config=ray.LoggingConfig(log_level="ERROR"))
            try:
                yield root, s3, cache
            finally:
                ray.shutdown()
    finally:
        if saved is None:
            os.environ.pop(node_cache.CACHE_VARIABLE, None)
        else:
            os.environ[node_cache.CACHE_VARIABLE] = saved


def remote_config(root, out_dir, epochs):
    # One worker: what is tested is where the data and checkpoints live; two-worker runs are tested elsewhere.
    config = make_config(root, "contrastive_plus", epochs=epochs, out_dir=str(out_dir), num_workers=1)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, root="s3://data/root"))


def test_inputs_in_the_bucket_are_checked_there(bucket, tmp_path):
    root, _, _ = bucket
    paths = resolve_paths(remote_config(root, tmp_path, 1))
    assert paths.train_shards == "s3://data/root/shards/retrieval-SfM-120k-64/train"
    assert paths.train_store.startswith("s3://data/root/features/") and paths.val_store.endswith("/val")
    config = remote_config(root, tmp_path, 1)
    missing = dataclasses.replace(config, data=dataclasses.replace(config.data, root="s3://data/elsewhere"))
    with pytest.raises(UserError, match="no training split file in s3://data/elsewhere/train/"):
        resolve_paths(missing)
    shards = "s3://data/short/shards"
    storage.upload_tree(shard_folder(root), shards)
    filesystem, tar = storage.filesystem(f"{shards}/val/val-000000.tar")
    filesystem.delete_file(tar)
    short = dataclasses.replace(config, data=dataclasses.replace(config.data, shards=shards))
    with pytest.raises(UserError, match=f"shard {shards}/val/val-000000.tar is missing; rewrite it with "
                                        "`amldist data shards "):
        resolve_paths(short)  # before any worker copies the split


@pytest.mark.timeout(600, method="thread")  # a hard bound: Ray blocks the signal method
def test_a_run_reads_the_bucket_writes_checkpoints_there_and_resumes(bucket, tmp_path):
    root, s3, cache = bucket
    first = run_training(remote_config(root, tmp_path, 1), storage="s3://runs/exp", name="s3run",
                         max_failures=0)
    assert first.checkpoint.path == "runs/exp/s3run/checkpoint_epoch0001"  # inside the bucket's filesystem
    keys = s3.keys("runs", "exp/s3run/")
    assert f"exp/s3run/checkpoint_epoch0001/{CHECKPOINT_FILE}" in keys
    # The workers and the miner read their node's checked copies of the shards and the stores.
    cached = {p.parent.name.rsplit("-", 1)[0] for p in cache.glob(f"*/{node_cache.MARKER}")}
    assert {"retrieval-SfM-120k-64-train", "retrieval-SfM-120k-64-val"} <= cached, cached
    assert sum(1 for p in cache.glob(f"*/{node_cache.MARKER}")) == 4  # 2 shard splits + 2 teacher stores

    # The same name and storage with one more epoch: Ray finds the run in the bucket and continues it.
    second = run_training(remote_config(root, tmp_path, 2), storage="s3://runs/exp", name="s3run",
                          max_failures=0)
    assert second.checkpoint.path == "runs/exp/s3run/checkpoint_epoch0002"
    assert [r["epoch"] for r in read_metrics(tmp_path / "s3run")] == [0, 1]  # epoch 0 was not trained again
    with second.checkpoint.as_directory() as folder:
        state = safe_torch_load(os.path.join(folder, CHECKPOINT_FILE))
    assert state["epoch"] == 2 and state["metrics"]["progress"]["global_step"] == 2 * 6
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {2 * 6}  # the optimiser state of epoch 0 came back from the bucket
    # The worker has no copy of the teacher store, yet the student records its teacher (amldist search).
    assert state["meta"][TEACHER_KEY]["network_sha256"] == file_sha256(root / "teacher.pth")
