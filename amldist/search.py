"""Exact inner-product top-k search: the one home of faiss and of the search back-ends.

Back-ends (`mining.backend`, `BACKENDS`):
- `faiss-cpu`: faiss's brute-force kNN over the array where it lies (building an index would first
  copy it: 45 MB for a 22k x 512 mining pool, every epoch);
- `faiss-gpu`: a flat faiss index on the GPU, when the installed faiss has GPU support and sees a GPU
  (the copy to the device is the point, so the index is built once per database);
- `torch-cuda`: a float32 matrix product and `torch.topk` on the GPU, for a GPU without faiss-gpu
  (`faiss-gpu-cu12` conflicts with faiss-cpu and lags it; torch is on the GPU anyway).
`auto` takes the first of faiss-gpu, torch-cuda, faiss-cpu that this machine can run.

Every search takes batch-first float arrays and answers `(scores (Q, k) float32, ids (Q, k) int64)`,
each row best first; k is capped at the database size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

# faiss logs an INFO line per missing SIMD variant while loading; that is noise, not news.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

import faiss

from amldist.errors import UserError

BACKENDS = ("auto", "faiss-cpu", "faiss-gpu", "torch-cuda")
GPU_MAX_K = 2048  # faiss's GPU brute-force search supports k up to this; beyond it the CPU searches
TORCH_MAX_SCORES = 1 << 28  # torch-cuda: at most this many scores (1 GiB of float32) exist at a time

# search(queries (Q, D), k) -> (scores (Q, k), ids (Q, k)), rows best first.
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def faiss_gpu_available() -> bool:
    """True when faiss was built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_backend(requested: str = "auto") -> str:
    """The back-end to run: `requested` when this machine can run it (UserError otherwise), or for
    `auto` faiss on the GPU, else torch on the GPU, else faiss on the CPU."""
    import torch

    if requested not in BACKENDS:
        raise UserError(f"unknown search backend {requested!r}; choose from {', '.join(BACKENDS)}")
    if requested == "faiss-gpu" and not faiss_gpu_available():
        raise UserError("search backend faiss-gpu needs a faiss build with GPU support and a visible GPU")
    if requested == "torch-cuda" and not torch.cuda.is_available():
        raise UserError("search backend torch-cuda needs a visible CUDA GPU")
    if requested != "auto":
        return requested
    if faiss_gpu_available():
        return "faiss-gpu"
    return "torch-cuda" if torch.cuda.is_available() else "faiss-cpu"


def searcher(db: np.ndarray, backend: str = "faiss-cpu") -> SearchFn:
    """An exact search over `db` (N, D) on a back-end chosen by `choose_backend`."""
    db = _as_float32(db, "db")  # (N, D); no copy when already contiguous float32
    if backend == "torch-cuda":
        return torch_topk_search(db, device="cuda")
    if backend == "faiss-gpu":
        return _faiss_gpu_search(db)
    if backend == "faiss-cpu":
        return _faiss_cpu_search(db)
    raise ValueError(f"searcher needs a concrete back-end, not {backend!r} (see choose_backend)")


def faiss_backend() -> str:
    """faiss on the GPU when it can, else on the CPU: the default of one-off searches."""
    return "faiss-gpu" if faiss_gpu_available() else "faiss-cpu"


