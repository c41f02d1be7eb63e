"""The val split and the query/positive pairs of an imported set: pure numpy, deterministic by seed.

SfM-120k's pairs are views verified against one 3D model; an imported landmark has no model, so any two
of its images are a candidate pair. Pairs follow a random cycle through each landmark's images: the image
at position k of the cycle is the query of the pairs whose positives are the next `per_image` images
(k+1, ..., k+per_image, wrapping around). So no image is its own positive, a query never gets the same
positive twice, every image is a positive as often as it is a query, and the whole draw is a few array
operations, also for GLDv2's 200k landmarks. A landmark gives at most `max_per_landmark` pairs (the first
queries of its cycle): cirtorch draws an epoch's pairs uniformly from the list, and without a cap a
landmark with thousands of photos would fill most epochs.
"""

from __future__ import annotations

import numpy as np

from amldist.errors import UserError

IMPORT_STREAM = 23  # the numpy seed sequence is [seed, IMPORT_STREAM, purpose]
SPLIT_DRAW, PAIR_DRAW, WHITEN_DRAW = 0, 1, 2


def rng_for(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, IMPORT_STREAM, purpose])


def choose_val_landmarks(landmarks: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The landmarks (a subset of the sorted unique `landmarks`) that form the val split: round(fraction x
    count) of them, at least one, and at least one left for training."""
    count = len(landmarks)
    if count < 2:
        raise UserError(f"an imported set needs at least 2 landmarks (one for train, one for val); "
                        f"{count} {'has' if count == 1 else 'have'} enough usable images")
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}")
    num_val = min(max(1, round(fraction * count)), count - 1)
    chosen = rng_for(seed, SPLIT_DRAW).permutation(count)[:num_val]
    return np.sort(landmarks[chosen])


def cycle_pairs(clusters: np.ndarray, per_image: int, max_per_landmark: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(qidxs, pidxs) int64 into `clusters` (N,), sorted by query then positive."""
    count = len(clusters)
    if count == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Images grouped by cluster, in random order inside each group: the cycles.
    order = np.lexsort((rng.random(count), clusters))
    grouped = clusters[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    sizes = np.diff(np.r_[starts, count])
    group = np.repeat(np.arange(len(starts)), sizes)
    position = np.arange(count) - starts[group]
    size = sizes[group]
    steps = np.minimum(per_image, size - 1)  # positives per query in this landmark
    queries, positives = [], []
    for step in range(1, per_image + 1):
        # pair number position * steps + (step - 1) within its landmark, kept below the cap
        keep = (step <= steps) & (position * steps + step - 1 < max_per_landmark)
        queries.append(order[keep])
        positives.append(order[starts[group[keep]] + (position[keep] + step) % size[keep]])
    qidxs, pidxs = np.concatenate(queries), np.concatenate(positives)
    ordering = np.lexsort((pidxs, qidxs))
    return qidxs[ordering].astype(np.int64), pidxs[ordering].astype(np.int64)


def whiten_pairs(clusters: np.ndarray, max_per_landmark: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(members, qidxs, pidxs): one pair per image along its own cycle (capped like the training pairs);
    `members` are the positions (into `clusters`) of the images the pairs use, the pair indices point into
    `members`. Learning Lw reads only paired images, so the whitening db lists only those."""
    qidxs, pidxs = cycle_pairs(clusters, 1, max_per_landmark, rng_for(seed, WHITEN_DRAW))
    members = np.unique(np.concatenate([qidxs, pidxs]))
    return members, np.searchsorted(members, qidxs), np.searchsorted(members, pidxs)
