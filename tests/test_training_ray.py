"""End-to-end training on Ray: 2 CPU workers on a small synthetic set (64 px images, small_cnn student and
a random small_cnn teacher), sym and asym, Contr+ and Reg; checkpoints, resume, recovery from a failure.

The teacher is a randomly initialised small_cnn: its descriptors rank the val set clearly above chance, so a
student that learns the teacher's space raises asym val mAP over the untrained student, whose space is
unrelated to the teacher's.
"""

import dataclasses
import os
import uuid

import numpy as np
import pytest
from train_data import make_config

from amldist.checkpoints import safe_torch_load
from amldist.miner_actor import Miner, MinerClient
from amldist.training.epoch import Trainer
from amldist.training.paths import read_labels, resolve_paths
from amldist.training.state import BEST_FILE, CHECKPOINT_FILE
from amldist.wandb_log import read_metrics

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
from amldist.driver import run_training

# Ray Train gives a worker group 60 s to start; on a busy 2-core machine that is not always enough.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
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


def train(config, storage, name=None, **options):
    name = name or f"t-{uuid.uuid4().hex[:8]}"
    # One retry by default: a transient failure of a busy machine resumes from the last checkpoint.
    return run_training(config, storage=str(storage), name=name, max_failures=options.pop("max_failures", 1),
                        **options), storage / name


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


def test_regression_recovers_from_a_failed_worker_and_improves(data_root, ray_session, tmp_path):
    config = make_config(data_root, "regression", epochs=4)
    result, run_dir = train(config, tmp_path, fail_at_epoch=2, max_failures=1)
    assert result.error is None
    check_improves_asym(config, run_dir, result, epochs=4)  # epoch 2 is logged once, after the retry
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
