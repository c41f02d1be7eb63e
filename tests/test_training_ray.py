"""End-to-end training on Ray: 2 CPU workers on a small synthetic set (64 px images, small_cnn student and
a random small_cnn teacher, tests/training_data.py), sym and asym, Contr+ and Reg; checkpoints, resume,
recovery from a worker process killed mid-epoch, and the errors a retry cannot cure (a corrupt shard
sample, an infinite loss), which end the run at once.

Every run gets `max_failures=0` unless it tests a recovery, so that no test passes through a silent retry.

The teacher is a randomly initialised small_cnn: its descriptors rank the val set clearly above chance, so a
student that learns the teacher's space raises asym val mAP over the untrained student, whose space is
unrelated to the teacher's.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid

import numpy as np
import pytest
from train_data import make_config, shard_folder

from amldist.checkpoints import safe_torch_load
from amldist.errors import UserError
from amldist.feature_store import MANIFEST, file_sha256
from amldist.miner_actor import Miner, MinerClient
from amldist.shards import manifest as mf
from amldist.training.epoch import Trainer
from amldist.training.family import tuple_family
from amldist.training.paths import default_store_dir, read_labels, resolve_paths
from amldist.training.plan import draw_epoch_tuples
from amldist.training.state import BEST_FILE, CHECKPOINT_FILE
from amldist.wandb_log import read_events, read_metrics

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
from amldist.driver import run_training

# Ray Train gives a worker group 60 s to start; on a busy 2-core machine that is not always enough.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    yield
    ray.shutdown()


def untrained_scores(config):
    """Val mAP of the run's initial student (seeded by run.seed), computed in this process."""
    paths = resolve_paths(config)
    train_labels, _ = read_labels(paths)
    miner = Miner(train_labels.clusters, paths.train_store, paths.val_store, pool_size=60)
    trainer = Trainer(config, paths, MinerClient(miner))
    return trainer.validate()


def train(config, storage, name=None, max_failures=0, **options):
    """One run; no retry unless a test asks for one (and then checks that it happened)."""
    name = name or f"t-{uuid.uuid4().hex[:8]}"
    result = run_training(config, storage=str(storage), name=name, max_failures=max_failures, **options)
    return result, storage / name


def check_improves_asym(config, run_dir, result, epochs):
    before = untrained_scores(config)["val_map_asym"]
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == list(range(epochs))
    assert all(np.isfinite(r["loss"]) and r["tuples"] == 60 for r in records)
    assert result.checkpoint is not None and (run_dir / BEST_FILE).is_file()
    best = result.return_value
    assert best["best_metric"] == "val_map_asym"
    assert best["best_score"] == max(r["val_map_asym"] for r in records)
    assert best["best_score"] > before + 4.0, (before, [r["val_map_asym"] for r in records])
    return records


def test_contrplus_asym_improves_and_resumes_with_the_optimiser_state(data_root, ray_session, tmp_path):
    config = make_config(data_root, "contrastive_plus", epochs=3)
    first, run_dir = train(config, tmp_path, name="contrplus")
    records = check_improves_asym(config, run_dir, first, epochs=3)
    assert all(r["avg_neg_distance"] > 0 for r in records)  # hard negatives were mined
    assert safe_torch_load(first.checkpoint.path + "/" + CHECKPOINT_FILE)["epoch"] == 3

    # The same name and storage again, with one more epoch: it continues at epoch 3.
    longer = dataclasses.replace(config, run=dataclasses.replace(config.run, epochs=4))
    second, _ = train(longer, tmp_path, name="contrplus")
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[3]["lr"] == pytest.approx(1e-3 * 0.99 ** 4)  # the schedule went on
    state = safe_torch_load(second.checkpoint.path + "/" + CHECKPOINT_FILE)
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {4 * 6}  # 6 steps per epoch: the optimiser state of epochs 0-2 was carried over


