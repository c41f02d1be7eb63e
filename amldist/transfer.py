"""Host-to-GPU copies that do not stall the host.

A blocking copy of a CPU tensor to a GPU (`torch.tensor(values, device="cuda")`, `.to("cuda")`) makes the
host wait until the GPU has run every kernel queued before it: the host stops launching work while the
device drains, and a step made of many small kernels becomes bound by the host. The small index and size
tables built on the host during a step go through `to_device` instead: staged in pinned memory and copied
asynchronously on the current stream (PyTorch's pinned-memory cache keeps the staging block until the copy
has run). Reading a GPU tensor on the host (`.tolist()`, `.item()`, `bool(...)`) stalls the same way, so
sizes the host needs stay on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """`tensor` (on the CPU) on `device`; to a GPU without waiting for the GPU's queued work."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
