"""The miner: placement options (no Ray), the plain Miner against the library rules, and the typed client
over the Ray actor answering like the plain miner, found by name, surviving a kill between calls and in
the middle of one with the same answers, and a soak of concurrent clients."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from amldist import mining
from amldist.errors import UserError
from amldist.feature_store import write_feature_store
from amldist.miner_actor import MAX_RESTARTS, Miner, MinerClient, miner_options

ray = pytest.importorskip("ray")

NUM_CLUSTERS, PER_CLUSTER, DIM, POOL = 40, 10, 16, 150


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A split of 400 images in 40 clusters, its teacher store, and student anchors.

    Integer-valued vectors (exact in float16 and in float32 products) keep every ranking unambiguous."""
    rng = np.random.default_rng(11)
    clusters = np.repeat(np.arange(NUM_CLUSTERS), PER_CLUSTER)
    centers = rng.integers(-300, 300, size=(NUM_CLUSTERS, DIM))
    teacher = (centers[clusters] + rng.integers(-60, 60, size=(len(clusters), DIM))).astype(np.float32)
    root = tmp_path_factory.mktemp("miner")
    write_feature_store(root / "store", teacher, network="t.pth", network_sha256="0" * 64,
                        architecture="vgg16", image_size=64, scales=[1.0], dataset="synth", split="train")
    val = teacher[:50] * 2
    write_feature_store(root / "val", val, network="t.pth", network_sha256="0" * 64, architecture="vgg16",
                        image_size=64, scales=[1.0], dataset="synth", split="val")
    anchor_ids = rng.choice(len(clusters), 30, replace=False)
    anchor_vecs = teacher[anchor_ids] + rng.integers(-30, 30, size=(30, DIM)).astype(np.float32)
    return {"clusters": clusters, "teacher": teacher, "store": str(root / "store"), "root": root,
            "val": val, "val_store": str(root / "val"), "anchor_ids": anchor_ids, "anchor_vecs": anchor_vecs}


def expected_negatives(case, pool_ids, pool_vecs, num_negatives=5):
    clusters = case["clusters"]
    return mining.select_hard_negatives(case["anchor_vecs"], pool_vecs, pool_ids, clusters[pool_ids],
                                        clusters[case["anchor_ids"]], num_negatives)


def test_miner_options_follow_cluster_resources():
    gpu_cluster = miner_options({"CPU": 16, "GPU": 2, "miner": 1}, name="m")
    assert gpu_cluster["num_gpus"] == 1 and gpu_cluster["resources"] == {"miner": 1}
    assert gpu_cluster["name"] == "m" and gpu_cluster["max_restarts"] == MAX_RESTARTS > 0
    assert gpu_cluster["max_task_retries"] == MAX_RESTARTS and gpu_cluster["num_cpus"] == 0
    cpu_cluster = miner_options({"CPU": 2}, name="m")
    assert "num_gpus" not in cpu_cluster and "resources" not in cpu_cluster
    # a fraction is no whole GPU to hold
    assert "num_gpus" not in miner_options({"CPU": 8, "GPU": 0.5}, name="m")


@pytest.mark.parametrize("backend", ["faiss-cpu", "auto"])
def test_plain_miner_answers_like_the_library(case, backend):
    miner = Miner(case["clusters"], case["store"], pool_size=POOL, backend=backend)
    pool_ids = miner.new_epoch(3, seed=7)
    np.testing.assert_array_equal(
        pool_ids, mining.sample_pool(len(case["clusters"]), POOL, mining.epoch_rng(7, 3, mining.POOL_STREAM)))
    got = miner.hard_negatives(case["anchor_ids"], case["anchor_vecs"], 5)
    want = expected_negatives(case, pool_ids, case["teacher"][pool_ids])
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == pytest.approx(want[1])
    # the search is kept for the epoch
    again = miner.hard_negatives(case["anchor_ids"], case["anchor_vecs"], 5)
    np.testing.assert_array_equal(again[0], got[0])
    assert miner.stats()["mine_calls"] == 2 and miner.stats()["anchors_mined"] == 60


def test_plain_miner_random_negatives_teacher_vectors_and_errors(case):
    miner = Miner(case["clusters"], case["store"], case["val_store"], pool_size=POOL, backend="faiss-cpu")
    with pytest.raises(RuntimeError, match="new_epoch"):
        miner.hard_negatives(case["anchor_ids"], case["anchor_vecs"], 5)
    pool_ids = miner.new_epoch(0, seed=1)
    first = miner.random_negatives(case["anchor_ids"], 5, mining.RANDOM_CLUSTERS, 4)
    np.testing.assert_array_equal(first,
                                  miner.random_negatives(case["anchor_ids"], 5, mining.RANDOM_CLUSTERS, 4))
    assert not np.array_equal(first, miner.random_negatives(case["anchor_ids"], 5, mining.RANDOM_CLUSTERS, 5))
    assert np.isin(first, pool_ids).all()
    assert not (case["clusters"][first] == case["clusters"][case["anchor_ids"]][:, None]).any()
    uniform = miner.random_negatives(case["anchor_ids"], 6, mining.RANDOM_EXAMPLES, 0)
    assert uniform.shape == (30, 6) and not (uniform == case["anchor_ids"][:, None]).any()
    ids = np.array([3, 49, 0])
    np.testing.assert_array_equal(miner.teacher_vectors(ids), case["teacher"][ids])
    np.testing.assert_array_equal(miner.teacher_vectors(ids, "val"), case["val"][ids])
    with pytest.raises(IndexError):
        miner.teacher_vectors(np.array([50]), "val")  # the val split is smaller
    with pytest.raises(UserError, match="split"):
        miner.teacher_vectors(ids, "test")
    with pytest.raises(UserError, match="without the teacher's val features"):
        Miner(case["clusters"], case["store"]).teacher_vectors(ids, "val")
    with pytest.raises(UserError, match="holds 400 images"):
        Miner(case["clusters"][:-1], case["store"])


