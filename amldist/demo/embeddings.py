"""The paper's Fig. 3 inputs: teacher and student embeddings of a few test landmarks, mapped to 2-d by t-SNE.

Landmarks are read from a revisited ground truth: queries sharing the same positives (easy + hard)
show the same landmark, so the first `num_landmarks` distinct positive sets give the classes and their
database images the points (the paper takes 20 easy images of 5 classes; the synthetic test sets have
fewer easy views per landmark, so the hard ones join them). Both networks embed the same images, and
one t-SNE of the 2N vectors places the two spaces in one picture: where the student matches the
teacher (asymmetric testing), each image's two points lie close together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amldist.datasets.formats import GroundTruth


@dataclass(frozen=True)
class LandmarkImages:
    positions: np.ndarray  # (N,) database indices
    labels: list[str]      # (N,) landmark of each image


def landmark_name(image_name: str) -> str:
    """'rox_000056_0007' -> 'rox_000056' (synthetic names are <landmark>_<view>; others stay whole)."""
    head, sep, tail = image_name.rpartition("_")
    return head if sep and tail.isdigit() else image_name


def pick_landmarks(truth: GroundTruth, num_landmarks: int = 5, per_landmark: int = 20) -> LandmarkImages:
    """Database images of the first `num_landmarks` distinct query landmarks (easy first, then hard)."""
    seen: set[tuple[int, ...]] = set()
    positions: list[int] = []
    labels: list[str] = []
    for query, name in zip(truth.gnd, truth.qimlist):
        keys = ("easy", "hard") if "easy" in query else ("ok",)
        members = [int(i) for key in keys for i in np.asarray(query.get(key, []), np.int64)]
        signature = tuple(sorted(members))
        if not members or signature in seen:
            continue
        seen.add(signature)
        chosen = [i for i in dict.fromkeys(members) if i not in positions][:per_landmark]
        positions += chosen
        labels += [landmark_name(name)] * len(chosen)
        if len(seen) == num_landmarks:
            break
    if not positions:
        raise ValueError("the ground truth has no query with positives")
    return LandmarkImages(np.asarray(positions, np.int64), labels)


def tsne_pairs(teacher: np.ndarray, student: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One t-SNE of the stacked (2N, D) vectors -> (teacher_xy (N, 2), student_xy (N, 2))."""
    from sklearn.manifold import TSNE

    teacher, student = np.asarray(teacher, np.float32), np.asarray(student, np.float32)
    if teacher.shape != student.shape or teacher.ndim != 2:
        raise ValueError(f"teacher {teacher.shape} and student {student.shape} must be equal (N, D)")
    stacked = np.concatenate([teacher, student])  # (2N, D)
    perplexity = float(min(15.0, max(2.0, (len(stacked) - 1) / 3)))
    # Exact gradients: for a few hundred points they cost under a second and, unlike Barnes-Hut's OpenMP
    # loop, do not slow down 40x when other processes hold the cores.
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", method="exact",
              random_state=seed).fit_transform(stacked)
    return xy[:len(teacher)], xy[len(teacher):]

