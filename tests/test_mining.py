"""Mining rules against brute force: full sort of the whole pool and a Python walk per anchor (cirtorch)."""

import numpy as np
import pytest

from amldist import mining, search
from amldist.errors import UserError

# Integer-valued vectors: every inner product is an integer below 2**24, so float32 search (faiss,
# torch) and the float64 reference rank identically; ties are checked for below.


def clustered_points(rng, num_clusters, per_cluster, dim=16, spread=60):
    centers = rng.integers(-300, 300, size=(num_clusters, dim))
    clusters = np.repeat(np.arange(num_clusters), per_cluster)
    points = centers[clusters] + rng.integers(-spread, spread, size=(len(clusters), dim))
    return points.astype(np.float32), clusters.astype(np.int64)


def reference_hard_negatives(anchors, pool, pool_ids, pool_clusters, anchor_clusters, count):
    """cirtorch's rule: rank the whole pool, walk it, take a cluster only when it is new."""
    scores = anchors.astype(np.float64) @ pool.astype(np.float64).T  # (Q, P)
    negatives, distances = [], []
    for row, anchor_cluster in enumerate(anchor_clusters):
        order = np.argsort(-scores[row], kind="stable")
        used, picked = {int(anchor_cluster)}, []
        for walked, position in enumerate(order):
            if int(pool_clusters[position]) in used:
                continue
            used.add(int(pool_clusters[position]))
            picked.append(position)
            if len(picked) == count:
                break
        assert_no_deciding_tie(scores[row, order[: walked + 2]], pool_clusters[order[: walked + 2]])
        negatives.append(pool_ids[picked])
        distances += [np.sqrt(((anchors[row] - pool[p] + 1e-6) ** 2).sum()) for p in picked]
    return np.array(negatives), float(np.mean(distances))


def assert_no_deciding_tie(walked_scores, walked_clusters):
    """Equal scores of images from different clusters would make the expected answer ambiguous."""
    for value in np.unique(walked_scores):
        tied = walked_clusters[walked_scores == value]
        assert len(np.unique(tied)) == 1, "a tie decides the walk in the test data: pick another seed"


def mining_case(seed, num_clusters=30, per_cluster=20, num_anchors=40, spread=60):
    rng = np.random.default_rng(seed)
    pool, pool_clusters = clustered_points(rng, num_clusters, per_cluster, spread=spread)
    pool_ids = rng.permutation(10 * len(pool))[: len(pool)]  # image ids are not pool positions
    pick = rng.choice(len(pool), num_anchors, replace=False)
    anchors = pool[pick] + rng.integers(-20, 20, size=(num_anchors, pool.shape[1])).astype(np.float32)
    return anchors, pool, pool_ids, pool_clusters, pool_clusters[pick]


@pytest.mark.parametrize("seed", [0, 1])
def test_hard_negatives_equal_full_sort_reference(seed):
    anchors, pool, ids, clusters, anchor_clusters = mining_case(seed)
    expected, expected_dist = reference_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5)
    negatives, mean_dist = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5)
    np.testing.assert_array_equal(negatives, expected)
    assert mean_dist == pytest.approx(expected_dist, rel=1e-5)


def test_negatives_skip_anchor_cluster_and_take_one_per_cluster():
    anchors, pool, ids, clusters, anchor_clusters = mining_case(2)
    negatives, _ = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 6)
    cluster_of_id = dict(zip(ids.tolist(), clusters.tolist()))
    for row, anchor_cluster in zip(negatives, anchor_clusters):
        row_clusters = [cluster_of_id[i] for i in row]
        assert anchor_cluster not in row_clusters
        assert len(set(row_clusters)) == len(row_clusters)


@pytest.mark.parametrize("spread", [10, 60])
def test_widening_when_top_k_runs_out_of_clusters(spread):
    # Clusters of 40 close images: an anchor's first 40 neighbours are mostly its own cluster, so k=8
    # finds no negative at first and every further cluster costs up to 40 ranks.
    anchors, pool, ids, clusters, anchor_clusters = mining_case(3, num_clusters=12, per_cluster=40,
                                                                spread=spread)
    inner = search.searcher(pool, "faiss-cpu")
    asked = []

    def recording_search(queries, k):
        asked.append((len(queries), k))
        return inner(queries, k)

    negatives, _ = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5,
                                                search_k=8, search=recording_search)
    expected, _ = reference_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5)
    np.testing.assert_array_equal(negatives, expected)
    ks, counts = [k for _, k in asked], [n for n, _ in asked]
    assert ks == [8 * 2**i for i in range(len(ks))] and len(ks) > 3  # doubled until every anchor was served
    assert counts == sorted(counts, reverse=True)  # only the anchors left short are searched again
    if spread == 60:
        assert counts[-1] < len(anchors)


