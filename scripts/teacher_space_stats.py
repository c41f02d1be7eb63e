"""How well a teacher's feature store separates the training clusters: the similarities a margin meets.

    python scripts/teacher_space_stats.py --store STORE_DIR \
        --db data/synth-tiny/train/retrieval-SfM-120k/retrieval-SfM-120k.pkl

For every query image of the training split's pairs, in the teacher's space: the similarity to its
positive, and to its hard negatives as asymmetric mining at convergence would pick them (the teacher's
own vector as the anchor, the whole training split as the pool, most similar first, one per cluster,
never the anchor's; `amldist.mining.select_hard_negatives`). Prints the means and quartiles. When the
hard negatives sit above a contrastive margin m, the negative term of Contr+ (10) pushes a student's
anchor below m from vectors that its self term pulls it next to (docs/TRAINING.md, "The tiny presets").
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from amldist.datasets.formats import read_sfm_db
from amldist.errors import UserError
from amldist.feature_store import FeatureStore
from amldist.mining import select_hard_negatives


def similarities(features: np.ndarray, qidxs: np.ndarray, pidxs: np.ndarray, clusters: np.ndarray,
                 num_negatives: int) -> tuple[np.ndarray, np.ndarray]:
    """(positive similarity (M,), hard-negative similarities (Q, num_negatives)) of the distinct queries."""
    positive = np.einsum("md,md->m", features[qidxs], features[pidxs])
    anchors = np.unique(qidxs)
    negatives, _ = select_hard_negatives(features[anchors], features, np.arange(len(features)), clusters,
                                         clusters[anchors], num_negatives)
    negative = np.einsum("qd,qnd->qn", features[anchors], features[negatives])
    return positive, negative


def describe(name: str, values: np.ndarray) -> str:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return f"{name:<24} mean {values.mean():.3f}   quartiles {q1:.3f} / {median:.3f} / {q3:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="teacher feature store of the training split")
    parser.add_argument("--db", required=True,
                        help="the dataset's retrieval-SfM-120k.pkl (pairs and clusters)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--neg-num", type=int, default=5, help="hard negatives per query (default 5)")
    args = parser.parse_args(argv)
    try:
        splits = read_sfm_db(args.db)
        if args.split not in splits:
            raise UserError(f"{args.db} has no split {args.split!r} (it has {', '.join(splits)})")
        split = splits[args.split]
        features = np.asarray(FeatureStore.open(args.store).features, dtype=np.float32)
        if len(features) != len(split.cluster):
            raise UserError(f"{args.store} holds {len(features)} vectors, the {args.split} split "
                            f"{len(split.cluster)} images")
        positive, negative = similarities(features, np.asarray(split.qidxs), np.asarray(split.pidxs),
                                          np.asarray(split.cluster), args.neg_num)
    except (UserError, OSError) as err:
        print(f"teacher_space_stats: {err}", file=sys.stderr)
        return 2
    print(f"{len(features)} images, {len(positive)} pairs, {len(negative)} queries; inner products of "
          "L2-normalised teacher vectors")
    print(describe("positive", positive))
    for rank in range(negative.shape[1]):
        print(describe(f"hard negative {rank + 1}", negative[:, rank]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