def test_plain_miner_restores_its_epoch_from_state_dir(case, tmp_path):
    first = Miner(case["clusters"], case["store"], pool_size=POOL, state_dir=str(tmp_path),
                  backend="faiss-cpu")
    pool_ids = first.new_epoch(5, seed=2)
    reborn = Miner(case["clusters"], case["store"], pool_size=POOL, state_dir=str(tmp_path),
                   backend="faiss-cpu")
    assert reborn.restored and reborn.epoch == 5
    np.testing.assert_array_equal(reborn.pool_ids, pool_ids)
    state_file = next(tmp_path.iterdir())
    for damaged in ("{not json", '{"epoch": 5}', '{"epoch": "x", "seed": 2}', "[]"):
        state_file.write_text(damaged)  # a miner state not written by the miner: start fresh, do not crash
        fresh = Miner(case["clusters"], case["store"], pool_size=POOL, state_dir=str(tmp_path),
                      backend="faiss-cpu")
        assert not fresh.restored
        assert np.array_equal(fresh.new_epoch(5, seed=2), pool_ids)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, resources={"miner": 1}, include_dashboard=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
def teacher_rows_via_name(name, ids):
    """What a training worker does: find the miner by name and ask it for rows."""
    return MinerClient.connect(name).teacher_vectors(ids)


def test_the_client_over_the_actor_answers_like_the_plain_miner_and_survives_a_kill(case, ray_session):
    from amldist.miner_actor import start_miner

    actor = start_miner(case["clusters"], case["store"], case["val_store"], name="test-miner", pool_size=POOL,
                        state_dir=str(case["root"] / "state"))
    client = MinerClient.connect("test-miner")
    plain = MinerClient(Miner(case["clusters"], case["store"], case["val_store"], pool_size=POOL))
    assert client.wait_s == 0.0
    pool_ids = client.new_epoch(2, 9)
    np.testing.assert_array_equal(pool_ids, plain.new_epoch(2, 9))
    mined = client.hard_negatives(case["anchor_ids"], case["anchor_vecs"], 5)
    want = plain.hard_negatives(case["anchor_ids"], case["anchor_vecs"], 5)
    np.testing.assert_array_equal(mined[0], want[0])
    assert mined[1] == pytest.approx(want[1]) and client.wait_s > 0
    ids = np.array([0, 399, 17])
    np.testing.assert_array_equal(ray.get(teacher_rows_via_name.remote("test-miner", ids)),
                                  case["teacher"][ids])
    np.testing.assert_array_equal(client.teacher_vectors(ids[[0, 2]], "val"), case["val"][ids[[0, 2]]])
    drawn = client.random_negatives(case["anchor_ids"], 5, mining.RANDOM_CLUSTERS, 3)
    np.testing.assert_array_equal(drawn,
                                  plain.random_negatives(case["anchor_ids"], 5, mining.RANDOM_CLUSTERS, 3))
    before = client.stats()
    # it holds the resource
    assert before["restored"] is False and ray.available_resources().get("miner", 0) == 0

    os.kill(before["pid"], signal.SIGKILL)  # a crash; the next calls are retried once Ray has restarted it
    again = client.hard_negatives(case["anchor_ids"], case["anchor_vecs"], 5)
    after = client.stats()
    assert after["pid"] != before["pid"] and after["restored"] and after["epoch"] == 2
    np.testing.assert_array_equal(again[0], mined[0])
    assert again[1] == pytest.approx(mined[1])
    np.testing.assert_array_equal(client.random_negatives(case["anchor_ids"], 5, mining.RANDOM_CLUSTERS, 3),
                                  drawn)
    ray.kill(actor, no_restart=True)


