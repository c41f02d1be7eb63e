"""Mining time per epoch: our top-k + vectorised filter vs the reference (cirtorch: full matrix product,
full sort of every ranking, per-query Python walk), and the miner's latency as the pool grows.

    python benchmarks/bench_mining.py [--quick] [--device cpu|cuda] [--pools 22000,100000,...]

Part 1 mines 2000 anchors against a 22k pool, d=512 (the paper's epoch), both ways, and checks the
answers agree. Part 2 times the miner (teacher store memory-mapped as float16) at pool sizes up to the
largest that fits in memory: gathering the epoch's pool (on a GPU, also copying it there), one epoch of
2000 anchors, one batch of 10.
With --device cuda both sides run on the GPU as they would there: the reference's product, sort and
walk over GPU tensors (cirtorch keeps its vectors on the GPU), ours with the torch-cuda search backend
(the miner's choice on a GPU without faiss-gpu), and the miner with that backend.
Writes runs/bench/mining.json (mining-cuda.json on the GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amldist import mining
from amldist.feature_store import write_feature_store
from amldist.miner_actor import Miner
from amldist.search import torch_topk_search

IMAGES_PER_CLUSTER = 160  # SfM-120k: about 91k training images in a few hundred 3D models
NUM_NEGATIVES = 5


def clustered_unit_vectors(num: int, dim: int, rng: np.random.Generator, chunk: int = 65536):
    """(num, dim) float16 unit vectors around num / IMAGES_PER_CLUSTER centres, and their clusters."""
    num_clusters = max(10, num // IMAGES_PER_CLUSTER)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    clusters = rng.integers(0, num_clusters, num)
    vectors = np.empty((num, dim), np.float16)
    for start in range(0, num, chunk):  # chunked so 1M x 512 never exists in float32
        part = centres[clusters[start:start + chunk]]
        part += 1.5 * rng.standard_normal(part.shape, dtype=np.float32)
        vectors[start:start + chunk] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return vectors, clusters.astype(np.int64)


def noisy_anchors(pool: np.ndarray, count: int, rng: np.random.Generator):
    """Student anchors: pool images seen by a slightly different network."""
    picks = rng.choice(len(pool), count, replace=False)
    anchors = pool[picks].astype(np.float32) + 0.3 * rng.standard_normal((count, pool.shape[1]),
                                                                         dtype=np.float32)
    return anchors / np.linalg.norm(anchors, axis=1, keepdims=True), picks


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reference_mining(anchors, pool, pool_clusters, anchor_clusters, count, device="cpu"):
    """cirtorch's epoch mining: scores of every pool image, a full sort, a Python walk per query
    (on `device`: the vectors are already there, as in cirtorch, so no copy is timed)."""
    timings = {}
    pool_t, anchors_t = torch.from_numpy(pool).to(device), torch.from_numpy(anchors).to(device)
    _sync(device)
    started = time.perf_counter()
    scores = torch.mm(pool_t, anchors_t.T)  # (P, Q)
    _sync(device)
    timings["product_s"] = time.perf_counter() - started
    started = time.perf_counter()
    _, ranks = torch.sort(scores, dim=0, descending=True)  # (P, Q)
    _sync(device)
    timings["sort_s"] = time.perf_counter() - started
    started = time.perf_counter()
    negatives, distance_sum = [], torch.zeros((), device=device)
    for q in range(len(anchors)):
        used, chosen, r = [int(anchor_clusters[q])], [], 0
        while len(chosen) < count:
            # The host reads of cirtorch's walk, on a GPU one wait for the device each: the candidate's
            # rank, once per candidate (it indexes the image list with it), and once more per accepted
            # negative, whose pool vector it selects with that rank still on the device (indexing by a
            # one-element device tensor reads its value); the distances add up on the device
            rank = ranks[r, q]
            candidate = int(rank)
            if int(pool_clusters[candidate]) not in used:
                chosen.append(candidate)
                used.append(int(pool_clusters[candidate]))
                distance_sum += torch.pow(anchors_t[q] - pool_t[rank] + 1e-6, 2).sum().sqrt()
            r += 1
        negatives.append(chosen)
    distance = float(distance_sum) / (len(anchors) * count)
    timings["walk_s"] = time.perf_counter() - started
    return np.array(negatives), distance, timings


def ours(anchors, pool, pool_clusters, anchor_clusters, count, device="cpu"):
    """Top-k search (faiss on the CPU; torch-cuda on the GPU, copying the pool there included) + vectorised
    filter."""
    search = torch_topk_search(pool, device="cuda") if device == "cuda" else None
    return mining.select_hard_negatives(anchors, pool, np.arange(len(pool)), pool_clusters, anchor_clusters,
                                        count, search=search)


def compare_with_reference(num_queries: int, pool_size: int, dim: int, repeats: int,
                           device: str = "cpu") -> dict:
    rng = np.random.default_rng(0)
    pool16, clusters = clustered_unit_vectors(pool_size, dim, rng)
    pool = pool16.astype(np.float32)
    anchors, picks = noisy_anchors(pool16, num_queries, rng)
    anchor_clusters = clusters[picks]
    ours(anchors[:50], pool, clusters, anchor_clusters[:50], NUM_NEGATIVES, device)  # warm up threads/kernels
    reference_mining(anchors[:50], pool, clusters, anchor_clusters[:50], NUM_NEGATIVES, device)
    best_ref, best_ours = None, float("inf")
    for _ in range(repeats):
        ref_neg, ref_dist, parts = reference_mining(anchors, pool, clusters, anchor_clusters,
                                                    NUM_NEGATIVES, device)
        total = sum(parts.values())
        if best_ref is None or total < best_ref["total_s"]:
            best_ref = {"total_s": total, **parts}
        started = time.perf_counter()
        our_neg, our_dist = ours(anchors, pool, clusters, anchor_clusters, NUM_NEGATIVES, device)
        best_ours = min(best_ours, time.perf_counter() - started)
    floor = product_floor(anchors, pool, repeats, device)
    same_rows = float((our_neg == ref_neg).all(axis=1).mean())
    same_sets = float((np.sort(our_neg, axis=1) == np.sort(ref_neg, axis=1)).all(axis=1).mean())
    return {"queries": num_queries, "pool": pool_size, "dim": dim, "device": device, "reference": best_ref,
            "ours_s": best_ours, "product_floor_s": floor, "speedup_bound": best_ref["total_s"] / floor,
            "speedup": best_ref["total_s"] / best_ours, "identical_rows": same_rows, "same_sets": same_sets,
            "mean_distance": {"reference": ref_dist, "ours": our_dist}}


def product_floor(anchors: np.ndarray, pool: np.ndarray, repeats: int, device: str) -> float:
    """Seconds for the float32 product alone with the fastest BLAS at hand (numpy's on the CPU, often
    faster than torch's there): any exact float32 search computes it, so reference / floor bounds the
    speed-up that an exact search can reach on this machine."""
    if device == "cuda":
        pool_t, anchors_t = torch.from_numpy(pool).cuda(), torch.from_numpy(anchors).cuda()
        product = lambda: torch.mm(anchors_t, pool_t.T)
    else:
        product = lambda: anchors @ pool.T
    product()  # warm up
    best = float("inf")
    for _ in range(max(2, repeats)):
        _sync(device)
        started = time.perf_counter()
        product()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def miner_latency(pool_size: int, dim: int, workdir: Path, backend: str = "auto") -> dict:
    """Time the miner with a store of `pool_size` images, all of them in the epoch's pool."""
    rng = np.random.default_rng(pool_size)
    vectors, clusters = clustered_unit_vectors(pool_size, dim, rng)
    store_dir = workdir / f"store-{pool_size}"
    write_feature_store(store_dir, vectors, network="synthetic", network_sha256="0" * 64,
                        architecture="synthetic", image_size=362, scales=[1.0], dataset="synthetic",
                        split="train")
    anchors, picks = noisy_anchors(vectors, 2000, rng)
    del vectors
    miner = Miner(clusters, str(store_dir), pool_size=pool_size, backend=backend)
    started = time.perf_counter()
    miner.new_epoch(0, seed=0)
    miner.hard_negatives(picks[:1], anchors[:1], NUM_NEGATIVES)  # the first call of an epoch builds the index
    build = time.perf_counter() - started
    started = time.perf_counter()
    miner.hard_negatives(picks, anchors, NUM_NEGATIVES)
    epoch = time.perf_counter() - started
    batch_times = []
    for start in range(0, 200, 10):
        began = time.perf_counter()
        miner.hard_negatives(picks[start:start + 10], anchors[start:start + 10], NUM_NEGATIVES)
        batch_times.append(time.perf_counter() - began)
    return {"pool": pool_size, "dim": dim, "backend": miner.backend, "store_mb": pool_size * dim * 2 / 2**20,
            "build_index_s": build, "epoch_2000_s": epoch,
            "batch_10_ms": 1000 * float(np.median(batch_times))}


def print_tables(result: dict) -> None:
    ref = result["reference"]
    print(f"\nMining one epoch on the {result['device']}: {ref['queries']} anchors x {ref['pool']} pool, "
          f"d={ref['dim']}, {NUM_NEGATIVES} negatives")
    print(f"{'approach':<44}{'seconds':>10}")
    r = ref["reference"]
    print(f"{'reference (product + sort + Python walk)':<44}{r['total_s']:>10.3f}"
          f"   (product {r['product_s']:.3f}, sort {r['sort_s']:.3f}, walk {r['walk_s']:.3f})")
    print(f"{'ours (top-k + vectorised filter)':<44}{ref['ours_s']:>10.3f}")
    print(f"speed-up: {ref['speedup']:.1f}x   identical rows: {100 * ref['identical_rows']:.2f}%   "
          f"same negatives (any order): {100 * ref['same_sets']:.2f}%")
    print(f"floor: the float32 product alone takes {ref['product_floor_s']:.3f} s, "
          f"so no exact float32 search can be more than {ref['speedup_bound']:.1f}x faster "
          "than the reference here")
    print(f"\nMiner latency ({result['latency'][0]['backend'] if result['latency'] else '-'}), float16 store")
    print(f"{'pool':>10}{'store MB':>10}{'pool s':>10}{'epoch s':>10}{'batch ms':>10}")
    for row in result["latency"]:
        print(f"{row['pool']:>10}{row['store_mb']:>10.0f}{row['build_index_s']:>10.2f}"
              f"{row['epoch_2000_s']:>10.2f}{row['batch_10_ms']:>10.1f}")
    for pool in result["skipped_pools"]:
        print(f"{pool:>10}  skipped: not enough free memory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (checks it runs)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where both sides run (default cpu; cuda: see above)")
    parser.add_argument("--pools", default=None, help="comma list of miner pool sizes (default 22k..1M)")
    parser.add_argument("--out", default=None,
                        help="default runs/bench/mining.json (mining-cuda.json on cuda)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dim = 512
    if args.quick:
        queries, pool, repeats, pools = 300, 5000, 1, [22_000, 50_000]
    else:
        queries, pool, repeats, pools = 2000, 22_000, 2, [22_000, 100_000, 500_000, 1_000_000]
    if args.pools:
        pools = [int(size) for size in args.pools.split(",")]
    backend = "torch-cuda" if args.device == "cuda" else "auto"
    result = {"quick": args.quick, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "device": args.device, "cuda": torch.cuda.is_available(), "latency": [], "skipped_pools": []}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    result["reference"] = compare_with_reference(queries, pool, dim, repeats, args.device)
    with tempfile.TemporaryDirectory(prefix="bench-mining-") as workdir:
        for size in pools:
            needed = size * dim * 10  # float16 array and its gathered copy, float32 pool (searched in place)
            if needed > 0.8 * available_memory_bytes():
                result["skipped_pools"].append(size)
                continue
            result["latency"].append(miner_latency(size, dim, Path(workdir), backend))
    print_tables(result)
    default_name = "mining-cuda.json" if args.device == "cuda" else "mining.json"
    out = Path(args.out or ROOT / "runs" / "bench" / default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
