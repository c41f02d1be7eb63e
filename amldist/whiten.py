"""Learned whitening (Lw, supervised by matching pairs) and PCA whitening of (N, D) descriptors.

Lw (Radenović et al.): with m the mean of the query descriptors of the training pairs and
S = (1/M) Σ (x_q - x_p)(x_q - x_p)^T the covariance of the pair differences,
  P1 = L^{-1} where S = L L^T (Cholesky)          -> pair differences become isotropic,
  C  = Σ_n P1 (x_n - m)(x_n - m)^T P1^T             over all images,
  P  = V^T P1 with V the eigenvectors of C, eigenvalues descending (so P[:d] keeps the top d).
Applying: x' = P[:d] (x - m), then L2-normalised. Hence P S P^T = I on the training pairs.

PCA whitening: P = diag(λ)^{-1/2} V^T of the (symmetrised) covariance of the centred descriptors.

Files hold plain tensors only ({'m': (D,), 'P': (D, D)} float64 + a small plain 'meta' dict), so
`torch.load(weights_only=True)` reads them; writes are atomic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amldist.atomic import atomic_path
from amldist.checkpoints import safe_torch_load
from amldist.errors import UserError

log = logging.getLogger(__name__)

CHOLESKY_FIRST_JITTER = 1e-10
CHOLESKY_MAX_TRIES = 20
NORM_EPS = 1e-6


@dataclass
class Whitening:
    """x -> P (x - m): m (D,) float64, P (D_out, D) float64."""

    m: np.ndarray
    P: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.P.shape[0])


def _check_pairs(X: np.ndarray, qidxs, pidxs) -> tuple[np.ndarray, np.ndarray]:
    qidxs = np.asarray(qidxs, dtype=np.int64).reshape(-1)
    pidxs = np.asarray(pidxs, dtype=np.int64).reshape(-1)
    if qidxs.size == 0 or qidxs.shape != pidxs.shape:
        raise UserError(f"whitening needs matching query/positive pairs, got {qidxs.size} and {pidxs.size}")
    if min(qidxs.min(), pidxs.min()) < 0 or max(qidxs.max(), pidxs.max()) >= len(X):
        raise UserError(f"whitening pairs index outside the {len(X)} descriptors given")
    return qidxs, pidxs


def cholesky_with_jitter(S: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of S, adding a I with a = 1e-10, 1e-9, ... until S + a I is positive
    definite (pair differences of few pairs give a singular S)."""
    try:
        return np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        pass
    jitter = CHOLESKY_FIRST_JITTER
    for _ in range(CHOLESKY_MAX_TRIES):
        try:
            factor = np.linalg.cholesky(S + jitter * np.eye(len(S)))
            log.debug("cholesky needed jitter %.0e", jitter)
            return factor
        except np.linalg.LinAlgError:
            jitter *= 10.0
    raise UserError("the whitening pair covariance is not positive definite even with large jitter")


