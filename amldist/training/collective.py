"""The few collective operations the training loop needs, over torch.distributed (no Ray).

Without an initialised process group (one process, the library tests) each is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of this process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_arrays(local: np.ndarray) -> list[np.ndarray]:
    """Every rank's array, in rank order (arrays may differ in length)."""
    if world()[1] == 1:
        return [local]
    gathered: list[np.ndarray | None] = [None] * world()[1]
    dist.all_gather_object(gathered, np.ascontiguousarray(local))
    return [np.asarray(part) for part in gathered]


def all_reduce(values: Sequence[float], op: str = "sum", device: torch.device | None = None) -> list[float]:
    """Element-wise sum or max of a few numbers over ranks (float64)."""
    _, size = world()
    if size == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
