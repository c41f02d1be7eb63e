"""Exact inner-product search behind one small wrapper.

faiss is imported once here and nowhere else. A flat (exact) IP index runs on the GPU when the
installed faiss has GPU support and a GPU is present, on the CPU otherwise; without faiss at all a
numpy matmul + sort gives the same ranking. Callers pass batch-first float arrays and get
`(scores (Q, k), ids (Q, k))`, best first.
"""

from __future__ import annotations

import logging

import numpy as np

# faiss logs an INFO line per missing SIMD variant while loading; that is noise, not news.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency, but keep a working fallback
    faiss = None

log = logging.getLogger(__name__)

# faiss GPU brute-force search supports k up to 2048; beyond that we search on the CPU.
GPU_MAX_K = 2048


def faiss_available() -> bool:
    return faiss is not None


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees at least one GPU."""
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_float32(x: np.ndarray, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, D), got shape {x.shape}")
    return x


class FlatIPIndex:
    """Exact maximum-inner-product index over (N, D) vectors."""

    def __init__(self, dim: int, use_faiss: bool | None = None, use_gpu: bool | None = None):
        self.dim = dim
        self.use_faiss = faiss_available() if use_faiss is None else (use_faiss and faiss_available())
        self.use_gpu = self.use_faiss and (gpu_available() if use_gpu is None else use_gpu)
        self._chunks: list[np.ndarray] = []  # numpy fallback storage
        self._index = None
        self._gpu_index = None
        if self.use_faiss:
            self._index = faiss.IndexFlatIP(dim)
            if self.use_gpu:
                self._gpu_resources = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)

    @property
    def ntotal(self) -> int:
        if self.use_faiss:
            return int((self._gpu_index or self._index).ntotal)
        return sum(len(c) for c in self._chunks)

    def add(self, vectors: np.ndarray) -> None:
        vectors = _as_float32(vectors, "vectors")  # (N, D)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, index has {self.dim}")
        if self._gpu_index is not None:
            self._gpu_index.add(vectors)
            self._index.add(vectors)  # CPU copy, for k beyond what GPU search supports
        elif self.use_faiss:
            self._index.add(vectors)
        else:
            self._chunks.append(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k database rows for each query, best first: (scores (Q, k) float32, ids (Q, k) int64)."""
        queries = _as_float32(queries, "queries")  # (Q, D)
        k = min(int(k), self.ntotal)
        if k <= 0 or len(queries) == 0:
            return np.zeros((len(queries), max(k, 0)), np.float32), np.zeros((len(queries), max(k, 0)), np.int64)
        if self._gpu_index is not None and k <= GPU_MAX_K:
            return self._gpu_index.search(queries, k)
        if self.use_faiss:
            return self._index.search(queries, k)
        return _numpy_search(np.concatenate(self._chunks), queries, k)


def _numpy_search(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ db.T  # (Q, N)
    if k < scores.shape[1]:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k), unordered
    else:
        top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    ids = np.take_along_axis(top, order, axis=1).astype(np.int64)
    return np.take_along_axis(top_scores, order, axis=1), ids


def search(db: np.ndarray, queries: np.ndarray, k: int, use_faiss: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One-shot exact search of `queries (Q, D)` against `db (N, D)`; see FlatIPIndex.search."""
    return searcher(db, use_faiss=use_faiss)(queries, k)


def searcher(db: np.ndarray, use_faiss: bool | None = None, use_gpu: bool | None = None):
    """`search(queries, k)` over `db (N, D)`, answered like FlatIPIndex.search.

    On the CPU faiss's brute-force kNN reads `db` where it lies: building an index would first copy it
    (45 MB for a 22k x 512 mining pool, every epoch). On the GPU the index is built once, since the
    copy to the device is the point.
    """
    db = _as_float32(db, "db")  # (N, D); no copy when already contiguous float32
    on_gpu = gpu_available() if use_gpu is None else use_gpu
    if faiss_available() and use_faiss is not False and not on_gpu:
        def knn(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            queries = _as_float32(queries, "queries")  # (Q, D)
            if queries.shape[1] != db.shape[1]:
                raise ValueError(f"queries have dimension {queries.shape[1]}, the database {db.shape[1]}")
            k = min(int(k), len(db))
            if k <= 0 or len(queries) == 0:
                return np.zeros((len(queries), max(k, 0)), np.float32), np.zeros((len(queries), max(k, 0)), np.int64)
            return faiss.knn(queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)

        return knn
    index = FlatIPIndex(db.shape[1], use_faiss=use_faiss, use_gpu=use_gpu)
    index.add(db)
    return index.search
