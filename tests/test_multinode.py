"""A simulated multi-node cluster in one machine (ray.cluster_utils.Cluster): a head with no CPUs, a
miner node offering only `miner: 1`, and two trainer nodes. A tiny asym run places the miner on the
miner node and its train workers on a trainer node, checked through Ray's state API; then the node
holding a train worker is killed mid-run and the run continues from its last checkpoint on the rest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import pytest
from ray_head import stop_head
from train_data import make_config, make_train_data

from amldist.loopback_s3 import free_ports
from amldist.training.state import CHECKPOINT_FILE
from amldist.wandb_log import read_metrics

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from amldist.driver import run_training

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
WORKER_CLASS = "RayTrainWorker"


@pytest.fixture
def cluster(monkeypatch):
    # Cluster() writes the "latest cluster" address file into RAY_TMPDIR's ray/ folder: a private one, so
    # no plain ray.init() elsewhere on this machine joins (or, once it is gone, fails to join) this cluster.
    temp_dir = tempfile.mkdtemp(prefix="amlcl", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dashboard, agent, client = free_ports(3)  # distinct: Ray refuses a shared port
    head_args = {"num_cpus": 0, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
                 "include_dashboard": True, "dashboard_agent_listen_port": agent,
                 "ray_client_server_port": client}
    nodes = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        miner = nodes.add_node(num_cpus=0, resources={"miner": 1})
        trainers = [nodes.add_node(num_cpus=2), nodes.add_node(num_cpus=2)]
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, logging_level="ERROR",
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
        yield nodes, miner, trainers
    finally:
        ray.shutdown()
        nodes.shutdown()
        stop_head(temp_dir)  # anything of this cluster still running (e.g. workers of a killed raylet)
        shutil.rmtree(temp_dir, ignore_errors=True)


def actors_by_class(name: str, state: str | None = None) -> list:
    filters = [("class_name", "=", name)] + ([("state", "=", state)] if state else [])
    return list_actors(filters=filters, limit=1000, raise_on_missing_output=False)


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"gave up waiting for {what} after {timeout_s} s")


@pytest.mark.timeout(600, method="thread")  # a hard bound: Ray blocks the signal method
def test_placement_on_the_miner_node_and_recovery_from_a_lost_trainer_node(cluster, tmp_path):
    nodes, miner_node, trainers = cluster
    root = make_train_data(tmp_path / "data")
    config = make_config(root, "contrastive_plus", epochs=3)
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(result=run_training(
        config, storage=str(tmp_path / "runs"), name="multinode", max_failures=1, pause_at_epoch=1)),
        daemon=True)
    run.start()

    # Placement, as Ray's state API reports it.
    workers = wait_until(lambda: len(actors_by_class(WORKER_CLASS, "ALIVE")) == 2
                         and actors_by_class(WORKER_CLASS, "ALIVE"), 240, "two train workers")
    (miner,) = actors_by_class("Miner", "ALIVE")
    assert miner.node_id == miner_node.node_id
    trainer_ids = {node.node_id for node in trainers}
    worker_nodes = {worker.node_id for worker in workers}
    assert worker_nodes <= trainer_ids, (worker_nodes, trainer_ids)

    # Kill the node of a train worker while the run is held in epoch 1 (a worker waits after the epoch's
    # first step: on a quiet machine the tiny run could otherwise end before the node goes), with the
    # first checkpoint in storage.
    run_dir = tmp_path / "runs" / "multinode"
    first_checkpoint = run_dir / "checkpoint_epoch0001" / CHECKPOINT_FILE
    wait_until(first_checkpoint.is_file, 240, "the first checkpoint")
    wait_until((run_dir / "pause-epoch1.pid").is_file, 240, "a worker held in epoch 1")
    epoch0 = read_metrics(run_dir)[0]
    doomed = next(node for node in trainers if node.node_id == workers[0].node_id)
    nodes.remove_node(doomed, allow_graceful=False)
    survivor = next(node for node in trainers if node is not doomed)

    run.join(timeout=300)
    assert not run.is_alive(), "the run did not finish after the node loss"
    result = outcome["result"]
    assert result.error is None and result.return_value["epochs_done"] == 3
    assert result.checkpoint.path.endswith("checkpoint_epoch0003")
    # The new workers ran on the surviving trainer node, next to the miner that stayed where it was.
    restarted = [w for w in actors_by_class(WORKER_CLASS) if w.actor_id not in {x.actor_id for x in workers}]
    assert len(restarted) == 2 and {w.node_id for w in restarted} == {survivor.node_id}
    assert [m.node_id for m in actors_by_class("Miner")] == [miner_node.node_id]
    # It went on from the checkpoint: epoch 0's record is the one written before the loss, not a rerun.
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2] and records[0] == epoch0
