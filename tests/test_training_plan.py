"""Epoch plans: what a tuple holds per loss, deterministic draws from (seed, epoch), the even rank split."""

import numpy as np
import pytest

from amldist.config import config_from_dict
from amldist.errors import UserError
from amldist.training.family import tuple_family
from amldist.training.plan import (
    SplitLabels,
    draw_epoch_tuples,
    fill_positives,
    idle_share,
    probe_anchors,
    rank_positions,
    rank_steps,
    usable_tuple_count,
)


def labels(num_clusters=12, per_cluster=5, seed=0):
    """Images in clusters; each image is the query of two pairs with same-cluster positives."""
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(num_clusters), per_cluster)
    qidxs, pidxs = [], []
    for image, cluster in enumerate(clusters):
        mates = np.flatnonzero((clusters == cluster) & (np.arange(len(clusters)) != image))
        for positive in rng.choice(mates, 2, replace=False):
            qidxs.append(image)
            pidxs.append(int(positive))
    return SplitLabels(np.array(qidxs), np.array(pidxs), clusters)


def spec_of(**sections):
    base = {"model": {"arch": "small_cnn", "pretrained": False, "teacher": "vgg16", "projection_dim": 512}}
    return tuple_family(config_from_dict({**base, **sections}))


def test_epoch_draw_is_deterministic_and_uses_the_pairs():
    split = labels()
    spec = spec_of(loss={"name": "contrastive", "asym": True})
    first = draw_epoch_tuples(split, spec, 40, seed=3, epoch=5)
    again = draw_epoch_tuples(split, spec, 40, seed=3, epoch=5)
    other = draw_epoch_tuples(split, spec, 40, seed=3, epoch=6)
    np.testing.assert_array_equal(first.anchors, again.anchors)
    np.testing.assert_array_equal(first.positives, again.positives)
    assert not np.array_equal(first.anchors, other.anchors)
    assert first.positives.shape == (40, 1)
    pairs = set(zip(split.qidxs.tolist(), split.pidxs.tolist()))
    assert all((int(a), int(p)) in pairs for a, p in zip(first.anchors, first.positives[:, 0]))
    capped = draw_epoch_tuples(split, spec, 10_000, seed=3, epoch=5)
    assert len(capped) == len(split.qidxs)  # never more tuples than pairs


def test_unlabelled_anchors_are_random_images():
    split = labels()
    reg = draw_epoch_tuples(split, spec_of(loss={"name": "regression"}), 25, seed=0, epoch=0)
    assert reg.positives.shape == (25, 0) and len(np.unique(reg.anchors)) == 25
    assert reg.anchors.max() < split.num_images


def test_extra_positives_come_from_pairs_then_the_cluster():
    split = labels()
    pairs = np.arange(len(split.qidxs))[:20]
    positives = fill_positives(split, pairs, 3, np.random.default_rng(0))
    for pair, row in zip(pairs, positives):
        query = split.qidxs[pair]
        assert row[0] == split.pidxs[pair]
        assert len(set(row.tolist())) == 3 and query not in row
        assert (split.clusters[row] == split.clusters[query]).all()
    with pytest.raises(UserError, match="num_positives"):
        fill_positives(split, pairs[:1], 5, np.random.default_rng(0))  # a cluster of 5 has 4 others


@pytest.mark.parametrize("num_tuples,batch,world",
                         [(2000, 10, 4), (23, 5, 2), (21, 5, 2), (7, 7, 3), (10, 4, 1)])
def test_rank_split_covers_every_usable_tuple_once(num_tuples, batch, world):
    per_rank = [rank_steps(num_tuples, batch, rank, world) for rank in range(world)]
    assert len({len(steps) for steps in per_rank}) == 1  # DDP: every rank takes every step
    usable = usable_tuple_count(num_tuples, batch, world)
    covered = np.sort(np.concatenate([rank_positions(steps) for steps in per_rank]))
    np.testing.assert_array_equal(covered, np.arange(usable))
    for step in range(len(per_rank[0])):
        sizes = [len(steps[step]) for steps in per_rank]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        block = np.concatenate([steps[step] for steps in per_rank])
        assert block.max() - block.min() < batch  # one global batch per step
    assert usable == num_tuples or 0 < num_tuples - usable < world


def test_rank_split_refuses_batches_smaller_than_the_world():
    with pytest.raises(UserError, match="batch_size"):
        rank_steps(20, 2, 0, 4)
    assert usable_tuple_count(21, 5, 2) == 20  # a last batch of one tuple cannot feed two ranks


@pytest.mark.parametrize("batch,world", [(10, 2), (6, 2), (5, 2), (5, 4), (7, 3), (4, 1)])
def test_idle_share_is_the_wait_for_the_fullest_rank(batch, world):
    """The share matches the split rank_steps makes: the busiest rank sets every step's time."""
    steps = [rank_steps(batch, batch, rank, world)[0] for rank in range(world)]
    busiest = max(len(step) for step in steps)
    expected = sum(busiest - len(step) for step in steps) / (world * busiest)
    assert idle_share(batch, world) == pytest.approx(expected)
    assert (idle_share(batch, world) == 0) == (batch % world == 0)


def test_idle_share_of_the_old_tiny_batch():
    assert idle_share(5, 2) == pytest.approx(1 / 6)


def test_probe_anchors_are_fixed_queries():
    split = labels()
    spec = spec_of(loss={"name": "contrastive"})
    probes = probe_anchors(split, spec, 4, seed=1)
    np.testing.assert_array_equal(probes, probe_anchors(split, spec, 4, seed=1))
    assert len(set(probes.tolist())) == 4 and set(probes.tolist()) <= set(split.qidxs.tolist())
