"""How the miner's cost grows with the teacher pool, and what an approximate index buys at 1M.

    python benchmarks/bench_scaling.py [--quick] [--dim 512] [--large 1000000]

On the CPU (faiss), with synthetic unit vectors in clusters of ~160 images (`--data isotropic`:
bench_mining's clusters in white noise, where neighbours barely stand out, the hard case for an
index; `--data structured`: landmarks grouped into scene types in a space with a power-law spectrum,
closer to CNN descriptors), anchors = a student's view of pool images (cosine ~0.9 to the teacher's
vector), 2000 anchors, k = 64 (the miner's search width for 5 negatives):

1. exact search (what the miner does: faiss's brute-force kNN over the float32 pool) at pools of
   22k (the paper's), 133k (all of SfM-120k), 250k (a quarter of 1M: one shard of a pool split
   over 4 miners) and the large size (1M); the float32 and float16 bytes of each pool;
2. at the large size, approximate indexes against the exact answer: IVF-Flat (nlist 1024) and
   IVF-PQ (64 bytes per vector) at several nprobe, IVF-PQ re-ranked exactly from the float16 store
   (what a miner holding the store memory-mapped can do), each with its build time, bytes, search
   time, recall@10 / recall@64 of the exact top-k, and the share of anchors whose 5 hard negatives
   (the miner's walk: distinct clusters, never the anchor's, over the top 1024) are the exact search's;
3. bytes moved between the workers and the miner in one asymmetric epoch (2000 anchors, 5 negatives,
   pool 22k), measured as the pickled size of each call's arguments and answer with the real `Miner`
   (Ray sends numpy arrays as their raw buffers, so pickle protocol 5 counts the same bytes).

Writes runs/bench/scaling-<data>.json. docs/SCALING.md extrapolates from it to 4M and to d = 2048.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss
from bench_mining import IMAGES_PER_CLUSTER, clustered_unit_vectors

from amldist import mining
from amldist.atomic import atomic_write_json
from amldist.feature_store import write_feature_store
from amldist.miner_actor import Miner

NUM_ANCHORS = 2000
NUM_NEGATIVES = 5
K = 64
WALK_K = 1024  # candidates walked for negatives: a structured pool's top 64 is mostly the anchor's landmark
NLIST = 1024
PQ_BYTES = 64
TRAIN_POINTS = 65536  # k-means sample: 64 per centroid (faiss warns below 39)
CLUSTER_ITERATIONS = 10  # of the coarse k-means (faiss's default is 25; the lists barely move after 10)


def timed(work):
    started = time.perf_counter()
    value = work()
    return time.perf_counter() - started, value


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Share of the exact top-k that the approximate top-k holds (mean over anchors)."""
    hits = [len(np.intersect1d(f[:k], e[:k])) for f, e in zip(found, exact)]
    return float(np.mean(hits) / k)


def first_negatives(ids: np.ndarray, clusters: np.ndarray, anchor_clusters: np.ndarray) -> list[set]:
    """The miner's cluster walk over each anchor's candidates: the first NUM_NEGATIVES images of distinct
    clusters other than the anchor's (fewer when the list runs out)."""
    chosen = []
    for row, own in zip(ids, anchor_clusters):
        used, found = {int(own)}, set()
        for image in row:
            if image >= 0 and int(clusters[image]) not in used:
                used.add(int(clusters[image]))
                found.add(int(image))
                if len(found) == NUM_NEGATIVES:
                    break
        chosen.append(found)
    return chosen


def index_search(index) -> mining.SearchFn:
    return lambda queries, k: index.search(np.ascontiguousarray(queries, np.float32), k)


