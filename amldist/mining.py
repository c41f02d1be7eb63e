"""Epoch tuple rules of the paper (§4.1) and cirtorch/aml, as pure numpy functions (no Ray).

Per epoch: draw `query_size` (query, positive) pairs and a random pool of `pool_size` images; then
- labelled losses (contrastive, triplet, multi-similarity, Contr+): hard negatives, most similar to
  the anchor first (inner product = similarity (2) sym or (3) asym), skipping the anchor's cluster and
  taking at most one image per cluster (`select_hard_negatives`);
- unlabelled losses (RKD, DarkRank): extra examples uniformly at random (`sample_random_examples`);
- aml's `ts_rand`: random negatives from distinct clusters, never the anchor's
  (`sample_random_cluster_negatives`);
- regression: no mining.

The reference (cirtorch) ranks the whole pool for every query and walks the ranking in Python. Here a
top-k search (faiss, or torch on a GPU) returns only the head of each ranking and one vectorised filter
picks the negatives; the rare anchors whose top-k holds too few distinct clusters are searched again
with a wider k, so the result is the same as the full walk.
"""

from __future__ import annotations

import logging

import numpy as np

from amldist.errors import UserError
from amldist.search import SearchFn, faiss_backend, searcher

log = logging.getLogger(__name__)

DEFAULT_QUERY_SIZE = 2000
DEFAULT_POOL_SIZE = 22_000
DEFAULT_NUM_NEGATIVES = 5
DISTANCE_EPS = 1e-6  # cirtorch adds it inside the L2 distance of its health figure

# Independent random streams of one epoch, so drawing one never shifts another.
QUERY_STREAM, POOL_STREAM, RANDOM_STREAM = 0, 1, 2
# Rules for random negatives (`draw_random_negatives`).
RANDOM_CLUSTERS, RANDOM_EXAMPLES = "clusters", "uniform"
RANDOM_RULES = (RANDOM_CLUSTERS, RANDOM_EXAMPLES)



def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The generator of one (seed, epoch, stream): the same numbers on every process and after restarts."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(stream)]))


