"""Why learned whitening helps or hurts on a synthetic root, measured on the validation split only.

    python scripts/whitening_study.py --root data/synth-tiny --teacher T.pth [--student S.pth] \
        [--image-size 128]

The synthetic whitening set holds every SfM image, the val split's included (as the real one holds all
of SfM-120k), so whitening learned on it has seen the val clusters: val mAP after such whitening is not
a fair measure (it reaches 100 for an off-the-shelf network). Here whitening is learned on the pairs
whose two images are both training images, and applied to the val split:
- the rank and spread of the pair-difference covariance S against the dimension (cirtorch's Lw inverts
  the Cholesky factor of S; a rank below the dimension leaves directions that only its 1e-10 jitter
  scales, amplified about 1e5 times);
- with --student: val mAP after centring alone and after Lw, and per group of Lw's directions the
  teacher's variance against the student's error (student minus teacher, same training image), both in
  units of the teacher's matching-pair variance;
- val mAP (%) of the teacher alone (sym) and, with --student, of student queries against the teacher's
  val images (asym), raw and after Lw learned from: the file's pairs (one per image), k pairs per image,
  every pair of each cluster; each with cirtorch's Lw and with S shrunk towards a multiple of the
  identity by the Ledoit-Wolf estimate of the intensity (which falls to 0 as pairs outnumber dimensions).

Features are computed once per network into ROOT/features/whitening-study/ (amldist features stores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amldist.datasets import formats, layout
from amldist.feature_store import FeatureStore
from amldist.teacher_features import compute_features
from amldist.training.plan import SplitLabels
from amldist.training.validation import ValidationSet
from amldist.whiten import cholesky_with_jitter

DATASET = "retrieval-SfM-120k"


def features(root: Path, network: Path, split: str, image_size: int) -> np.ndarray:
    out = root / "features" / "whitening-study" / f"{network.parent.name}-{network.stem}-{split}-{image_size}"
    shards = layout.shards_dir(root, DATASET, image_size) / split
    compute_features(network, shards, out, image_size=image_size)
    return FeatureStore.open(out).features.astype(np.float64)


def cluster_pairs(clusters: np.ndarray, per_image: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each image with `per_image` random others of its cluster (all of them when per_image is large)."""
    queries, positives = [], []
    for i, cluster in enumerate(clusters):
        others = np.flatnonzero((clusters == cluster) & (np.arange(len(clusters)) != i))
        picked = rng.choice(others, size=min(per_image, len(others)), replace=False)
        queries += [i] * len(picked)
        positives += [int(j) for j in picked]
    return np.asarray(queries), np.asarray(positives)


def learn(X: np.ndarray, qidxs: np.ndarray, pidxs: np.ndarray, shrink: bool,
          queries: np.ndarray | None = None):
    """cirtorch's Lw (optionally with a Ledoit-Wolf shrunk S); returns x -> whitened, L2-normalised.
    `queries`: the pairs' query side from another network (the student's vectors of the same images), so
    that S holds the differences asymmetric testing meets: student query minus teacher positive."""
    m = X[qidxs].mean(axis=0)
    diffs = (X if queries is None else queries)[qidxs] - X[pidxs]
    S = diffs.T @ diffs / len(qidxs)
    if shrink:
        from sklearn.covariance import ledoit_wolf_shrinkage

        alpha = float(ledoit_wolf_shrinkage(diffs, assume_centered=True))
        S = (1 - alpha) * S + alpha * np.trace(S) / len(S) * np.eye(len(S))
    P1 = np.linalg.inv(cholesky_with_jitter(S))
    Y = (X - m) @ P1.T
    P = np.linalg.eigh(Y.T @ Y)[1][:, ::-1].T @ P1

    def apply(A: np.ndarray) -> np.ndarray:
        Z = (A - m) @ P.T
        return Z / (np.linalg.norm(Z, axis=1, keepdims=True) + 1e-6)
    return apply