def reranked_search(index, store16: np.ndarray, candidates: int) -> mining.SearchFn:
    """Approximate candidates, then exact inner products from the float16 rows (the store)."""
    def rerank(queries, ids, k):
        safe = np.where(ids < 0, 0, ids)
        scores = np.einsum("qd,qcd->qc", queries, store16[safe].astype(np.float32))
        scores[ids < 0] = -np.inf
        order = np.argsort(-scores, axis=1)[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def search(queries, k):
        queries = np.ascontiguousarray(queries, np.float32)
        _, ids = index.search(queries, max(k, candidates))  # (Q, max(k, C))
        parts = [rerank(queries[i:i + 100], ids[i:i + 100], k) for i in range(0, len(queries), 100)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return search


def structured_unit_vectors(num: int, dim: int, rng: np.random.Generator, chunk: int = 65536):
    """(num, dim) float16 unit vectors with the structure of retrieval descriptors, and their clusters:
    landmarks (~160 images each) grouped into scene types (~10 landmarks each: similar-looking places,
    where hard negatives come from), in a space whose variance falls off with the dimension (a
    power-law spectrum, as PCA of CNN descriptors shows) rather than spread evenly over all of it.
    Within a landmark images sit at similarity ~0.8, across landmarks of one scene type at ~0.5."""
    num_clusters = max(10, num // IMAGES_PER_CLUSTER)
    spectrum = (np.arange(1, dim + 1, dtype=np.float32) ** -0.5)[None]  # (1, D) per-axis scale
    types = rng.standard_normal((max(2, num_clusters // 10), dim)).astype(np.float32)
    scene_of = rng.integers(0, len(types), num_clusters)  # drawn before the noise: the measured runs' order
    centres = types[scene_of] + 0.8 * rng.standard_normal((num_clusters, dim), dtype=np.float32)
    clusters = rng.integers(0, num_clusters, num)
    vectors = np.empty((num, dim), np.float16)
    for start in range(0, num, chunk):
        part = centres[clusters[start:start + chunk]]
        part += 0.5 * rng.standard_normal(part.shape, dtype=np.float32)
        part *= spectrum
        vectors[start:start + chunk] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return vectors, clusters.astype(np.int64)


DATA = {"isotropic": clustered_unit_vectors, "structured": structured_unit_vectors}


def student_anchors(pool16: np.ndarray, count: int, rng: np.random.Generator, noise: float = 0.5):
    """Anchors of a student that has learned the teacher's space: each a pool image's teacher vector
    moved by noise of norm ~`noise` (cosine ~0.9 to it); returns (anchors (count, D), their pool rows)."""
    picks = rng.choice(len(pool16), count, replace=False)
    anchors = pool16[picks].astype(np.float32)
    anchors += (noise / np.sqrt(anchors.shape[1])) * rng.standard_normal(anchors.shape, dtype=np.float32)
    return anchors / np.linalg.norm(anchors, axis=1, keepdims=True), picks


def exact_knn(anchors: np.ndarray, pool: np.ndarray, k: int = K):
    return faiss.knn(anchors, pool, k, metric=faiss.METRIC_INNER_PRODUCT)


def build(index, sample: np.ndarray, pool: np.ndarray) -> float:
    index.cp.niter = CLUSTER_ITERATIONS
    started = time.perf_counter()
    index.train(sample)
    index.add(pool)
    return time.perf_counter() - started


def exact_at(size: int, dim: int, rng) -> dict:
    pool16, _ = clustered_unit_vectors(size, dim, rng)
    pool = pool16.astype(np.float32)
    anchors, _ = student_anchors(pool16, NUM_ANCHORS, rng)
    exact_knn(anchors[:50], pool)  # warm the threads
    seconds, _ = timed(lambda: exact_knn(anchors, pool))
    print(f"  exact {size:>9,}: {seconds:7.2f} s for {NUM_ANCHORS} anchors", flush=True)
    return {"pool": size, "float16_mb": pool16.nbytes / 2**20, "float32_mb": pool.nbytes / 2**20,
            "epoch_search_s": seconds, "batch10_ms": 1000 * seconds * 10 / NUM_ANCHORS}


def approximate_at(size: int, dim: int, rng, nprobes: list[int], data: str) -> dict:
    store16, clusters = DATA[data](size, dim, rng)
    pool = store16.astype(np.float32)
    anchors, picks = student_anchors(store16, NUM_ANCHORS, rng)
    anchor_clusters = clusters[picks]
    exact_s, (_, exact_ids) = timed(lambda: exact_knn(anchors, pool))
    _, exact_walk = exact_knn(anchors, pool, WALK_K)
    print(f"  exact {size:>9,}: {exact_s:7.2f} s for {NUM_ANCHORS} anchors", flush=True)
    exact_negatives = first_negatives(exact_walk, clusters, anchor_clusters)
    sample = pool[rng.choice(size, min(TRAIN_POINTS, size), replace=False)]
    rows = []

    def evaluate(name: str, search: mining.SearchFn, build_s: float, index_bytes: int, **extra):
        search_s, (_, ids) = timed(lambda: search(anchors, K))
        negatives = first_negatives(search(anchors, WALK_K)[1], clusters, anchor_clusters)
        same = float(np.mean([a == b and len(a) == NUM_NEGATIVES
                              for a, b in zip(negatives, exact_negatives)]))
        row = {"index": name, "build_s": build_s, "index_mb": index_bytes / 2**20, "search_s": search_s,
               "speedup_vs_exact": exact_s / search_s, "recall_at_10": recall(ids, exact_ids, 10),
               "recall_at_64": recall(ids, exact_ids, K), "same_5_negatives": same, **extra}
        rows.append(row)
        print(f"  {name:<34} build {build_s:6.1f} s  {row['index_mb']:8.1f} MB  search {search_s:6.2f} s  "
              f"R@10 {row['recall_at_10']:.3f}  R@64 {row['recall_at_64']:.3f}  same negatives {same:.3f}",
              flush=True)

    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, NLIST, faiss.METRIC_INNER_PRODUCT)
    build_s = build(ivf, sample, pool)
    ivf_bytes = faiss.serialize_index(ivf).nbytes
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        evaluate(f"IVF{NLIST},Flat nprobe={nprobe}", index_search(ivf), build_s, ivf_bytes, nprobe=nprobe)
    ivf.reset()  # free its copy of the pool before the next index

    quantizer = faiss.IndexFlatIP(dim)
    ivfpq = faiss.IndexIVFPQ(quantizer, dim, NLIST, PQ_BYTES, 8, faiss.METRIC_INNER_PRODUCT)
    build_s = build(ivfpq, sample, pool)
    pq_bytes = faiss.serialize_index(ivfpq).nbytes
    for nprobe in nprobes:
        ivfpq.nprobe = nprobe
        evaluate(f"IVF{NLIST},PQ{PQ_BYTES} nprobe={nprobe}", index_search(ivfpq), build_s, pq_bytes,
                 nprobe=nprobe)
    ivfpq.nprobe = nprobes[-1]
    evaluate(f"IVF{NLIST},PQ{PQ_BYTES} nprobe={nprobes[-1]} + re-rank 256",
             reranked_search(ivfpq, store16, 256), build_s, pq_bytes, nprobe=nprobes[-1], rerank=256)
    return {"pool": size, "exact_search_s": exact_s, "float32_mb": pool.nbytes / 2**20,
            "float16_mb": store16.nbytes / 2**20, "nlist": NLIST, "train_points": len(sample),
            "indexes": rows}


def bytes_per_epoch(dim: int, pool_size: int, rng, workdir: Path) -> dict:
    """Pickled bytes of each miner call of one asymmetric epoch, with the real Miner (all ranks together:
    the ranks split the anchors, and the bytes with them)."""
    num_images = max(pool_size * 4, 50_000)
    store16, clusters = DATA["structured"](num_images, dim, rng)
    store = write_feature_store(workdir / "store", store16, network="bench", network_sha256="0" * 64,
                                architecture="bench", image_size=362, scales=[1.0], dataset="bench",
                                split="train")
    miner = Miner(clusters, str(store.directory), pool_size=pool_size, backend="faiss-cpu")
    anchor_ids = rng.choice(num_images, NUM_ANCHORS, replace=False)
    anchor_vecs, _ = student_anchors(store16[anchor_ids], NUM_ANCHORS, rng)

    def size(*objects) -> int:
        return sum(len(pickle.dumps(o, protocol=5)) for o in objects)

    calls = {}
    pool_ids = miner.new_epoch(0, 0)
    calls["new_epoch"] = {"sent": size(0, 0), "received": size(pool_ids)}
    answer = miner.hard_negatives(anchor_ids, anchor_vecs, NUM_NEGATIVES)
    calls["hard_negatives"] = {"sent": size(anchor_ids, anchor_vecs, NUM_NEGATIVES), "received": size(answer)}
    positives = rng.choice(num_images, NUM_ANCHORS)
    # the rows Contr+ asym tuples read: anchors (its self term), positives, negatives
    teacher_ids = np.unique(np.concatenate([anchor_ids, positives, answer[0].ravel()]))
    vectors = miner.teacher_vectors(teacher_ids)
    calls["teacher_vectors"] = {"sent": size(teacher_ids), "received": size(vectors),
                                "rows": len(teacher_ids)}
    total = sum(c["sent"] + c["received"] for c in calls.values())
    return {"dim": dim, "pool": pool_size, "anchors": NUM_ANCHORS, "negatives": NUM_NEGATIVES, "calls": calls,
            "asym_epoch_mb": total / 2**20,
            # sym: the ranks gather the pool's student vectors among themselves
            "sym_pool_gather_mb": pool_size * dim * 4 / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (checks the benchmark works)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--large", type=int, default=None, help="the size of part 2 (default 1M; quick 20k)")
    parser.add_argument("--data", choices=sorted(DATA), default="isotropic",
                        help="part 2's vectors: isotropic (bench_mining's clusters in white noise, the "
                             "hard case for an index) or structured (scene types, power-law spectrum)")
    parser.add_argument("--sizes", default=None, help="comma list of part 1's pools ('' skips part 1)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON written (default runs/bench/scaling-<data>[-parts<P>].json)")
    args = parser.parse_args(argv)
    large = args.large or (20_000 if args.quick else 1_000_000)
    sizes = [2_000, 10_000] if args.quick else [22_000, 133_000, 250_000]
    if args.sizes is not None:
        sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    nprobes = [8, 32]
    parts = {p.strip() for p in args.parts.split(",")}
    rng = np.random.default_rng(0)
    exact, approximate, transfer = [], None, None
    if "1" in parts:
        print(f"exact search, d={args.dim}, {NUM_ANCHORS} anchors, k={K} "
              f"(faiss threads: {faiss.omp_get_max_threads()})")
        exact = [exact_at(size, args.dim, rng) for size in sizes]
    if "2" in parts:
        print(f"approximate indexes at {large:,} ({args.data} vectors)")
        approximate = approximate_at(large, args.dim, rng, nprobes, args.data)
        exact.append({"pool": large, "float16_mb": approximate["float16_mb"],
                      "float32_mb": approximate["float32_mb"],
                      "epoch_search_s": approximate["exact_search_s"],
                      "batch10_ms": 1000 * approximate["exact_search_s"] * 10 / NUM_ANCHORS})
    if "3" in parts:
        with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
            transfer = bytes_per_epoch(args.dim, 5_000 if args.quick else 22_000, rng, Path(tmp))
        print(f"bytes per asym epoch between the workers and the miner: {transfer['asym_epoch_mb']:.1f} MB")
    result = {"dim": args.dim, "anchors": NUM_ANCHORS, "k": K, "exact": exact, "approximate": approximate,
              "transfer": transfer, "quick": args.quick, "faiss": faiss.__version__, "cpus": os.cpu_count(),
              "python": platform.python_version(),
              "data": args.data,
              "command": "python benchmarks/bench_scaling.py " + " ".join(argv or sys.argv[1:])}
    name = args.data if parts >= {"1", "2", "3"} else f"{args.data}-parts{''.join(sorted(parts))}"
    out = args.out or ROOT / "runs" / "bench" / f"scaling-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