def kill_when_paused(run_dir, epoch, seen):
    """The test's side of `pause_at_epoch`: wait for the paused worker's pid, note what metrics.jsonl holds
    then, and kill that process with SIGKILL (no clean-up of any kind in it)."""
    marker = run_dir / f"pause-epoch{epoch}.pid"
    deadline = time.monotonic() + 600
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen["metrics"] = (run_dir / "metrics.jsonl").read_text().splitlines()
    seen["pid"] = int(marker.read_text())
    os.kill(seen["pid"], signal.SIGKILL)


def test_regression_recovers_from_a_worker_killed_mid_epoch_and_improves(data_root, ray_session, tmp_path):
    config = make_config(data_root, "regression", epochs=4)
    name, seen = "killed", {}
    killer = threading.Thread(target=kill_when_paused, args=(tmp_path / name, 2, seen), daemon=True)
    killer.start()
    result, run_dir = train(config, tmp_path, name=name, pause_at_epoch=2, max_failures=1)
    killer.join(timeout=5)
    assert result.error is None and seen["pid"] > 0  # the worker was killed (after its first step of epoch 2)
    with pytest.raises(ProcessLookupError):
        os.kill(seen["pid"], 0)
    check_improves_asym(config, run_dir, result, epochs=4)  # every epoch logged once
    starts = [e for e in read_events(run_dir) if e["event"] == "start"]
    assert [s["epochs_done"] for s in starts] == [0, 2]  # one restart, at the epoch in flight
    assert starts[1]["resumed_from"].endswith("checkpoint_epoch0002")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == seen["metrics"] and len(seen["metrics"]) == 2  # epochs 0-1 were not trained again
    state = safe_torch_load(result.checkpoint.path + "/" + CHECKPOINT_FILE)
    assert state["epoch"] == 4 and state["metrics"]["progress"]["global_step"] == 4 * 6


def test_sym_training_with_two_workers(data_root, ray_session, tmp_path):
    config = make_config(data_root, "contrastive", epochs=3)
    before = untrained_scores(config)["val_map_sym"]
    result, run_dir = train(config, tmp_path)
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all("val_map_asym" in r for r in records)  # a teacher is set: asym testing is reported too
    assert result.return_value["best_metric"] == "val_map_sym"
    assert result.return_value["best_score"] > before, (before, [r["val_map_sym"] for r in records])
    state = safe_torch_load(result.checkpoint.path + "/" + CHECKPOINT_FILE)
    assert state["epoch"] == 3 and state["metrics"]["progress"]["global_step"] == 3 * 6


def only_start(run_dir):
    """The run's workers started once: Ray Train did not retry."""
    return [e["event"] for e in read_events(run_dir)] == ["start", "stopped"]


def test_a_garbled_shard_sample_ends_the_run_at_once_naming_the_shard(data_root, ray_session, tmp_path):
    """Not retried as a transient failure: one line naming the shard file and the command that rewrites it."""
    shards = shutil.copytree(shard_folder(data_root), tmp_path / "shards")
    table = np.load(shards / "train" / mf.INDEX_NAME)
    row = table[table[:, mf.COLUMN["index"]] == 12][0]
    offset, size = int(row[mf.COLUMN["jpg_offset"]]), int(row[mf.COLUMN["jpg_size"]])
    with open(shards / "train" / "train-000000.tar", "r+b") as handle:  # same size: passes the up-front check
        handle.seek(offset)
        handle.write(b"\xff" * size)
    config = make_config(data_root, "contrastive_plus", epochs=2, data={"shards": str(shards)})
    name = "garbled"
    with pytest.raises(UserError) as caught:
        train(config, tmp_path, name=name, max_failures=2)  # retries allowed, and none happens
    message = str(caught.value)
    assert "\n" not in message
    assert f"sample 12 in shard {shards / 'train' / 'train-000000.tar'} is corrupt" in message
    assert f"`amldist data shards --root {data_root} --dataset retrieval-SfM-120k --image-size 64" in message
    assert f"--out {shards}`" in message
    assert only_start(tmp_path / name) and not read_metrics(tmp_path / name)