def test_a_miner_killed_in_the_middle_of_mining_restarts_and_the_call_is_retried(case, ray_session, tmp_path):
    """The call in flight when the process dies is run again by the restarted miner (max_task_retries), which
    has reloaded its stores and the epoch from state_dir: the epoch's mining is retried, not skipped."""
    marker = tmp_path / "mining.pid"

    class LingeringMiner(Miner):
        """The real miner, whose first hard-negative search says where it runs and lingers there."""

        def hard_negatives(self, *args):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(300)
            return super().hard_negatives(*args)

    options = miner_options(ray.cluster_resources(), "lingering-miner")  # the restart policy of start_miner
    actor = ray.remote(LingeringMiner).options(**options).remote(
        case["clusters"], case["store"], case["val_store"], POOL, str(tmp_path / "state"), "faiss-cpu")
    client = MinerClient.connect("lingering-miner")
    plain = Miner(case["clusters"], case["store"], pool_size=POOL)
    client.new_epoch(6, 3)
    plain.new_epoch(6, 3)
    with ThreadPoolExecutor(1) as pool:
        mining = pool.submit(client.hard_negatives, case["anchor_ids"], case["anchor_vecs"], 5)
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = int(marker.read_text())
        os.kill(killed, signal.SIGKILL)
        negatives, distance = mining.result(timeout=300)
    want = plain.hard_negatives(case["anchor_ids"], case["anchor_vecs"], 5)
    np.testing.assert_array_equal(negatives, want[0])
    assert distance == pytest.approx(want[1])
    stats = client.stats()
    assert stats["pid"] != killed and stats["restored"] and stats["epoch"] == 6
    assert stats["mine_calls"] == 1  # the retried call, run once by the new process
    ray.kill(actor, no_restart=True)


@ray.remote(num_cpus=0)
class SoakClient:
    """A training worker's side of the miner: random requests, each answer checked against a plain Miner."""

    def __init__(self, name, case, seed):
        self.miner = MinerClient.connect(name)
        self.case = case
        self.reference = Miner(case["clusters"], case["store"], case["val_store"], pool_size=POOL,
                               backend="faiss-cpu")
        self.reference.new_epoch(4, 11)
        self.rng = np.random.default_rng(seed)

    def run(self, seconds):
        calls, anchors, wrong = {"epoch": 0, "hard": 0, "random": 0, "vectors": 0}, 0, []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            kind = ("epoch", "hard", "random", "vectors")[int(self.rng.integers(4))]
            size = int(self.rng.integers(1, 40))
            ids = self.rng.choice(len(self.case["clusters"]), size=size, replace=False)
            if kind == "epoch":  # every rank starts every epoch: the same (epoch, seed) again
                same = np.array_equal(self.miner.new_epoch(4, 11), self.reference.pool_ids)
            elif kind == "hard":
                noise = self.rng.integers(-30, 30, size=(len(ids), DIM)).astype(np.float32)
                vecs = self.case["teacher"][ids] + noise
                got = self.miner.hard_negatives(ids, vecs, 5)
                want = self.reference.hard_negatives(ids, vecs, 5)
                same = np.array_equal(got[0], want[0]) and np.isclose(got[1], want[1])
                anchors += len(ids)
            elif kind == "random":
                key = int(self.rng.integers(1000))
                same = np.array_equal(self.miner.random_negatives(ids, 4, mining.RANDOM_CLUSTERS, key),
                                      self.reference.random_negatives(ids, 4, mining.RANDOM_CLUSTERS, key))
            else:
                split = ("train", "val")[int(self.rng.integers(2))]
                ids = ids[ids < 50] if split == "val" else ids
                same = np.array_equal(self.miner.teacher_vectors(ids, split),
                                      self.reference.teacher_vectors(ids, split))
            calls[kind] += 1
            if not same:
                wrong.append((kind, ids.tolist()))
        return calls, anchors, wrong


@pytest.mark.slow
def test_a_soak_of_concurrent_clients_gets_every_answer_once_and_right(case, ray_session):
    from amldist.miner_actor import start_miner

    actor = start_miner(case["clusters"], case["store"], case["val_store"], name="soak-miner", pool_size=POOL,
                        backend="faiss-cpu")
    MinerClient.connect("soak-miner").new_epoch(4, 11)
    clients = [SoakClient.remote("soak-miner", case, seed) for seed in range(3)]
    results = ray.get([client.run.remote(8.0) for client in clients], timeout=600)  # none lost: all come back
    assert all(wrong == [] and sum(calls.values()) > 0 for calls, _, wrong in results), results
    assert all(sum(calls[kind] for calls, _, _ in results) > 0 for kind in results[0][0])  # every kind asked
    stats = MinerClient.connect("soak-miner").stats()
    assert stats["mine_calls"] == sum(calls["hard"] for calls, _, _ in results)  # none run twice
    assert stats["anchors_mined"] == sum(anchors for _, anchors, _ in results)
    for client in clients:
        ray.kill(client)
    ray.kill(actor, no_restart=True)


def test_features_spread_over_ray_tasks_equal_one_process(ray_session, tmp_path):
    from test_feature_store import make_teacher_split

    from amldist.feature_store import FeatureStore
    from amldist.teacher_features import compute_features

    split, network = make_teacher_split(tmp_path)
    spread = compute_features(network, split, tmp_path / "by-ray", num_workers=2, batch_size=2)
    alone = compute_features(network, split, tmp_path / "alone", num_workers=0)
    np.testing.assert_allclose(spread.vectors(np.arange(7)), alone.vectors(np.arange(7)), atol=2e-3)
    assert FeatureStore.open(tmp_path / "by-ray").manifest["count"] == 7
