"""The miner: one named Ray actor, apart from the trainers, holding the teacher's side of a run.

It holds the teacher feature stores of the train and val splits (memory-mapped float16) and an exact
inner-product search over the epoch's random pool of teacher vectors, and answers the workers through
`MinerClient`: asymmetric hard negatives (student anchors against the teacher's pool), random negatives,
and teacher vectors of given images. Symmetric hard mining searches student vectors that every rank
already holds, so it happens in the workers (`amldist.training.epoch`), not here. Placement
(`miner_options`): one GPU when the cluster has one, the custom resource `miner` when the cluster
defines it, no CPU reserved.

Fault tolerance: Ray restarts a dead actor by running `__init__` again, which loses everything in
memory. So every answer is derived from inputs that survive: the stores on disk, and (seed, epoch),
persisted by `new_epoch` to `state_dir`; after a restart the pool, the search and the random draws are
rebuilt from them and the miner answers exactly as before.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amldist import mining, search
from amldist.atomic import atomic_write_json
from amldist.errors import UserError
from amldist.feature_store import FeatureStore
from amldist.node_cache import cached_copy

log = logging.getLogger(__name__)

STATE_FILE = "miner-state.json"
SPLITS = ("train", "val")
MAX_RESTARTS = 3  # Ray restarts a crashed miner this often, and retries the calls that were in flight


def miner_options(cluster_resources: Mapping[str, float], name: str) -> dict[str, Any]:
    """Ray actor options for the miner on a cluster with `cluster_resources` (as `ray.cluster_resources()`).

    No CPU is reserved: the miner works in short bursts once per epoch, and a reserved core would sit
    idle between them while the trainers wait for it.
    """
    options: dict[str, Any] = {"name": name, "num_cpus": 0, "max_restarts": MAX_RESTARTS,
                               "max_task_retries": MAX_RESTARTS}
    if cluster_resources.get("GPU", 0) >= 1:
        options["num_gpus"] = 1
    if cluster_resources.get("miner", 0) >= 1:
        options["resources"] = {"miner": 1}
    return options


class Miner:
    """Mining service state; `start_miner` runs this class as a Ray actor (usable directly without Ray).

    clusters (N,): cluster of every image of the training split (index = dataset index).
    store_dir / val_store_dir: the teacher feature stores of the train and val splits (asym mining and
      teacher vectors need them; a run without a teacher has none).
    state_dir: where (seed, epoch) survive a restart; without it a restarted miner needs `new_epoch` again.
    """

    def __init__(self, clusters: np.ndarray, store_dir: str | None = None, val_store_dir: str | None = None,
                 pool_size: int = mining.DEFAULT_POOL_SIZE, state_dir: str | None = None,
                 backend: str = "auto"):
        self.clusters = np.asarray(clusters, dtype=np.int64)  # (N,)
        self.pool_size = int(pool_size)
        self.backend = search.choose_backend(backend)
        # A store URI: this node's checked copy (amldist.node_cache), memory-mapped like a local store.
        self.stores = {split: FeatureStore.open(cached_copy(folder), verify=split == "train")
                       for split, folder in zip(SPLITS, (store_dir, val_store_dir)) if folder}
        if "train" in self.stores and len(self.stores["train"]) != len(self.clusters):
            raise UserError(f"the teacher feature store holds {len(self.stores['train'])} images, "
                            f"the training split {len(self.clusters)}")
        self.state_path = Path(state_dir) / STATE_FILE if state_dir else None
        self.epoch: int | None = None
        self.seed: int | None = None
        self.pool_ids: np.ndarray | None = None  # (P,) image ids of this epoch's pool
        self._teacher_pool: tuple[search.SearchFn, np.ndarray] | None = None
        self._counters = {"mine_calls": 0, "anchors_mined": 0, "mine_seconds": 0.0,
                          "last_mean_distance": None}
        self.restored = self._restore_state()

    def _restore_state(self) -> bool:
        if self.state_path is None or not self.state_path.is_file():
            return False
        try:  # written atomically by new_epoch; anything else came from outside: start as a fresh miner
            state = json.loads(self.state_path.read_text())
            self._start_epoch(state["epoch"], state["seed"])
        except (ValueError, TypeError, KeyError) as err:
            log.warning("miner state %s is damaged (%s); ignoring it: the next epoch draws its pool anew",
                        self.state_path, err)
            return False
        log.info("miner restored epoch %d (seed %d) from %s", self.epoch, self.seed, self.state_path)
        return True

    def new_epoch(self, epoch: int, seed: int) -> np.ndarray:
        """Draw this epoch's pool from (seed, epoch) and remember both; returns the pool's image ids (P,)."""
        if self.state_path is not None:
            atomic_write_json(self.state_path, {"epoch": int(epoch), "seed": int(seed)})
        self._start_epoch(epoch, seed)
        return self.pool_ids

    def _start_epoch(self, epoch: int, seed: int) -> None:
        if (epoch, seed) == (self.epoch, self.seed):
            return  # the same epoch again (a retried call, several workers): keep the built search
        self.epoch, self.seed = int(epoch), int(seed)
        self.pool_ids = mining.epoch_pool(len(self.clusters), self.pool_size, self.seed, self.epoch)
        self._teacher_pool = None  # built by the first hard_negatives call of the epoch

    def hard_negatives(self, anchor_ids: np.ndarray, anchor_vecs: np.ndarray,
                       num_negatives: int) -> tuple[np.ndarray, float]:
        """Hard negatives (Q, num_negatives) image ids of anchors `anchor_ids` (Q,) with student vectors
        `anchor_vecs` (Q, D), searched among the teacher's vectors of this epoch's pool (asymmetric
        mining), and their mean L2 distance."""
        self._require_epoch()
        anchor_ids = self._check_ids(anchor_ids)
        pool_search, pool_vecs = self._teacher_pool_search()
        started = time.perf_counter()
        negatives, mean_distance = mining.select_hard_negatives(
            anchor_vecs, pool_vecs, self.pool_ids, self.clusters[self.pool_ids], self.clusters[anchor_ids],
            num_negatives, search=pool_search)
        self._count(len(anchor_ids), time.perf_counter() - started, mean_distance)
        return negatives, mean_distance

    def _teacher_pool_search(self) -> tuple[search.SearchFn, np.ndarray]:
        if self._teacher_pool is None:
            # (P, D) float16 rows read from the memory map; the search keeps a float32 copy (on the GPU
            # for faiss-gpu / torch-cuda), these stay half-size for the distance figure.
            half = np.asarray(self._store("train").features[self.pool_ids])
            self._teacher_pool = (search.searcher(half.astype(np.float32), self.backend), half)
        return self._teacher_pool

    def random_negatives(self, anchor_ids: np.ndarray, num_negatives: int, rule: str, key: int) -> np.ndarray:
        """Random negatives from this epoch's pool by `rule` (`mining.RANDOM_RULES`), (Q, num_negatives)
        image ids. `key` (e.g. the batch number) picks the random stream, so the same call gives the same
        answer, also after a restart."""
        self._require_epoch()
        return mining.draw_random_negatives(rule, self._check_ids(anchor_ids), self.pool_ids, self.clusters,
                                            num_negatives, self.seed, self.epoch, key)

    def teacher_vectors(self, ids: np.ndarray, split: str = "train") -> np.ndarray:
        """Teacher descriptors (len(ids), D) float32 of images `ids` of `split`, so that workers never
        load a whole store."""
        store = self._store(split)
        return store.vectors(self._check_ids(ids, len(store)))

    def stats(self) -> dict[str, Any]:
        train = self.stores.get("train")
        return {"pid": os.getpid(), "epoch": self.epoch, "seed": self.seed, "backend": self.backend,
                "pool_size": None if self.pool_ids is None else len(self.pool_ids),
                "num_images": len(self.clusters), "dim": None if train is None else train.dim,
                "restored": self.restored, **self._counters}

    def _store(self, split: str) -> FeatureStore:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        if split not in self.stores:
            raise UserError(f"this miner was started without the teacher's {split} features")
        return self.stores[split]

    def _require_epoch(self) -> None:
        if self.pool_ids is None:
            raise RuntimeError("the miner has no epoch yet: call new_epoch(epoch, seed) first")

    def _check_ids(self, ids: np.ndarray, count: int | None = None) -> np.ndarray:
        count = len(self.clusters) if count is None else count
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= count):
            raise IndexError(f"image ids must lie in [0, {count}), got {ids.min()}..{ids.max()}")
        return ids

    def _count(self, anchors: int, seconds: float, mean_distance: float) -> None:
        self._counters["mine_calls"] += 1
        self._counters["anchors_mined"] += anchors
        self._counters["mine_seconds"] += seconds
        self._counters["last_mean_distance"] = mean_distance


class MinerClient:
    """The workers' typed, timed view of a miner: a plain `Miner` in this process, or (`connect`) the
    Ray actor of that name. `wait_s` adds up the time spent waiting for answers."""

    def __init__(self, miner: Any, call: Callable[..., Any] | None = None):
        self._miner = miner
        self._call = call or (lambda method, *args: method(*args))
        self.wait_s = 0.0

    @classmethod
    def connect(cls, name: str) -> MinerClient:
        """The running miner actor `name` (workers share the driver's Ray namespace)."""
        import ray

        return cls(ray.get_actor(name), lambda method, *args: ray.get(method.remote(*args)))

    def new_epoch(self, epoch: int, seed: int) -> np.ndarray:
        return self._timed(self._miner.new_epoch, epoch, seed)

    def hard_negatives(self, anchor_ids: np.ndarray, anchor_vecs: np.ndarray,
                       num_negatives: int) -> tuple[np.ndarray, float]:
        negatives, distance = self._timed(self._miner.hard_negatives, anchor_ids, anchor_vecs, num_negatives)
        return np.asarray(negatives), float(distance)

    def random_negatives(self, anchor_ids: np.ndarray, num_negatives: int, rule: str, key: int) -> np.ndarray:
        return np.asarray(self._timed(self._miner.random_negatives, anchor_ids, num_negatives, rule, key))

    def teacher_vectors(self, ids: np.ndarray, split: str = "train") -> np.ndarray:
        # a writable copy: arrays from Ray's object store are read-only, and torch wants to own its rows
        return np.array(self._timed(self._miner.teacher_vectors, ids, split), np.float32)

    def stats(self) -> dict[str, Any]:
        return self._timed(self._miner.stats)

    def _timed(self, method: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._call(method, *args)
        finally:
            self.wait_s += time.perf_counter() - started


def start_miner(clusters: np.ndarray, store_dir: str | None = None, val_store_dir: str | None = None, *,
                name: str, pool_size: int = mining.DEFAULT_POOL_SIZE, state_dir: str | None = None,
                backend: str = "auto", **option_overrides: Any):
    """Create the named miner actor (or return the running one of that name); Ray must be initialised.
    Ray is imported here, not at module level, so that `Miner` itself (benchmarks, a GPU machine without
    Ray) needs nothing but numpy and the search back-end."""
    import ray

    options = {**miner_options(ray.cluster_resources(), name), **option_overrides}
    return ray.remote(Miner).options(get_if_exists=True, **options).remote(
        clusters, *(None if folder is None else str(folder) for folder in (store_dir, val_store_dir)),
        pool_size, None if state_dir is None else str(state_dir), backend)