def _eig_descending(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix."""
    values, vectors = np.linalg.eigh((C + C.T) / 2.0)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def learn_whitening(X: np.ndarray, qidxs, pidxs) -> Whitening:
    """Learn Lw from descriptors X (N, D) of the whitening images and pairs (qidxs[i], pidxs[i])."""
    X = np.asarray(X, dtype=np.float64)  # (N, D)
    qidxs, pidxs = _check_pairs(X, qidxs, pidxs)
    m = X[qidxs].mean(axis=0)  # (D,)
    diffs = X[qidxs] - X[pidxs]  # (M, D)
    S = diffs.T @ diffs / len(qidxs)  # (D, D) intra-pair covariance
    P1 = np.linalg.inv(cholesky_with_jitter(S))  # (D, D)
    Y = (X - m) @ P1.T  # (N, D), every image, not only the queries
    _, V = _eig_descending(Y.T @ Y)
    return Whitening(m=m, P=V.T @ P1, meta={"kind": "lw", "num_pairs": len(qidxs), "num_images": len(X)})


def learn_pca_whitening(X: np.ndarray) -> Whitening:
    """Unsupervised PCA whitening of X (N, D)."""
    X = np.asarray(X, dtype=np.float64)
    m = X.mean(axis=0)
    Xc = X - m
    values, V = _eig_descending(Xc.T @ Xc / len(X))
    # With fewer images than dimensions the tail eigenvalues are ~0: floor them instead of dividing by 0.
    floor = max(float(values[0]), 1e-12) * 1e-9
    if values[-1] < floor:
        log.warning("PCA whitening: %d of %d eigenvalues are ~0 (too few images)",
                    int((values < floor).sum()), len(values))
    P = np.diag(np.maximum(values, floor) ** -0.5) @ V.T
    return Whitening(m=m, P=P, meta={"kind": "pca", "num_images": len(X)})


def apply_whitening(X: np.ndarray, w: Whitening, dims: int | None = None) -> np.ndarray:
    """P[:dims] (x - m), L2-normalised per row: X (N, D) -> (N, dims) float32."""
    d = w.dim if dims is None else int(dims)
    if not 0 < d <= w.dim:
        raise UserError(f"whitening dimensions must be in 1..{w.dim}, got {dims}")
    X = np.asarray(X, dtype=np.float64)
    if X.shape[-1] != w.P.shape[1]:
        raise UserError(f"descriptors have dimension {X.shape[-1]} but the whitening expects {w.P.shape[1]}")
    Y = (X - w.m) @ w.P[:d].T  # (N, d)
    Y /= np.linalg.norm(Y, axis=1, keepdims=True) + NORM_EPS
    return Y.astype(np.float32)


def _to_numpy(value: Any, key: str) -> np.ndarray:
    try:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().double().numpy()
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):  # text, ragged lists, None: a damaged file
        raise UserError(f"whitening {key!r} is not an array of numbers "
                        f"(found {type(value).__name__})") from None


def whitening_from_dict(raw: Mapping[str, Any]) -> Whitening:
    """Build from {'m', 'P'} as cirtorch/aml store it (numpy or tensors; m may be D×1)."""
    if not isinstance(raw, Mapping) or "m" not in raw or "P" not in raw:
        raise UserError("a whitening must be a dict with keys 'm' and 'P'")
    m, P = _to_numpy(raw["m"], "m").reshape(-1), _to_numpy(raw["P"], "P")
    if P.ndim != 2 or P.shape[1] != m.size:
        raise UserError(f"whitening shapes do not match: m {m.shape}, P {P.shape}")
    meta = dict(raw.get("meta", {})) if isinstance(raw.get("meta", {}), Mapping) else {}
    return Whitening(m=m, P=P, meta=meta)


def save_whitening(path: str | Path, w: Whitening) -> None:
    """Atomic torch.save of plain tensors + plain meta (readable with weights_only=True)."""
    payload = {"m": torch.from_numpy(np.ascontiguousarray(w.m)),
               "P": torch.from_numpy(np.ascontiguousarray(w.P)), "meta": _plain(w.meta)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _plain(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only values weights_only loading accepts (str, int, float, bool, None, lists of those)."""
    allowed = (str, int, float, bool, type(None))
    return {str(k): (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()
            if isinstance(v, allowed)
            or (isinstance(v, (list, tuple)) and all(isinstance(x, allowed) for x in v))}


def load_whitening(path: str | Path) -> Whitening:
    """Read a whitening file written by save_whitening or a cirtorch/aml {'m', 'P'} file (cirtorch saved
    Lw as numpy arrays, which the checkpoints' weights-only loader accepts)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such whitening file: {path}")
    try:
        raw = safe_torch_load(path)
    except UserError as err:  # corrupt or unsafe file: one clear line, no traceback
        raise UserError(f"cannot read whitening file {err}") from None
    try:
        return whitening_from_dict(raw)
    except UserError as err:
        raise UserError(f"damaged whitening file {path}: {err}") from None
