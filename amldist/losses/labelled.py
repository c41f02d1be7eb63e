"""Losses that use labels (paper §3.3) plus regression (7), on a batch of tuples.

Every function returns the per-tuple losses (B,) and never reduces over tuples (see
`amldist.losses.REDUCTIONS`). Shapes: anchors (B, D) are the student's f(a); positives
(B, P, D) and negatives (B, N, D) are the student's f(x) in sym mode (2) or the teacher's
g(x) in asym mode (3) -- the functions cannot tell and need not; self_refs (B, D) is g(a),
the teacher's embedding of the anchor itself (SELF in Table 2, the extra term of (10)).

`form="paper"` is the paper's formula on cosine similarity (the default). The code variants
(budnikm/aml and the cirtorch code it builds on) are options, documented in docs/LOSSES.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amldist.similarity import (
    self_similarity,
    squared_tuple_distances,
    tuple_distances,
    tuple_similarity,
)

# cirtorch adds this to every coordinate of a - x before taking the distance.
CIRTORCH_EPS = 1e-6


def contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor | None = None,
                     negatives: torch.Tensor | None = None, self_refs: torch.Tensor | None = None,
                     *, margin: float = 0.7, form: str = "paper") -> torch.Tensor:
    """Contrastive (4); with `self_refs` it is Contr+ (10); with only `self_refs`, regression (7).

    paper:    sum_n [s(a,n) - m]_+ - sum_p s(a,p) - s(a, g(a))        (similarity margin)
    cirtorch: sum_p D(a,p)^2/2 + D(a,g(a))^2/2 + sum_n [m - D(a,n)]_+^2/2,
              D(a,x) = ||a - x + 1e-6||                                 (distance margin)
    Any of positives / negatives / self_refs may be None (Table 2's POS / NEG / SELF
    switches); at least one must be given. -> (B,)
    """
    if positives is None and negatives is None and self_refs is None:
        raise ValueError("contrastive loss needs positives, negatives or self references")
    if form == "paper":
        return _contrastive_paper(anchors, positives, negatives, self_refs, margin)
    if form == "cirtorch":
        return _contrastive_cirtorch(anchors, positives, negatives, self_refs, margin)
    raise ValueError(f"unknown contrastive form {form!r}")


def _contrastive_paper(anchors, positives, negatives, self_refs, margin: float) -> torch.Tensor:
    loss = anchors.new_zeros(anchors.shape[0])  # (B,)
    if negatives is not None:
        loss = loss + F.relu(tuple_similarity(anchors, negatives) - margin).sum(dim=1)
    if positives is not None:
        loss = loss - tuple_similarity(anchors, positives).sum(dim=1)
    if self_refs is not None:
        loss = loss - self_similarity(anchors, self_refs)
    return loss


def _contrastive_cirtorch(anchors, positives, negatives, self_refs, margin: float) -> torch.Tensor:
    loss = anchors.new_zeros(anchors.shape[0])  # (B,)
    attracted = [refs for refs in (positives, _as_group(self_refs)) if refs is not None]
    for refs in attracted:
        loss = loss + 0.5 * _offset_squared_distances(anchors, refs).sum(dim=1)
    if negatives is not None:
        distances = tuple_distances(anchors, negatives, offset=CIRTORCH_EPS)  # (B, N)
        loss = loss + 0.5 * F.relu(margin - distances).pow(2).sum(dim=1)
    return loss


def _offset_squared_distances(anchors: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """||a - x + eps||^2, (B, D), (B, K, D) -> (B, K); squared directly, so exact at D = 0."""
    return (anchors.unsqueeze(1) - refs + CIRTORCH_EPS).pow(2).sum(dim=-1)


def regression_loss(anchors: torch.Tensor, anchor_teacher: torch.Tensor, *,
                    form: str = "paper") -> torch.Tensor:
    """Regression (7): -sim(f(a), g(a)).

    cirtorch form: aml's `reg` mode, which is cirtorch's contrastive loss on the pair
    [f(a), g(a)] with label positive, i.e. ||f(a) - g(a) + 1e-6||^2 / 2. -> (B,)
    """
    if form == "paper":
        return -self_similarity(anchors, anchor_teacher)
    if form == "cirtorch":
        return 0.5 * _offset_squared_distances(anchors, anchor_teacher.unsqueeze(1)).squeeze(1)
    raise ValueError(f"unknown regression form {form!r}")


def triplet_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *,
                 margin: float = 0.1, form: str = "paper") -> torch.Tensor:
    """Triplet (5) over L(a) = P(a) x N(a).

    paper: sum_{p,n} [s(a,n) - s(a,p) + m]_+          (cosine similarity)
    aml:   sum_{p,n} [|a-p|^2 - |a-n|^2 + m]_+         (squared L2 distance)  -> (B,)
    """
    if form == "paper":
        pos = tuple_similarity(anchors, positives)  # (B, P)
        neg = tuple_similarity(anchors, negatives)  # (B, N)
        violation = neg.unsqueeze(1) - pos.unsqueeze(2) + margin  # (B, P, N)
    elif form == "aml":
        pos = squared_tuple_distances(anchors, positives)
        neg = squared_tuple_distances(anchors, negatives)
        violation = pos.unsqueeze(2) - neg.unsqueeze(1) + margin  # (B, P, N)
    else:
        raise ValueError(f"unknown triplet form {form!r}")
    return F.relu(violation).sum(dim=(1, 2))


def multi_similarity_loss(anchors: torch.Tensor, positives: torch.Tensor | None,
                          negatives: torch.Tensor | None, *, margin: float = 0.6,
                          alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Multi-similarity (6):

    (1/alpha) log(1 + sum_p exp(-alpha (s(a,p) - m))) + (1/beta) log(1 + sum_n exp(beta (s(a,n) - m)))

    aml uses the same formula with m (its `thresh`) = 0.5, alpha = 2, beta = 40. Either side may
    be None (its term is then 0). Evaluated with logsumexp, so large beta cannot overflow. -> (B,)
    """
    loss = anchors.new_zeros(anchors.shape[0])  # (B,)
    if positives is not None:
        pos = tuple_similarity(anchors, positives)  # (B, P)
        loss = loss + _log_one_plus_sum_exp(-alpha * (pos - margin)) / alpha
    if negatives is not None:
        neg = tuple_similarity(anchors, negatives)  # (B, N)
        loss = loss + _log_one_plus_sum_exp(beta * (neg - margin)) / beta
    return loss


def _log_one_plus_sum_exp(z: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_k exp(z_k)) per row, (B, K) -> (B,): the 1 is exp(0) of a padded zero."""
    return torch.logsumexp(F.pad(z, (1, 0)), dim=1)


def _as_group(vectors: torch.Tensor | None) -> torch.Tensor | None:
    """(B, D) -> (B, 1, D), so one reference per anchor goes through the tuple functions."""
    return None if vectors is None else vectors.unsqueeze(1)