def test_widening_reaches_the_whole_pool():
    # Two clusters besides the anchor's, each needing a walk past most of the pool.
    anchors, pool, ids, clusters, anchor_clusters = mining_case(4, num_clusters=3, per_cluster=50,
                                                                 num_anchors=10, spread=5)
    negatives, _ = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 2, search_k=1)
    expected, _ = reference_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 2)
    np.testing.assert_array_equal(negatives, expected)


def test_torch_topk_search_equals_faiss():
    anchors, pool, ids, clusters, anchor_clusters = mining_case(5)
    torch_search = search.torch_topk_search(pool, device="cpu", max_scores=7 * len(pool))  # 7-anchor chunks
    by_torch = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5,
                                            search=torch_search)
    by_faiss = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5)
    np.testing.assert_array_equal(by_torch[0], by_faiss[0])
    assert by_torch[1] == pytest.approx(by_faiss[1])


@pytest.mark.gpu
def test_torch_topk_search_on_the_gpu_equals_faiss():
    anchors, pool, ids, clusters, anchor_clusters = mining_case(5)
    on_gpu = search.torch_topk_search(pool, device="cuda")
    by_gpu = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5, search=on_gpu)
    by_faiss = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5)
    np.testing.assert_array_equal(by_gpu[0], by_faiss[0])


@pytest.mark.gpu
def test_faiss_gpu_search_equals_faiss_on_the_cpu():
    if not search.faiss_gpu_available():
        pytest.skip("faiss has no GPU support here (faiss-gpu-cu12 not installed)")
    anchors, pool, ids, clusters, anchor_clusters = mining_case(5)
    on_gpu = search.searcher(pool, "faiss-gpu")
    by_gpu = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5, search=on_gpu)
    by_cpu = mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 5)
    np.testing.assert_array_equal(by_gpu[0], by_cpu[0])
    assert on_gpu(anchors, search.GPU_MAX_K + 1)[1].shape[1] == min(len(pool), search.GPU_MAX_K + 1)


def test_epoch_pool_is_the_miners_draw():
    np.testing.assert_array_equal(mining.epoch_pool(500, 60, seed=7, epoch=3),
                                  mining.sample_pool(500, 60, mining.epoch_rng(7, 3, mining.POOL_STREAM)))


def test_random_negatives_by_rule_repeat_per_key_and_refuse_unknown_rules():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(20), 5)
    pool = rng.permutation(100)[:60]
    anchors = np.array([0, 17, 42])
    by_clusters = mining.draw_random_negatives(mining.RANDOM_CLUSTERS, anchors, pool, clusters, 4, 1, 2, 0)
    np.testing.assert_array_equal(
        by_clusters,
        mining.draw_random_negatives(mining.RANDOM_CLUSTERS, anchors, pool, clusters, 4, 1, 2, 0))
    assert np.isin(by_clusters, pool).all() \
        and not (clusters[by_clusters] == clusters[anchors][:, None]).any()
    assert all(len(set(clusters[row])) == 4 for row in by_clusters)
    examples = mining.draw_random_negatives(mining.RANDOM_EXAMPLES, anchors, pool, clusters, 4, 1, 2, 0)
    assert np.isin(examples, pool).all() and not (examples == anchors[:, None]).any()
    assert not np.array_equal(examples, mining.draw_random_negatives(mining.RANDOM_EXAMPLES, anchors, pool,
                                                                     clusters, 4, 1, 2, 1))
    with pytest.raises(UserError, match="random-negative rule"):
        mining.draw_random_negatives("nearest", anchors, pool, clusters, 4, 1, 2, 0)


def test_no_anchors_give_no_negatives():
    _, pool, ids, clusters, _ = mining_case(0)
    negatives, mean_dist = mining.select_hard_negatives(np.zeros((0, pool.shape[1]), np.float32), pool, ids,
                                                        clusters, np.zeros(0, np.int64), 5)
    assert negatives.shape == (0, 5) and mean_dist == 0.0


