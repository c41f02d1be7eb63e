"""Symmetric hard mining: each rank searching the gathered student pool itself, against sending the pool
to a miner actor that searches for every rank (how amldist mined sym negatives before).

In sym training every rank embeds a slice of the epoch's pool and gathers the rest, so every rank already
holds the whole pool. Two ways to mine one epoch, with W ranks as W Ray tasks of one CPU each:
- ranks: each rank runs `mining.select_hard_negatives` over the pool for its own anchors, in parallel;
- actor (the earlier design): rank 0 sends the pool (P x D float32) and its anchors to a miner actor,
  which builds the search and mines them; after a barrier the other ranks send their anchors one by one.
Both give the same negatives (checked). The epoch: 2000 anchors against a 22k pool, d=512, 5 negatives.

    python benchmarks/bench_sym_mining.py [--quick] [--out runs/bench/sym-mining.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amldist import mining, search
from amldist.atomic import atomic_write_json

NUM_NEGATIVES = 5
IMAGES_PER_CLUSTER = 160


def make_epoch(num_anchors: int, pool_size: int, dim: int, seed: int = 0):
    """Unit vectors in clusters (the pool) and noisy copies of some of them (the anchors)."""
    rng = np.random.default_rng(seed)
    clusters = np.arange(pool_size) // IMAGES_PER_CLUSTER
    centres = rng.standard_normal((clusters.max() + 1, dim)).astype(np.float32)
    pool = centres[clusters] + 0.6 * rng.standard_normal((pool_size, dim)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    picks = rng.choice(pool_size, num_anchors, replace=False)
    anchors = pool[picks] + 0.1 * rng.standard_normal((num_anchors, dim)).astype(np.float32)
    anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    return pool, np.arange(pool_size), clusters, anchors, clusters[picks]


def mine_in_rank(pool, pool_ids, clusters, anchors, anchor_clusters):
    """What a rank does now: search the pool it holds for its own anchors."""
    top_k = search.searcher(pool, "faiss-cpu")
    return mining.select_hard_negatives(anchors, pool, pool_ids, clusters, anchor_clusters, NUM_NEGATIVES,
                                        search=top_k)[0]


class PoolMiner:
    """The earlier actor: it receives the student pool once per epoch and mines for every rank."""

    def __init__(self):
        self.pool = None

    def set_pool(self, pool, pool_ids, clusters):
        self.pool = (pool, pool_ids, clusters, search.searcher(pool, "faiss-cpu"))
        return True

    def mine(self, anchors, anchor_clusters):
        pool, pool_ids, clusters, top_k = self.pool
        return mining.select_hard_negatives(anchors, pool, pool_ids, clusters, anchor_clusters, NUM_NEGATIVES,
                                            search=top_k)[0]


def run(num_ranks: int, num_anchors: int, pool_size: int, dim: int, repeats: int) -> dict:
    import ray

    pool, pool_ids, clusters, anchors, anchor_clusters = make_epoch(num_anchors, pool_size, dim)
    parts = np.array_split(np.arange(num_anchors), num_ranks)
    in_rank = ray.remote(num_cpus=1)(mine_in_rank)
    actor = ray.remote(num_cpus=0)(PoolMiner).remote()
    pool_ref = ray.put(pool)  # every rank holds the gathered pool already, in both designs

    @ray.remote(num_cpus=1)
    def rank_via_actor(rank, pool, anchors, anchor_clusters, after_rank_0):
        # after_rank_0: rank 0's answer, so Ray starts the other ranks once rank 0 is done (the barrier)
        if rank == 0:
            ray.get(actor.set_pool.remote(pool, pool_ids, clusters))  # rank 0 ships the pool
        return ray.get(actor.mine.remote(anchors, anchor_clusters))

    ranks_s, actor_s, same = [], [], True
    for round_index in range(repeats + 1):  # round 0 warms up: worker processes, imports, faiss threads
        started = time.perf_counter()
        local = ray.get([in_rank.remote(pool_ref, pool_ids, clusters, anchors[p], anchor_clusters[p])
                         for p in parts])
        ranks_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        first = rank_via_actor.remote(0, pool_ref, anchors[parts[0]], anchor_clusters[parts[0]], None)
        others = [rank_via_actor.remote(r, None, anchors[p], anchor_clusters[p], first)
                  for r, p in enumerate(parts) if r > 0]
        remote = ray.get([first, *others])
        actor_s.append(time.perf_counter() - started)
        same &= all(np.array_equal(a, b) for a, b in zip(local, remote))
        if round_index == 0:
            ranks_s.clear()
            actor_s.clear()
    ray.kill(actor)
    return {"ranks": num_ranks, "anchors": num_anchors, "pool": pool_size, "dim": dim, "repeats": repeats,
            "in_ranks_s": min(ranks_s), "via_actor_s": min(actor_s), "in_ranks_all_s": ranks_s,
            "via_actor_all_s": actor_s, "same_negatives": bool(same),
            "pool_mb": pool.nbytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small epoch, one repeat (checks it runs)")
    parser.add_argument("--out", default="runs/bench/sym-mining.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        sizes = (200, 2_000, 64, 1) if args.quick else (2_000, 22_000, 512, 5)
        result = run(2, *sizes)
    finally:
        ray.shutdown()
    result["cpu"] = os.cpu_count()
    print(f"sym mining, {result['ranks']} ranks, {result['anchors']} anchors x {result['pool']} pool, "
          f"d={result['dim']} ({result['pool_mb']:.0f} MB pool), best of {result['repeats']}:")
    print(f"  each rank searches the pool it holds   {result['in_ranks_s']:.3f} s")
    print(f"  pool sent to a miner actor (before)     {result['via_actor_s']:.3f} s")
    print(f"  same negatives: {result['same_negatives']}")
    atomic_write_json(args.out, result)
    print(f"written to {args.out}")
    return 0 if result["same_negatives"] else 1


if __name__ == "__main__":
    sys.exit(main())
