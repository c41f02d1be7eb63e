"""The miner: one named Ray actor, apart from the trainers, serving hard negatives to every worker.

It holds the teacher feature store (memory-mapped float16) and an exact inner-product index of the
epoch's random pool, and applies the rules of `amldist.mining`. Placement (`miner_options`): one GPU
when the cluster has one, the custom resource `miner` when the cluster defines it, no CPU reserved.

Fault tolerance: Ray restarts a dead actor by running `__init__` again, which loses everything in
memory. So every answer is derived from inputs that survive: the store on disk, and (seed, epoch),
persisted by `new_epoch` to `state_dir`; after a restart the pool, the index and the random draws are
rebuilt from them and the miner answers exactly as before. Sym-mode pool vectors come from the
students and cannot be rebuilt: a restarted miner raises `MissingPoolVectors` and the worker resends.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amldist import mining
from amldist.atomic import atomic_write_json
from amldist.errors import UserError
from amldist.feature_store import FeatureStore
from amldist.node_cache import cached_copy

log = logging.getLogger(__name__)

DEFAULT_NAME = "amldist-miner"
STATE_FILE = "miner-state.json"
BACKENDS = ("auto", "faiss-gpu", "torch-cuda", "faiss-cpu", "torch-cpu")
MODES = ("asym", "sym")
RANDOM_RULES = ("clusters", "uniform")


class MissingPoolVectors(RuntimeError):
    """Sym mining was asked for an epoch whose student pool vectors this miner does not hold."""


def miner_options(cluster_resources: Mapping[str, float], name: str = DEFAULT_NAME, namespace: str | None = None,
                  max_restarts: int = 3, max_task_retries: int = 3, detached: bool = False) -> dict[str, Any]:
    """Ray actor options for the miner on a cluster with `cluster_resources` (as `ray.cluster_resources()`).

    No CPU is reserved: the miner works in short bursts once per batch, and a reserved core would sit
    idle between them while the trainers wait for it.
    """
    options: dict[str, Any] = {"name": name, "num_cpus": 0, "max_restarts": max_restarts,
                               "max_task_retries": max_task_retries}
    if cluster_resources.get("GPU", 0) >= 1:
        options["num_gpus"] = 1
    if cluster_resources.get("miner", 0) >= 1:
        options["resources"] = {"miner": 1}
    if namespace:
        options["namespace"] = namespace
    if detached:
        options["lifetime"] = "detached"
    return options


def choose_backend(requested: str = "auto") -> str:
    """faiss on the GPU when faiss has GPU support, else a torch matmul top-k on the GPU, else faiss on the
    CPU, else (no faiss installed) the torch top-k on the CPU."""
    if requested not in BACKENDS:
        raise UserError(f"unknown search backend {requested!r}; choose from {', '.join(BACKENDS)}")
    import torch

    from amldist import faiss_index

    if requested == "faiss-cpu" and not faiss_index.faiss_available():
        raise UserError("search backend faiss-cpu needs faiss (pip install faiss-cpu)")
    if requested == "faiss-gpu" and not faiss_index.gpu_available():
        raise UserError("search backend faiss-gpu needs a faiss build with GPU support and a visible GPU")
    if requested == "torch-cuda" and not torch.cuda.is_available():
        raise UserError("search backend torch-cuda needs a visible CUDA GPU")
    if requested != "auto":
        return requested
    if faiss_index.gpu_available():
        return "faiss-gpu"
    if torch.cuda.is_available():
        return "torch-cuda"
    return "faiss-cpu" if faiss_index.faiss_available() else "torch-cpu"


def build_search(backend: str, pool_vecs: np.ndarray) -> mining.SearchFn:
    """An exact inner-product top-k over `pool_vecs` (P, D) on the chosen backend."""
    if backend in ("torch-cuda", "torch-cpu"):
        return mining.torch_topk_search(pool_vecs, device="cuda" if backend == "torch-cuda" else "cpu")
    from amldist.faiss_index import searcher

    return searcher(pool_vecs, use_gpu=backend == "faiss-gpu")


class Miner:
    """Mining service state; `start_miner` runs this class as a Ray actor (usable directly without Ray).

    clusters (N,): cluster of every image of the training split (index = dataset index).
    store_dir: the teacher feature store of that split (needed for asym mining and teacher_vectors).
    state_dir: where (seed, epoch) survive a restart; without it a restarted miner needs `new_epoch` again.
    """

    def __init__(self, clusters: np.ndarray, store_dir: str | None = None,
                 pool_size: int = mining.DEFAULT_POOL_SIZE, state_dir: str | None = None,
                 backend: str = "auto", expected: Mapping[str, Any] | None = None):
        self.clusters = np.asarray(clusters, dtype=np.int64)  # (N,)
        self.pool_size = int(pool_size)
        self.backend = choose_backend(backend)
        # A store URI: this node's checked copy (amldist.node_cache), memory-mapped like a local store.
        self.store = FeatureStore.open(cached_copy(store_dir), expected=expected) if store_dir else None
        if self.store is not None and len(self.store) != len(self.clusters):
            raise UserError(f"the teacher feature store holds {len(self.store)} images, "
                            f"the training split {len(self.clusters)}")
        self.state_path = Path(state_dir) / STATE_FILE if state_dir else None
        self.epoch: int | None = None
        self.seed: int | None = None
        self.pool_ids: np.ndarray | None = None  # (P,) image ids of this epoch's pool
        self._asym: tuple[mining.SearchFn, np.ndarray] | None = None
        self._sym: tuple[mining.SearchFn, np.ndarray] | None = None
        self._counters = {"mine_calls": 0, "anchors_mined": 0, "mine_seconds": 0.0, "last_mean_distance": None}
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
            return  # the same epoch again (a retried call, several workers): keep the built index
        self.epoch, self.seed = int(epoch), int(seed)
        rng = mining.epoch_rng(self.seed, self.epoch, mining.POOL_STREAM)
        self.pool_ids = mining.sample_pool(len(self.clusters), self.pool_size, rng)
        self._asym = self._sym = None  # built lazily: sym pools arrive from the workers

    def current_pool(self) -> np.ndarray:
        self._require_epoch()
        return self.pool_ids

    def mine(self, anchor_ids: np.ndarray, anchor_vecs: np.ndarray, num_negatives: int, mode: str = "asym",
             pool_vecs: np.ndarray | None = None, search_k: int | None = None) -> tuple[np.ndarray, float]:
        """Hard negatives (Q, num_negatives) image ids of anchors `anchor_ids` (Q,) with student vectors
        `anchor_vecs` (Q, D), and their mean L2 distance.

        asym: the pool is represented by the teacher store. sym: by the student, `pool_vecs` (P, D) in the
        order of this epoch's pool; send them once per epoch, later calls may pass None.
        """
        self._require_epoch()
        anchor_ids = self._check_ids(anchor_ids)
        search, vectors = self._pool_index(mode, pool_vecs)
        started = time.perf_counter()
        negatives, mean_distance = mining.select_hard_negatives(
            anchor_vecs, vectors, self.pool_ids, self.clusters[self.pool_ids], self.clusters[anchor_ids],
            num_negatives, search_k=search_k, search=search)
        self._count(len(anchor_ids), time.perf_counter() - started, mean_distance)
        return negatives, mean_distance

    def _pool_index(self, mode: str, pool_vecs: np.ndarray | None) -> tuple[mining.SearchFn, np.ndarray]:
        if mode not in MODES:
            raise UserError(f"unknown mining mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "asym":
            if self.store is None:
                raise UserError("asymmetric mining needs the teacher feature store; start the miner with one")
            if self._asym is None:
                # (P, D) float16 rows read from the memory map; the search keeps a float32 copy (on the
                # GPU for faiss-gpu / torch-cuda), these stay half-size for the distance figure.
                half = np.asarray(self.store.features[self.pool_ids])
                self._asym = (build_search(self.backend, half.astype(np.float32)), half)
            return self._asym
        if pool_vecs is not None:
            vectors = np.asarray(pool_vecs, dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(self.pool_ids):
                raise ValueError(f"sym pool vectors must be ({len(self.pool_ids)}, D), got {vectors.shape}")
            self._sym = (build_search(self.backend, vectors), vectors)
        if self._sym is None:
            raise MissingPoolVectors(f"the miner holds no student pool vectors for epoch {self.epoch}; "
                                     f"send pool_vecs (it may have restarted)")
        return self._sym

    def random_negatives(self, anchor_ids: np.ndarray, num_negatives: int, rule: str = "clusters",
                         key: int = 0) -> np.ndarray:
        """Random negatives from this epoch's pool, (Q, num_negatives) image ids.

        rule "clusters": aml's ts_rand (distinct clusters, never the anchor's); "uniform": extra examples
        for the unlabelled losses (distinct images, never the anchor). `key` (e.g. the batch number)
        picks the random stream, so the same call gives the same answer, also after a restart.
        """
        self._require_epoch()
        anchor_ids = self._check_ids(anchor_ids)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, mining.RANDOM_STREAM, int(key)]))
        if rule == "clusters":
            return mining.sample_random_cluster_negatives(
                self.clusters[anchor_ids], self.pool_ids, self.clusters[self.pool_ids], num_negatives, rng)
        if rule == "uniform":
            return mining.sample_random_examples(anchor_ids, self.pool_ids, num_negatives, rng)
        raise UserError(f"unknown random-negative rule {rule!r}; choose from {', '.join(RANDOM_RULES)}")

    def teacher_vectors(self, ids: np.ndarray) -> np.ndarray:
        """Teacher descriptors (len(ids), D) float32 of images `ids`, so workers never load the whole store."""
        if self.store is None:
            raise UserError("this miner was started without a teacher feature store")
        return self.store.vectors(self._check_ids(ids))

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "epoch": self.epoch, "seed": self.seed, "backend": self.backend,
                "pool_size": None if self.pool_ids is None else len(self.pool_ids),
                "num_images": len(self.clusters), "dim": None if self.store is None else self.store.dim,
                "restored": self.restored, **self._counters}

    def _require_epoch(self) -> None:
        if self.pool_ids is None:
            raise RuntimeError("the miner has no epoch yet: call new_epoch(epoch, seed) first")

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.clusters)):
            raise IndexError(f"image ids must lie in [0, {len(self.clusters)}), got {ids.min()}..{ids.max()}")
        return ids

    def _count(self, anchors: int, seconds: float, mean_distance: float) -> None:
        self._counters["mine_calls"] += 1
        self._counters["anchors_mined"] += anchors
        self._counters["mine_seconds"] += seconds
        self._counters["last_mean_distance"] = mean_distance


def _actor_class():
    """`Miner` as a Ray actor class. Ray is imported here, not at module level, so that `Miner` itself
    (benchmarks, a GPU machine without Ray) needs nothing but numpy and the search backend."""
    import ray

    return ray.remote(Miner)


def start_miner(clusters: np.ndarray, store_dir: str | None = None, *, name: str = DEFAULT_NAME,
                pool_size: int = mining.DEFAULT_POOL_SIZE, state_dir: str | None = None, backend: str = "auto",
                namespace: str | None = None, detached: bool = False, **option_overrides: Any):
    """Create the named miner actor (or return the running one of that name); Ray must be initialised."""
    import ray

    options = miner_options(ray.cluster_resources(), name=name, namespace=namespace, detached=detached)
    options.update(option_overrides)
    return _actor_class().options(get_if_exists=True, **options).remote(
        clusters, None if store_dir is None else str(store_dir), pool_size,
        None if state_dir is None else str(state_dir), backend)


def get_miner(name: str = DEFAULT_NAME, namespace: str | None = None):
    """The running miner, from any worker of the same job (or another job, given the namespace)."""
    import ray

    return ray.get_actor(name, namespace=namespace)
