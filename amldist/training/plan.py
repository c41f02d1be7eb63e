"""The epoch plan: which tuples an epoch trains on and which of them each rank handles (no Ray).

Every draw comes from (seed, epoch) alone (`amldist.mining.epoch_rng`), so every rank, a restarted
worker and the miner agree without talking to each other, and a resumed run trains on the same
tuples as an uninterrupted one. What a tuple holds depends on the loss's family
(`amldist.training.family`): pair queries with their positives for the labelled losses, random
training images for regression and the relational losses.

Global batches hold `batch_size` consecutive tuples of the epoch; each is cut into `world_size`
nearly equal parts, one per rank (`rank_steps`), so all ranks take the same number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from amldist import mining
from amldist.errors import UserError

if TYPE_CHECKING:
    from amldist.training.family import TupleFamily

# An extra stream of (seed, epoch) for filling positives beyond the pair's own (one per epoch).
POSITIVE_STREAM = 3
# A fixed stream (independent of the epoch) for the anchors shown in the hard-negative grid.
PROBE_STREAM = 99


@dataclass(frozen=True)
class SplitLabels:
    """The labels of a training split the plan needs: pairs and the cluster of every image."""

    qidxs: np.ndarray     # (M,) query image of each pair
    pidxs: np.ndarray     # (M,) positive image of each pair
    clusters: np.ndarray  # (N,) cluster of each image

    @classmethod
    def from_split(cls, split) -> SplitLabels:
        """From an `amldist.datasets.formats.SfmSplit`."""
        return cls(np.asarray(split.qidxs, np.int64), np.asarray(split.pidxs, np.int64),
                   np.asarray(split.cluster, np.int64))

    @property
    def num_images(self) -> int:
        return len(self.clusters)


@dataclass(frozen=True)
class EpochTuples:
    """The epoch's tuples before mining: anchors (Q,) and positives (Q, P) image ids."""

    anchors: np.ndarray
    positives: np.ndarray

    def __len__(self) -> int:
        return len(self.anchors)


@dataclass(frozen=True)
class StepTuples:
    """The tuples one rank trains on in one step, as image ids."""

    anchors: np.ndarray    # (b,)
    positives: np.ndarray  # (b, P), P may be 0
    negatives: np.ndarray  # (b, N): negatives, or a relational loss's random examples; N may be 0

    def __len__(self) -> int:
        return len(self.anchors)


def draw_epoch_tuples(labels: SplitLabels, family: TupleFamily, queries_per_epoch: int, seed: int,
                      epoch: int) -> EpochTuples:
    """The anchors (and positives) of one epoch, the same on every rank."""
    rng = mining.epoch_rng(seed, epoch, mining.QUERY_STREAM)
    if not family.uses_pairs:
        anchors = mining.sample_pool(labels.num_images, queries_per_epoch, rng)
        return EpochTuples(anchors, np.zeros((len(anchors), 0), np.int64))
    pairs = mining.sample_epoch_queries(len(labels.qidxs), queries_per_epoch, rng)  # (Q,) pair positions
    anchors = labels.qidxs[pairs]
    if family.num_positives == 0:
        return EpochTuples(anchors, np.zeros((len(anchors), 0), np.int64))
    positives = fill_positives(labels, pairs, family.num_positives,
                               mining.epoch_rng(seed, epoch, POSITIVE_STREAM))
    return EpochTuples(anchors, positives)


def fill_positives(labels: SplitLabels, pairs: np.ndarray, count: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(Q, count) positives: the drawn pair's own first (cirtorch's only one), then the query's other
    pkl positives in pair order, then random other images of its cluster. SfM-120k has no positive list
    beyond its pairs; same-cluster images are what those pairs were verified from."""
    out = np.empty((len(pairs), count), np.int64)
    for row, pair in enumerate(pairs):
        query = labels.qidxs[pair]
        chosen = [int(labels.pidxs[pair])]
        for other in labels.pidxs[labels.qidxs == query]:
            if len(chosen) == count:
                break
            if int(other) not in chosen and other != query:
                chosen.append(int(other))
        if len(chosen) < count:
            same = np.flatnonzero(labels.clusters == labels.clusters[query])
            spare = [int(i) for i in rng.permutation(same) if i != query and int(i) not in chosen]
            if len(chosen) + len(spare) < count:
                raise UserError(f"mining.num_positives: image {query} has only {len(chosen) + len(spare)} "
                                f"positives in its cluster, fewer than the {count} asked for")
            chosen += spare[: count - len(chosen)]
        out[row] = chosen
    return out


def usable_tuple_count(num_tuples: int, batch_size: int, world_size: int) -> int:
    """Tuples the epoch trains on: all, except a last global batch too small to give every rank one
    tuple (DDP needs every rank in every step); with the paper's 2000 / 10 nothing is dropped."""
    if batch_size < world_size:
        raise UserError(f"run.batch_size: {batch_size} tuples cannot be shared by {world_size} workers; "
                        f"use a batch of at least {world_size} tuples or fewer workers")
    remainder = num_tuples % batch_size
    usable = num_tuples - remainder if 0 < remainder < world_size else num_tuples
    if usable == 0:
        raise UserError(f"mining.queries_per_epoch: {num_tuples} tuples cannot be shared by "
                        f"{world_size} workers")
    return usable


def busiest_rank_tuples(batch_size: int, world_size: int) -> int:
    """Tuples of the fullest rank in a step of `rank_steps`' split: ceil(batch / W)."""
    return -(-batch_size // world_size)


def idle_share(batch_size: int, world_size: int) -> float:
    """Share of the workers' step time spent waiting when `batch_size` tuples do not split evenly over
    `world_size` ranks: every DDP step waits for the busiest ranks (batch 5 on 2 workers: 3 and 2
    tuples, one sixth of the time idle)."""
    return 1.0 - batch_size / (world_size * busiest_rank_tuples(batch_size, world_size))


def rank_steps(num_tuples: int, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """Positions (into the epoch's tuples) that `rank` trains on at each step.

    Global step s covers tuples [s * batch_size, (s + 1) * batch_size); rank r gets the r-th of
    `world_size` nearly equal consecutive parts of it. Every rank gets the same number of steps.
    """
    usable = usable_tuple_count(num_tuples, batch_size, world_size)
    steps = []
    for start in range(0, usable, batch_size):
        block = np.arange(start, min(start + batch_size, usable))
        steps.append(np.array_split(block, world_size)[rank])
    return steps


def rank_positions(steps: list[np.ndarray]) -> np.ndarray:
    """All tuple positions of a rank, in step order."""
    return np.concatenate(steps) if steps else np.zeros(0, np.int64)


def probe_anchors(labels: SplitLabels, family: TupleFamily, count: int, seed: int) -> np.ndarray:
    """A few fixed anchors whose mined negatives are shown over the epochs (the paper's Fig. 2)."""
    rng = mining.epoch_rng(seed, 0, PROBE_STREAM)
    candidates = np.unique(labels.qidxs) if family.uses_pairs else np.arange(labels.num_images)
    return np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False)).astype(np.int64)