def search(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One exact search of `queries` (Q, D) against `db` (N, D) with faiss (`faiss_backend`)."""
    return searcher(db, faiss_backend())(queries, k)


def _as_float32(x: np.ndarray, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, D), got shape {x.shape}")
    return x


def _checked_queries(queries: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    queries = _as_float32(queries, "queries")  # (Q, D)
    if queries.shape[1] != db.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the database {db.shape[1]}")
    return queries, min(int(k), len(db))


def _empty(num_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = max(k, 0)
    return np.zeros((num_queries, k), np.float32), np.zeros((num_queries, k), np.int64)


def _faiss_cpu_search(db: np.ndarray) -> SearchFn:
    def knn(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, k = _checked_queries(queries, db, k)
        if k <= 0 or len(queries) == 0:
            return _empty(len(queries), k)
        return faiss.knn(queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)

    return knn


def _faiss_gpu_search(db: np.ndarray) -> SearchFn:
    resources = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(db.shape[1]))
    index.add(db)
    on_cpu = _faiss_cpu_search(db)

    def knn(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, k = _checked_queries(queries, db, k)
        if k <= 0 or len(queries) == 0:
            return _empty(len(queries), k)
        return index.search(queries, k) if k <= GPU_MAX_K else on_cpu(queries, k)

    knn.resources = resources  # the index lives as long as the search function and its resources
    return knn


def torch_topk_search(db: np.ndarray, device: str = "cuda", max_scores: int = TORCH_MAX_SCORES) -> SearchFn:
    """Exact top-k by a float32 matrix product in torch. The database (N, D) is copied to `device` once;
    queries go through in chunks so that no more than `max_scores` scores exist at a time. (Any device
    works; the back-end uses it on the GPU, the tests on the CPU.)"""
    import torch

    pool = torch.as_tensor(_as_float32(db, "db"), device=device)  # (N, D)

    def topk(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, k = _checked_queries(queries, db, k)
        if k <= 0 or len(queries) == 0:
            return _empty(len(queries), k)
        chunk = max(1, max_scores // max(1, len(pool)))
        scores, ids = [], []
        with torch.no_grad():
            for start in range(0, len(queries), chunk):
                block = torch.as_tensor(queries[start:start + chunk], device=device)
                top = torch.topk(block @ pool.T, k, dim=1, largest=True, sorted=True)  # (B, k)
                scores.append(top.values.cpu().numpy())
                ids.append(top.indices.cpu().numpy().astype(np.int64))
        return np.concatenate(scores), np.concatenate(ids)

    return topk


# ---------------------------------------------------------------- stored gallery indexes (amldist index)

INDEX_KINDS = ("flat", "ivfpq")
PQ_BITS = 8                  # bits per PQ code (256 centroids per sub-quantizer) unless the gallery is small
PQ_DIMS_PER_CODE = 8         # one byte per 8 dimensions by default: 1/32 of the float32 vectors
POINTS_PER_LIST = 39         # faiss's minimum of training points per k-means centroid


def ivfpq_parameters(count: int, dim: int, nlist: int | None = None, pq_m: int | None = None,
                     nprobe: int | None = None) -> dict[str, int]:
    """IVF-PQ settings for `count` vectors of `dim`: about 4 sqrt(N) lists with >= 39 training points each,
    `dim / 8` one-byte codes (a divisor of dim), fewer code bits when the gallery has fewer than 256 *
    39 points, and a quarter of the lists probed. Given values are kept (and checked)."""
    nlist = nlist or max(1, min(int(4 * count ** 0.5), count // POINTS_PER_LIST))
    if pq_m is None:
        pq_m = max(m for m in range(1, max(1, dim // PQ_DIMS_PER_CODE) + 1) if dim % m == 0)
    nbits = max(1, min(PQ_BITS, int(np.log2(max(2, count // POINTS_PER_LIST)))))
    nprobe = nprobe or max(1, nlist // 4)
    if dim % pq_m or nlist > count or nprobe > nlist:
        raise UserError(f"IVF-PQ needs pq_m dividing {dim}, nlist <= {count} images and nprobe <= nlist; "
                        f"got pq_m {pq_m}, nlist {nlist}, nprobe {nprobe}")
    return {"nlist": int(nlist), "pq_m": int(pq_m), "nbits": int(nbits), "nprobe": int(nprobe)}


def build_faiss_index(vectors: np.ndarray, kind: str = "flat", params: dict[str, int] | None = None):
    """A faiss inner-product index over `vectors` (N, D): exact flat, or IVF-PQ trained on all of them
    (faiss's k-means is seeded, so the same vectors give the same index)."""
    vectors = _as_float32(vectors, "vectors")
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivfpq":
        params = params or ivfpq_parameters(len(vectors), dim)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params["nlist"], params["pq_m"],
                                 params["nbits"], faiss.METRIC_INNER_PRODUCT)
        # ivfpq_parameters already sizes lists and codes to the gallery; faiss would still warn, once per
        # sub-quantizer, about small galleries that have fewer than 39 points per code.
        index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
        index.train(vectors)
        index.nprobe = params["nprobe"]
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")
    index.add(vectors)
    return index


def index_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `queries` (Q, D) in a faiss index: (scores, ids), best first; k is capped at its size."""
    queries = _as_float32(queries, "queries")
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the index {index.d}")
    k = min(int(k), index.ntotal)
    if k <= 0 or len(queries) == 0:
        return _empty(len(queries), k)
    return index.search(queries, k)


def write_faiss_index(index, path) -> None:
    faiss.write_index(index, str(path))


def read_faiss_index(path):
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1][:200]
        raise UserError(f"{path}: not a readable faiss index ({reason})") from None


def recall_against_flat(index, vectors: np.ndarray, k: int, max_queries: int = 1000) -> tuple[float, int]:
    """Recall@k of `index` against an exact search of the same `vectors`: up to `max_queries` of them
    (evenly spaced) serve as queries, and each one's own row is left out of both rankings (it would be
    found trivially). Returns (mean fraction of the exact top k found, queries used)."""
    vectors = _as_float32(vectors, "vectors")
    positions = np.unique(np.linspace(0, len(vectors) - 1, min(max_queries, len(vectors))).astype(np.int64))
    k = min(int(k), len(vectors) - 1)
    if k <= 0:
        return 1.0, 0
    _, approx = index_search(index, vectors[positions], k + 1)
    _, exact = search(vectors, vectors[positions], k + 1)
    found = [len(set(_others(a, p, k)) & set(_others(e, p, k))) / k
             for a, e, p in zip(approx, exact, positions)]
    return float(np.mean(found)), len(positions)


def _others(row: np.ndarray, own: int, k: int) -> list[int]:
    return [int(i) for i in row if i != own and i >= 0][:k]
