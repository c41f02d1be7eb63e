"""Losses that use the teacher only (paper §3.4): RKD (8) and DarkRank (9), on groups.

A group is an anchor and its additional examples U(a): student (B, K, D) holds f(a), f(x1..)
and teacher (B, K, D) holds g(a), g(x1..), with the anchor at position 0 of each group. The
teacher side is detached: g is fixed (§3.2), its relations are targets. Each function returns
the per-group losses (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amldist.similarity import angles_at, group_angles, group_distances, tuple_distances, tuple_similarity


def huber(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise Huber with delta 1, i.e. smooth L1: 0.5 e^2 if |e| < 1 else |e| - 0.5."""
    return F.smooth_l1_loss(x, target, reduction="none", beta=1.0)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, *, angle_weight: float = 2.0,
             distance_weight: float = 1.0, form: str = "paper") -> torch.Tensor:
    """RKD-DA: angle_weight * angle-wise + distance_weight * distance-wise loss. -> (B,)

    paper (8): relations measured *at the anchor*. Distance-wise, psi(a, x) = ||a - x|| for
      x in U(a), each divided by the mean of the group's |U(a)| anchor distances (RKD's
      normalisation, so the two spaces' scales need not match); angle-wise,
      psi(a, x, y) = sim(x - a, y - a) for (x, y) in U(a)^2. Huber terms summed over U(a)^n.
    aml (RKD's own code, as aml runs it): every pair and every triple of the group, distances
      normalised by the mean non-zero pairwise distance, angles at every vertex, Huber terms
      averaged (mean over K^2 distance and K^3 angle entries). aml applies it to a whole batch
      as one group: pass (1, B*K, D) for that.
    """
    _check_groups(student, teacher, minimum=2)
    teacher = teacher.detach()
    if form == "paper":
        distance_term = huber(_anchor_distances(student), _anchor_distances(teacher)).sum(dim=1)
        angle_term = huber(_anchor_angles(student), _anchor_angles(teacher)).sum(dim=(1, 2))
    elif form == "aml":
        distance_term = huber(_pairwise_distances(student), _pairwise_distances(teacher)).mean(dim=(1, 2))
        angle_term = huber(group_angles(student), group_angles(teacher)).mean(dim=(1, 2, 3))
    else:
        raise ValueError(f"unknown rkd form {form!r}")
    return angle_weight * angle_term + distance_weight * distance_term


def _anchor_distances(groups: torch.Tensor) -> torch.Tensor:
    """||a - x|| / mean_x ||a - x||, (B, K, D) -> (B, K-1)."""
    distances = tuple_distances(groups[:, 0], groups[:, 1:])  # (B, K-1)
    return distances / distances.mean(dim=1, keepdim=True)


def _anchor_angles(groups: torch.Tensor) -> torch.Tensor:
    """sim(x - a, y - a) for x, y in U(a), (B, K, D) -> (B, K-1, K-1)."""
    return angles_at(groups[:, 0], groups[:, 1:])


def _pairwise_distances(groups: torch.Tensor) -> torch.Tensor:
    """All pairwise distances / their mean over the non-zero entries, (B, K, D) -> (B, K, K)."""
    distances = group_distances(groups)  # (B, K, K), zero diagonal
    nonzero = (distances > 0).sum(dim=(1, 2)).clamp(min=1)  # (B,)
    mean = distances.sum(dim=(1, 2)) / nonzero
    return distances / mean.view(-1, 1, 1)


def darkrank_loss(student: torch.Tensor, teacher: torch.Tensor, *, alpha: float = 1.0,
                  beta: float = 3.0, list_length: int | None = None, form: str = "paper") -> torch.Tensor:
    """DarkRank (9): the teacher's ranking of U(a) as a listwise (Plackett-Luce) target. -> (B,)

    -sum_{x in U(a)} ( s(a,x) - log sum_{y in V(a,x)} exp s(a,y) ),
    V(a,x) = {y in U(a) : S(a,y) <= S(a,x)}: the examples the teacher ranks at or below x.
    paper: s = alpha * cosine in the student space (alpha = 1 in (9)), S the teacher's cosine.
    aml (HardDarkRank): s = -alpha ||a - x||^beta in each space, alpha = beta = 3, and only the
      teacher's top `list_length` = 4 examples of U(a) take part.
    `list_length` (None = all of U(a)) keeps the teacher's top examples in either form.
    """
    _check_groups(student, teacher, minimum=2)
    teacher = teacher.detach()
    student_scores = _rank_scores(student, form, alpha, beta)  # (B, K-1)
    teacher_scores = _rank_scores(teacher, form, alpha, beta)  # (B, K-1)
    if list_length is not None and list_length < teacher_scores.shape[1]:
        top = teacher_scores.topk(list_length, dim=1).indices  # (B, L)
        student_scores = student_scores.gather(1, top)
        teacher_scores = teacher_scores.gather(1, top)
    # at_or_below[b, x, y]: y is in V(a, x); it always holds for y = x, so no row is empty.
    at_or_below = teacher_scores.unsqueeze(1) <= teacher_scores.unsqueeze(2)  # (B, L, L)
    masked = student_scores.unsqueeze(1).masked_fill(~at_or_below, float("-inf"))  # (B, L, L)
    log_partition = torch.logsumexp(masked, dim=2)  # (B, L)
    return -(student_scores - log_partition).sum(dim=1)


def _rank_scores(groups: torch.Tensor, form: str, alpha: float, beta: float) -> torch.Tensor:
    """Score of each x in U(a) against the anchor, (B, K, D) -> (B, K-1); higher = closer."""
    if form == "paper":
        return alpha * tuple_similarity(groups[:, 0], groups[:, 1:])
    if form == "aml":
        return -alpha * tuple_distances(groups[:, 0], groups[:, 1:]).pow(beta)
    raise ValueError(f"unknown darkrank form {form!r}")


def _check_groups(student: torch.Tensor, teacher: torch.Tensor, minimum: int) -> None:
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"expected student and teacher groups (B, K, D) with the same B and K, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[1] < minimum:
        raise ValueError(f"a group needs the anchor and at least {minimum - 1} other example(s), "
                         f"got K={student.shape[1]}")

