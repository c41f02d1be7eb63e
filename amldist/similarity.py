"""The similarity seam: the student's anchors against references, batch of tuples at a time.

Symmetric (2) and asymmetric (3) similarity are one computation, the cosine of the student's
anchor f(a) with a reference vector; they differ only in *whose* embedding the reference is
(the student's f(x) in sym, the teacher's g(x) in asym). The training step chooses the
references, so every loss is written once and works in both modes. Gradients flow into the
references exactly when they require grad (student references do, teacher ones do not).

Every function accepts non-normalised vectors (it normalises itself, so a descriptor scaled by
any positive factor gives the same similarity) and is safe at coincident points: distances
use a clamped square root, directions a clamped norm, so no NaN gradient when x == a.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Below these, a norm or a squared distance is treated as zero (only for the division / the
# square root: values away from zero are exact).
NORM_EPS = 1e-12
SQUARED_DISTANCE_EPS = 1e-12


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dimension; an all-zero vector stays zero instead of NaN."""
    return F.normalize(x, p=2, dim=-1, eps=NORM_EPS)


def tuple_similarity(anchors: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Cosine of each anchor with each of its own references.

    anchors (B, D), refs (B, K, D) -> (B, K): out[b, k] = sim(anchors[b], refs[b, k]).
    """
    _check_tuple_shapes(anchors, refs)
    return torch.einsum("bd,bkd->bk", l2_normalize(anchors), l2_normalize(refs))


def self_similarity(anchors: torch.Tensor, anchor_refs: torch.Tensor) -> torch.Tensor:
    """Cosine of each anchor with one reference of its own, e.g. sim(f(a), g(a)) in (7).

    anchors (B, D), anchor_refs (B, D) -> (B,).
    """
    if anchors.shape != anchor_refs.shape:
        raise ValueError(f"anchors {tuple(anchors.shape)} and their references "
                         f"{tuple(anchor_refs.shape)} must have the same shape")
    return (l2_normalize(anchors) * l2_normalize(anchor_refs)).sum(dim=-1)


def safe_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dimension with a finite gradient at zero."""
    return x.pow(2).sum(dim=-1).clamp(min=SQUARED_DISTANCE_EPS).sqrt()


def tuple_distances(anchors: torch.Tensor, refs: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Euclidean distance of each anchor to each of its references, on the vectors as given.

    anchors (B, D), refs (B, K, D) -> (B, K): ||anchors[b] - refs[b, k] + offset||.
    `offset` is added to every coordinate of the difference before squaring: cirtorch's
    contrastive loss uses 1e-6 there; keep 0 for the plain distance.
    """
    _check_tuple_shapes(anchors, refs)
    return safe_norm(anchors.unsqueeze(1) - refs + offset)


def squared_tuple_distances(anchors: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (B, D), (B, K, D) -> (B, K), as aml's triplet loss uses them."""
    _check_tuple_shapes(anchors, refs)
    return (anchors.unsqueeze(1) - refs).pow(2).sum(dim=-1)


def group_distances(groups: torch.Tensor) -> torch.Tensor:
    """All pairwise Euclidean distances within each group, with an exact zero diagonal.

    groups (B, K, D) -> (B, K, K). Computed from differences rather than the Gram-matrix
    expansion, which loses precision for nearby points; K is a tuple size, so (B, K, K, D)
    stays small.
    """
    distances = safe_norm(groups.unsqueeze(2) - groups.unsqueeze(1))  # (B, K, K)
    off_diagonal = ~torch.eye(groups.shape[1], dtype=torch.bool, device=groups.device)
    return distances * off_diagonal


def angles_at(vertices: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Cosine of the angle x-v-y for every pair of points around each vertex (RKD's angle).

    vertices (B, D), points (B, K, D) -> (B, K, K): out[b, i, j] = sim(p_i - v, p_j - v).
    A point equal to its vertex has no direction; its cosines are 0 (it is a zero vector).
    """
    _check_tuple_shapes(vertices, points)
    directions = l2_normalize(points - vertices.unsqueeze(1))  # (B, K, D)
    return directions @ directions.transpose(1, 2)


def group_angles(groups: torch.Tensor) -> torch.Tensor:
    """`angles_at` with every member of the group as the vertex in turn.

    groups (B, K, D) -> (B, K, K, K): out[b, v, i, j] = sim(g_i - g_v, g_j - g_v).
    """
    directions = l2_normalize(groups.unsqueeze(1) - groups.unsqueeze(2))  # (B, K_v, K_i, D)
    return directions @ directions.transpose(2, 3)


def _check_tuple_shapes(anchors: torch.Tensor, refs: torch.Tensor) -> None:
    if anchors.dim() != 2 or refs.dim() != 3:
        raise ValueError(f"expected anchors (B, D) and references (B, K, D), got "
                         f"{tuple(anchors.shape)} and {tuple(refs.shape)}")
    if refs.shape[0] != anchors.shape[0] or refs.shape[2] != anchors.shape[1]:
        raise ValueError(f"anchors {tuple(anchors.shape)} and references {tuple(refs.shape)} "
                         "disagree on the batch size or the dimension")