def poisoned_store(data_root, config, folder):
    """A copy of the teacher's stores in which one training image's vector is infinite, an image that epoch
    1 of `config` trains on and epoch 0 does not; its manifest's checksum made to match, as a store written
    by a faulty teacher would be."""
    source = default_store_dir(make_config(data_root, "regression")).parent
    stores = shutil.copytree(source, folder)
    labels, _ = read_labels(resolve_paths(config))
    tuples = [draw_epoch_tuples(labels, tuple_family(config), config.mining.queries_per_epoch,
                                config.run.seed, epoch).anchors for epoch in (0, 1)]
    image = int(np.setdiff1d(tuples[1], tuples[0])[0])
    manifest = json.loads((stores / "train" / MANIFEST).read_text())
    array = stores / "train" / manifest["array_file"]
    vectors = np.load(array)
    vectors[image] = np.inf
    np.save(array, vectors)
    manifest["array_sha256"] = file_sha256(array)
    (stores / "train" / MANIFEST).write_text(json.dumps(manifest))
    return stores / "train"


def test_a_non_finite_loss_stops_at_its_step_naming_the_last_good_checkpoint(data_root, ray_session,
                                                                             tmp_path):
    config = make_config(data_root, "regression", epochs=2, mining={"queries_per_epoch": 20})
    store = poisoned_store(data_root, config, tmp_path / "features")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, teacher_features=str(store)))
    name = "inf"
    with pytest.raises(UserError) as caught:
        train(config, tmp_path, name=name, max_failures=2)
    run_dir = tmp_path / name
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(r"the loss became (nan|-?inf) at epoch 1, step [12] of 2", message), message
    assert f"the last good checkpoint is {run_dir}/checkpoint_epoch0001" in message
    assert only_start(run_dir)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0]  # nothing of epoch 1 was saved
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch*")) == ["checkpoint_epoch0001"]
    state = safe_torch_load(run_dir / "checkpoint_epoch0001" / CHECKPOINT_FILE)
    assert state["epoch"] == 1 and all(np.isfinite(v.numpy()).all() for v in state["state_dict"].values())


def test_the_one_process_trainer_runs_the_same_loop_without_ray(data_root, tmp_path, monkeypatch):
    """scripts/train_one_process.py (for GPU machines without Ray): Contr+ asym under a gloo group of one."""
    import importlib.util
    import json

    from amldist.config import config_to_yaml

    spec = importlib.util.spec_from_file_location("train_one_process",
                                                  os.path.join(os.path.dirname(__file__), "..", "scripts",
                                                               "train_one_process.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The group's variables set here (the script would set them for good in this test process).
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(script.free_port()), "RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    config = make_config(data_root, "contrastive_plus", epochs=5)
    (tmp_path / "run.yaml").write_text(config_to_yaml(config))
    out = tmp_path / "metrics.json"
    assert script.main(["--config", str(tmp_path / "run.yaml"), "--device", "cpu", "--epochs", "3",
                        "--out", str(out)]) == 0
    epochs = json.loads(out.read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]  # --epochs overrides run.epochs
    assert all(e["tuples"] == 60 and e["avg_neg_distance"] > 0 and np.isfinite(e["loss"]) for e in epochs)
    before = untrained_scores(config)["val_map_asym"]
    assert max(e["val_map_asym"] for e in epochs) > before + 4.0
    # one-line error
    assert script.main(["--config", str(tmp_path / "run.yaml"), "--set", "optim.lr=-1"]) == 2


def test_a_batch_that_does_not_split_evenly_is_warned_about(caplog):
    from amldist.driver import _warn_uneven_batch

    with caplog.at_level("WARNING", logger="amldist.driver"):
        _warn_uneven_batch(10, 2)
        assert not caplog.records
        _warn_uneven_batch(5, 2)
    (record,) = caplog.records
    assert "ranks with 3 tuples" in record.getMessage() and "17%" in record.getMessage()
    assert "multiple of 2" in record.getMessage()