def error_in_whitened_space(teacher_whiten: np.ndarray, student_whiten: np.ndarray, teacher_val: np.ndarray,
                            student_val: np.ndarray, q: np.ndarray, p: np.ndarray, score) -> None:
    """Where asymmetric testing meets the student's error once Lw has rescaled the teacher's space.

    After Lw the teacher's matching-pair differences have unit variance in every direction, and each
    direction's variance over all images says how much the teacher separates images there (1: no more
    than a matching pair differs). The student's error (its vector minus the teacher's, same image)
    measured in the same units says how much of that separation its queries blur. Also: val mAP after
    centring alone (Lw's first step, the mean of the pairs' queries subtracted), which tells centring
    apart from the rescaling."""
    from amldist.whiten import apply_whitening, learn_whitening

    lw = learn_whitening(teacher_whiten, q, p)

    def centred(x: np.ndarray) -> np.ndarray:
        y = x - lw.m
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    print(f"centring only: teacher sym {score(centred(teacher_val), centred(teacher_val))}, "
          f"asym {score(centred(teacher_val), centred(student_val))}")
    full_t, full_s = apply_whitening(teacher_val, lw), apply_whitening(student_val, lw)
    print(f"Lw (file pairs of training images): teacher sym {score(full_t, full_t)}, "
          f"asym {score(full_t, full_s)}")
    spread = ((teacher_whiten - lw.m) @ lw.P.T).var(axis=0)        # (D,) teacher, per Lw direction
    error = (((student_whiten - teacher_whiten) @ lw.P.T) ** 2).mean(axis=0)  # (D,) student's error
    for lo, hi in ((0, 8), (8, 32), (32, len(spread))):
        print(f"Lw directions {lo + 1}-{hi}: teacher variance {spread[lo:hi].mean():.2f}, student error "
              f"{error[lo:hi].mean():.2f} (both in units of the teacher's matching-pair variance)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True, help="network or checkpoint file")
    parser.add_argument("--student", type=Path, default=None, help="a student trained in the teacher's space")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--pairs-per-image", type=int, default=4)
    args = parser.parse_args()
    db = formats.read_sfm_db(layout.train_db_path(args.root, DATASET))
    whiten = formats.read_whiten_db(layout.whiten_db_path(args.root, DATASET))
    ntrain = len(db["train"].cids)
    if list(whiten.cids[:ntrain]) != list(db["train"].cids):
        raise SystemExit("the whitening set does not start with the training images (not a synthetic root?)")
    qidxs, pidxs = np.asarray(whiten.qidxs), np.asarray(whiten.pidxs)
    train_only = (qidxs < ntrain) & (pidxs < ntrain)
    val = ValidationSet.from_labels(SplitLabels.from_split(db["val"]))

    def score(database: np.ndarray, queries: np.ndarray) -> float:
        return round(val.mean_ap(database.astype(np.float32), queries[val.query_ids].astype(np.float32)), 1)

    teacher_whiten = features(args.root, args.teacher, "whiten", args.image_size)[:ntrain]
    teacher_val = features(args.root, args.teacher, "val", args.image_size)
    student_val = features(args.root, args.student, "val", args.image_size) if args.student else None
    student_whiten = features(args.root, args.student, "whiten",
                              args.image_size)[:ntrain] if args.student else None
    rng = np.random.default_rng(0)
    clusters = np.asarray(db["train"].cluster)
    pair_sets = {"file (1 per image)": (qidxs[train_only], pidxs[train_only]),
                 f"{args.pairs_per_image} per image": cluster_pairs(clusters, args.pairs_per_image, rng),
                 "every pair in a cluster": cluster_pairs(clusters, 10 ** 9, rng)}
    dim = teacher_whiten.shape[1]
    print(f"teacher d={dim}, {ntrain} training images in {len(set(clusters))} clusters")
    raw = f"raw: teacher sym {score(teacher_val, teacher_val)}"
    print(raw + (f", asym {score(teacher_val, student_val)}" if student_val is not None else ""))
    if student_val is not None:
        error_in_whitened_space(teacher_whiten, student_whiten, teacher_val, student_val,
                                qidxs[train_only], pidxs[train_only], score)
    for name, (q, p) in pair_sets.items():
        diffs = teacher_whiten[q] - teacher_whiten[p]
        eig = np.linalg.eigvalsh(diffs.T @ diffs / len(q))[::-1]
        rank = int((eig > eig[0] * 1e-10).sum())
        print(f"pairs: {name}, {len(q)} pairs, {len(q) / dim:.1f} per dimension, rank of S {rank} of {dim}, "
              f"smallest/largest eigenvalue {max(eig[-1], 0) / eig[0]:.1e}")
        for shrink in (False, True):
            apply = learn(teacher_whiten, q, p, shrink)
            label = "  Lw + Ledoit-Wolf" if shrink else "  Lw"
            line = f"{label}: teacher sym {score(apply(teacher_val), apply(teacher_val))}"
            if student_val is not None:
                line += f", asym {score(apply(teacher_val), apply(student_val))}"
                cross = learn(teacher_whiten, q, p, shrink, queries=student_whiten)
                cross_asym = score(cross(teacher_val), cross(student_val))
                line += f"; S from student-teacher pairs: asym {cross_asym}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
