"""Global pooling of a feature map into one descriptor per image: GeM, MAC, SPoC, and L2 normalisation.

Each pooling takes an optional boolean `mask` (B, 1, H, W) marking the valid feature positions of
zero-padded images, so a padded batch pools exactly what each image alone would pool.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GEM_P_INIT = 3.0
GEM_EPS = 1e-6
L2N_EPS = 1e-6


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the spatial positions `mask` keeps. (B, C, H, W) -> (B, C)."""
    if mask is None:
        return x.mean(dim=(-2, -1))
    total = x.masked_fill(~mask, 0.0).sum(dim=(-2, -1))
    count = mask.sum(dim=(-2, -1)).clamp(min=1)  # (B, 1)
    return total / count


def gem(x: Tensor, p: Tensor | float = GEM_P_INIT, eps: float = GEM_EPS,
        mask: Tensor | None = None) -> Tensor:
    """Generalised mean: (mean over positions of clamp(x, eps)^p)^(1/p). (B, C, H, W) -> (B, C)."""
    return _masked_mean(x.clamp(min=eps).pow(p), mask).pow(1.0 / p)


def mac(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Maximum activation of convolutions (global max pooling). (B, C, H, W) -> (B, C)."""
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    return x.amax(dim=(-2, -1))


def spoc(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum-pooled convolutional features, as a mean (global average pooling). (B, C, H, W) -> (B, C)."""
    return _masked_mean(x, mask)


def l2_normalize(x: Tensor, eps: float = L2N_EPS) -> Tensor:
    """x / (||x|| + eps) along dim 1, cirtorch's L2N (the eps sits outside the norm)."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


class GeM(nn.Module):
    """GeM with a learnable exponent `p` (one scalar, cirtorch's `pool.p`)."""

    def __init__(self, p: float = GEM_P_INIT, eps: float = GEM_EPS):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return gem(x, self.p, self.eps, mask)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


class MAC(nn.Module):
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return mac(x, mask)


class SPoC(nn.Module):
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return spoc(x, mask)


POOLINGS: dict[str, type[nn.Module]] = {"gem": GeM, "mac": MAC, "spoc": SPoC}


def masked_adaptive_avg(x: Tensor, mask: Tensor) -> Tensor:
    """What AdaptiveAvgPool2d(1) gives on the valid region only. (B, C, H, W) -> (B, C, 1, 1)."""
    return _masked_mean(x, mask)[..., None, None]


def max_pool_padding_value(x: Tensor) -> float:
    """Max pooling pads with -inf: padded positions must never win a window."""
    return float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min


__all__ = [
    "MAC",
    "POOLINGS",
    "GeM",
    "SPoC",
    "gem",
    "l2_normalize",
    "mac",
    "masked_adaptive_avg",
    "max_pool_padding_value",
    "spoc",
]