def sample_epoch_queries(num_pairs: int, query_size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions into the (qidxs, pidxs) pair list for this epoch: min(query_size, num_pairs) distinct
    ones."""
    _require_positive(num_pairs, "the training split has no query/positive pairs")
    _require_positive(query_size, f"query size must be > 0, got {query_size}")
    return rng.permutation(num_pairs)[: min(query_size, num_pairs)].astype(np.int64)


def sample_pool(num_images: int, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """Image indices of this epoch's negative pool: min(pool_size, num_images) distinct ones."""
    _require_positive(num_images, "the training split has no images")
    _require_positive(pool_size, f"pool size must be > 0, got {pool_size}")
    return rng.permutation(num_images)[: min(pool_size, num_images)].astype(np.int64)


def epoch_pool(num_images: int, pool_size: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's negative pool (P,) image ids, drawn from (seed, epoch): the miner and every rank agree."""
    return sample_pool(num_images, pool_size, epoch_rng(seed, epoch, POOL_STREAM))


def _require_positive(value: int, message: str) -> None:
    if value <= 0:
        raise UserError(message)


def default_search_k(num_negatives: int, pool_size: int) -> int:
    """First top-k to try: wide enough that almost every anchor finds its negatives in one search.

    64 for the usual 5 negatives: faiss's CPU search selects k >= 100 with a slower method (its
    `distance_compute_min_k_reservoir`), and 64 leaves few anchors for a wider search.
    """
    return int(min(pool_size, max(64, 12 * num_negatives)))


def select_hard_negatives(anchor_vecs: np.ndarray, pool_vecs: np.ndarray, pool_ids: np.ndarray,
                          pool_clusters: np.ndarray, anchor_clusters: np.ndarray, num_negatives: int,
                          search_k: int | None = None, search: SearchFn | None = None
                          ) -> tuple[np.ndarray, float]:
    """Hard negatives of each anchor: most similar pool images first, one per cluster, never the anchor's.

    anchor_vecs (Q, D), pool_vecs (P, D), pool_ids / pool_clusters (P,), anchor_clusters (Q,).
    `search` defaults to an exact faiss flat search over pool_vecs; pass a prebuilt one (GPU, torch) to
    reuse an index across calls. Returns (negatives (Q, num_negatives) image ids, mean L2 distance from
    the anchors to their negatives, cirtorch's health figure).
    """
    anchor_vecs, pool_ids, pool_clusters, anchor_clusters = _check_mining_inputs(
        anchor_vecs, pool_vecs, pool_ids, pool_clusters, anchor_clusters, num_negatives)
    search = search or searcher(pool_vecs, faiss_backend())
    positions = _search_with_widening(search, anchor_vecs, pool_clusters, anchor_clusters, num_negatives,
                                      search_k or default_search_k(num_negatives, len(pool_ids)))
    negatives = pool_ids[positions]  # (Q, N)
    return negatives, mean_negative_distance(anchor_vecs, pool_vecs, positions)


def _check_mining_inputs(anchor_vecs, pool_vecs, pool_ids, pool_clusters, anchor_clusters, num_negatives):
    anchor_vecs = np.asarray(anchor_vecs, dtype=np.float32)
    pool_ids = np.asarray(pool_ids, dtype=np.int64)
    pool_clusters = np.asarray(pool_clusters, dtype=np.int64)
    anchor_clusters = np.asarray(anchor_clusters, dtype=np.int64)
    if anchor_vecs.ndim != 2 or pool_vecs.ndim != 2 or anchor_vecs.shape[1] != pool_vecs.shape[1]:
        raise ValueError(f"anchors {anchor_vecs.shape} and pool {pool_vecs.shape} must be (Q, D) and (P, D)")
    if not (len(pool_vecs) == len(pool_ids) == len(pool_clusters)):
        raise ValueError("pool_vecs, pool_ids and pool_clusters must have one row per pool image")
    if len(anchor_clusters) != len(anchor_vecs):
        raise ValueError("anchor_clusters must have one entry per anchor")
    _require_positive(num_negatives, f"number of negatives must be > 0, got {num_negatives}")
    _require_enough_clusters(pool_clusters, anchor_clusters, num_negatives)
    return anchor_vecs, pool_ids, pool_clusters, anchor_clusters


def _require_enough_clusters(pool_clusters: np.ndarray, anchor_clusters: np.ndarray, needed: int) -> None:
    """Refuse up front what no search could satisfy: fewer other clusters in the pool than negatives."""
    distinct = np.unique(pool_clusters)
    available = len(distinct) - np.isin(anchor_clusters, distinct)  # (Q,)
    if len(available) and available.min() < needed:
        raise UserError(f"the mining pool holds only {int(available.min())} clusters "
                        f"besides an anchor's own, fewer than the {needed} negatives asked for; use a larger "
                        "pool or fewer negatives")


def _search_with_widening(search: SearchFn, anchor_vecs, pool_clusters, anchor_clusters,
                          num_negatives: int, k: int) -> np.ndarray:
    """Positions (Q, N) of the negatives; anchors left short by a top-k search are searched again with 2k."""
    pool_size = len(pool_clusters)
    chosen = np.full((len(anchor_vecs), num_negatives), -1, dtype=np.int64)
    todo = np.arange(len(anchor_vecs))
    k = min(k, pool_size)
    while True:
        _, found = search(anchor_vecs[todo], k)  # (T, k) pool positions, best first
        found = np.asarray(found, dtype=np.int64)
        valid = found >= 0
        keys = np.where(valid, pool_clusters[np.maximum(found, 0)], 0)  # (T, k) clusters
        complete, columns = first_distinct_columns(keys, anchor_clusters[todo], num_negatives, valid)
        chosen[todo[complete]] = np.take_along_axis(found[complete], columns, axis=1)
        todo = todo[~complete]
        if todo.size == 0:
            return chosen
        if k >= pool_size:  # cannot happen after _require_enough_clusters unless search is inexact
            raise RuntimeError(f"{todo.size} anchors found fewer than {num_negatives} "
                               "negatives in the full pool")
        log.debug("widening the search from k=%d to %d for %d anchors", k, min(2 * k, pool_size), todo.size)
        k = min(2 * k, pool_size)


def first_distinct_columns(keys: np.ndarray, forbidden: np.ndarray, count: int,
                           valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cirtorch's walk ("accept if the key is new and not the row's forbidden key") for all rows at once.

    keys (Q, K) int, forbidden (Q,) int, valid (Q, K) bool. Returns (complete (Q,) bool: rows that found
    `count` accepted columns, columns (C, count): those columns of the complete rows, in order). The walk
    goes one column at a time over the rows still short, so it usually stops after a few columns.
    """
    num_rows, width = keys.shape
    used = np.repeat(np.asarray(forbidden)[:, None], count + 1, axis=1)  # (Q, count + 1) keys seen
    columns = np.full((num_rows, count), -1, dtype=np.int64)
    found = np.zeros(num_rows, dtype=np.int64)
    active = np.arange(num_rows)
    for col in range(width):
        if active.size == 0:
            break
        key = keys[active, col]  # (A,)
        accept = (used[active] != key[:, None]).all(axis=1)
        if valid is not None:
            accept &= valid[active, col]
        rows = active[accept]
        columns[rows, found[rows]] = col
        used[rows, found[rows] + 1] = key[accept]
        found[rows] += 1
        active = active[found[active] < count]
    complete = found == count
    return complete, columns[complete]


def mean_negative_distance(anchor_vecs: np.ndarray, pool_vecs: np.ndarray, positions: np.ndarray) -> float:
    """Mean over anchors and negatives of sqrt(sum((a - n + 1e-6)^2)), cirtorch's mining health figure."""
    anchors = np.asarray(anchor_vecs, dtype=np.float32)[:, None, :]  # (Q, 1, D)
    gathered = pool_vecs[positions.ravel()]  # a fresh (Q*N, D) copy: safe to overwrite below
    diff = gathered.astype(np.float32, copy=False).reshape(*positions.shape, anchors.shape[-1])  # (Q, N, D)
    np.subtract(anchors, diff, out=diff)  # in place: no (Q, N, D) temporaries, 2 passes fewer
    diff += DISTANCE_EPS
    distances = np.sqrt(np.einsum("qnd,qnd->qn", diff, diff))  # (Q, N)
    return float(distances.mean()) if distances.size else 0.0


def sample_random_examples(anchor_ids: np.ndarray, candidate_ids: np.ndarray, num_examples: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Extra examples uniformly at random for the unlabelled losses (RKD, DarkRank): no mining, no labels.

    Returns (Q, num_examples) ids drawn from `candidate_ids`, distinct within a row and never the row's
    anchor. To keep the tuple size of the labelled losses (anchor, positive, N negatives), ask for N + 1
    examples when the positive is dropped, N when it is kept.
    """
    anchor_ids = np.asarray(anchor_ids, dtype=np.int64)
    candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
    _require_positive(num_examples, f"number of random examples must be > 0, got {num_examples}")
    available = len(np.unique(candidate_ids)) - np.isin(anchor_ids, candidate_ids)
    if len(available) and available.min() < num_examples:
        raise UserError(f"the pool has only {int(available.min())} images besides an anchor, "
                        f"fewer than the {num_examples} random examples asked for")
    return _draw_distinct(candidate_ids, candidate_ids, anchor_ids, num_examples, rng)


def sample_random_cluster_negatives(anchor_clusters: np.ndarray, pool_ids: np.ndarray,
                                    pool_clusters: np.ndarray, num_negatives: int,
                                    rng: np.random.Generator) -> np.ndarray:
    """aml's `ts_rand` rule: uniformly random pool images, accepted only from a cluster not yet used
    (the anchor's own counts as used). Returns (Q, num_negatives) image ids."""
    anchor_clusters = np.asarray(anchor_clusters, dtype=np.int64)
    pool_ids = np.asarray(pool_ids, dtype=np.int64)
    pool_clusters = np.asarray(pool_clusters, dtype=np.int64)
    _require_positive(num_negatives, f"number of negatives must be > 0, got {num_negatives}")
    _require_enough_clusters(pool_clusters, anchor_clusters, num_negatives)
    return _draw_distinct(pool_ids, pool_clusters, anchor_clusters, num_negatives, rng)


def draw_random_negatives(rule: str, anchor_ids: np.ndarray, pool_ids: np.ndarray, clusters: np.ndarray,
                          count: int, seed: int, epoch: int, key: int) -> np.ndarray:
    """Random negatives (Q, count) of `anchor_ids` from the epoch's pool `pool_ids`, by `rule`:
    RANDOM_CLUSTERS (aml's ts_rand: distinct clusters, never the anchor's; labelled losses) or
    RANDOM_EXAMPLES (distinct images, never the anchor; the unlabelled losses). `clusters` (N,) of every
    image; (seed, epoch, key) pick the random stream, so a repeated call gives the same answer."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), RANDOM_STREAM, int(key)]))
    if rule == RANDOM_CLUSTERS:
        return sample_random_cluster_negatives(clusters[anchor_ids], pool_ids, clusters[pool_ids], count, rng)
    if rule == RANDOM_EXAMPLES:
        return sample_random_examples(anchor_ids, pool_ids, count, rng)
    raise UserError(f"unknown random-negative rule {rule!r}; choose from {', '.join(RANDOM_RULES)}")


def _draw_distinct(values: np.ndarray, keys: np.ndarray, forbidden: np.ndarray, count: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Per row, a stream of uniform draws from `values`, accepting a draw only when its key is new and not
    the row's forbidden key, until `count` are accepted. Rows that run out of draws get a longer stream."""
    chosen = np.full((len(forbidden), count), -1, dtype=np.int64)
    todo = np.arange(len(forbidden))
    draws = 2 * count + 8
    while todo.size:
        picks = rng.integers(0, len(values), size=(todo.size, draws))  # (T, draws) positions
        complete, columns = first_distinct_columns(keys[picks], forbidden[todo], count)
        chosen[todo[complete]] = values[np.take_along_axis(picks[complete], columns, axis=1)]
        todo = todo[~complete]
        draws *= 2
    return chosen