def test_too_few_clusters_is_a_user_error():
    anchors, pool, ids, clusters, anchor_clusters = mining_case(6, num_clusters=4, per_cluster=5,
                                                                num_anchors=3)
    with pytest.raises(UserError, match="clusters"):
        mining.select_hard_negatives(anchors, pool, ids, clusters, anchor_clusters, 4)
    with pytest.raises(UserError, match="clusters"):
        mining.sample_random_cluster_negatives(anchor_clusters, ids, clusters, 4, np.random.default_rng(0))


@pytest.mark.parametrize("count", [1, 3, 5])
def test_first_distinct_columns_equal_python_walk(count):
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 6, size=(200, 12))
    forbidden = rng.integers(0, 6, size=200)
    valid = rng.random((200, 12)) > 0.2
    complete, columns = mining.first_distinct_columns(keys, forbidden, count, valid)
    expected_rows = []
    for row in range(200):
        seen, accepted = {forbidden[row]}, []
        for col in range(12):
            if valid[row, col] and keys[row, col] not in seen and len(accepted) < count:
                seen.add(keys[row, col])
                accepted.append(col)
        assert complete[row] == (len(accepted) == count)
        if len(accepted) == count:
            expected_rows.append(accepted)
    assert complete.any() and (count < 5 or not complete.all())  # at 5 of 5 keys, some rows fall short
    np.testing.assert_array_equal(columns, np.array(expected_rows).reshape(-1, count))


def test_pool_and_queries_are_deterministic_per_seed_and_epoch():
    def pool(seed, epoch):
        return mining.sample_pool(1000, 300, mining.epoch_rng(seed, epoch, mining.POOL_STREAM))

    np.testing.assert_array_equal(pool(0, 3), pool(0, 3))
    assert not np.array_equal(pool(0, 3), pool(0, 4))
    assert not np.array_equal(pool(0, 3), pool(1, 3))
    drawn = pool(0, 3)
    assert len(np.unique(drawn)) == 300 and drawn.min() >= 0 and drawn.max() < 1000
    assert len(mining.sample_pool(50, 22_000, np.random.default_rng(0))) == 50  # capped, like cirtorch
    queries = mining.sample_epoch_queries(181, 2000, mining.epoch_rng(0, 0, mining.QUERY_STREAM))
    np.testing.assert_array_equal(np.sort(queries), np.arange(181))
    with pytest.raises(UserError):
        mining.sample_pool(0, 10, np.random.default_rng(0))


def test_random_examples_are_distinct_uniform_and_never_the_anchor():
    candidates = np.arange(100, 140)
    anchors = np.repeat(candidates[:4], 2000)  # (8000,)
    examples = mining.sample_random_examples(anchors, candidates, 6, np.random.default_rng(0))
    assert examples.shape == (8000, 6)
    assert np.isin(examples, candidates).all()
    assert not (examples == anchors[:, None]).any()
    assert all(len(set(row)) == 6 for row in examples.tolist())
    counts = np.bincount(examples[anchors == 100].ravel() - 100, minlength=40)[1:]  # 39 allowed ids
    expected = 2000 * 6 / 39
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # uniform over the other images
    with pytest.raises(UserError):
        mining.sample_random_examples([0], [0, 1, 2], 3, np.random.default_rng(0))


def test_random_cluster_negatives_follow_ts_rand_rule():
    # Cluster sizes 1, 2, ..., 8: a uniform draw over images picks cluster c with weight |c|.
    clusters = np.repeat(np.arange(8), np.arange(1, 9))
    ids = np.arange(len(clusters)) + 1000
    anchor_clusters = np.full(6000, 7)
    negatives = mining.sample_random_cluster_negatives(anchor_clusters, ids, clusters, 3,
                                                       np.random.default_rng(1))
    neg_clusters = clusters[negatives - 1000]  # (6000, 3)
    assert not (neg_clusters == 7).any()
    assert all(len(set(row)) == 3 for row in neg_clusters.tolist())
    first = np.bincount(neg_clusters[:, 0], minlength=8)[:7] / 6000
    np.testing.assert_allclose(first, np.arange(1, 8) / 28, atol=0.02)


def test_mean_negative_distance_formula():
    anchors = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    pool = np.array([[3.0, 4.0], [1.0, 1.0], [0.0, 1.0]], np.float32)
    positions = np.array([[0, 2], [1, 2]])
    got = mining.mean_negative_distance(anchors, pool, positions)
    terms = [np.sqrt(((anchors[q] - pool[p] + 1e-6) ** 2).sum()) for q in range(2) for p in positions[q]]
    assert got == pytest.approx(np.mean(terms), rel=1e-6)
