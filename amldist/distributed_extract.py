"""`embed` over Ray workers, for sets too large for one process (R1M distractors, teacher features).

The driver predicts every image's input shape, orders images by shape (so each chunk holds whole
aspect-ratio buckets), cuts that order into chunks and runs `extract.embed` on each chunk in a Ray
task; rows come back to their positions. Each image is prepared and embedded exactly as in one
process, so the result equals `extract.embed` up to float rounding of differently composed batches.
This is the only extraction module that imports Ray.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from amldist import extract
from amldist.errors import UserError
from amldist.ray_session import ensure_ray

log = logging.getLogger(__name__)

CHUNKS_PER_WORKER = 4  # several chunks per worker so a slow chunk does not hold up the end


def shape_ordered_chunks(shapes: Sequence[tuple[int, int]], num_chunks: int) -> list[np.ndarray]:
    """Positions sorted by (h, w, position), cut into `num_chunks` nearly equal contiguous pieces."""
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0], shapes[i][1], i))
    pieces = np.array_split(np.asarray(order, dtype=np.int64), max(1, min(num_chunks, len(order))))
    return [p for p in pieces if len(p)]


@ray.remote
def _embed_chunk(model: torch.nn.Module, source: extract.ImageSource, positions: np.ndarray,
                 options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    vectors = extract.embed(model, extract.SubsetSource(source, positions), **options)
    return positions, vectors


def embed_distributed(model: torch.nn.Module, images: extract.ImageSource, *, num_workers: int,
                      image_size: int = 1024, scales: Sequence[float] = (1.0,), batch_size: int | None = None,
                      autocast: Any = None, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                      decode_workers: int = 0) -> np.ndarray:
    """Like `extract.embed`, spread over `num_workers` Ray tasks at a time: (N, D) float32.

    The model is shipped once through the object store (moved to CPU first); each task runs on
    CUDA when it was given a GPU, and decodes with `decode_workers` DataLoader workers.
    """
    if num_workers < 1:
        raise UserError(f"the number of Ray workers must be >= 1, got {num_workers}")
    if len(images) == 0:
        return extract.embed(model, images, image_size=image_size)
    shapes = [extract.input_size(images, i, image_size) for i in range(len(images))]
    chunks = shape_ordered_chunks(shapes, num_workers * CHUNKS_PER_WORKER)
    options = {"image_size": image_size, "scales": list(scales), "batch_size": batch_size,
               "autocast": autocast, "num_workers": decode_workers,
               "device": "cuda" if gpus_per_worker > 0 else "cpu"}
    started = ensure_ray(num_workers)
    try:
        model_ref = ray.put(_cpu_copy(model))
        source_ref = ray.put(images)
        task = _embed_chunk.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
        pending = [task.remote(model_ref, source_ref, chunk, options) for chunk in chunks]
        return _gather(pending, len(images))
    finally:
        if started:
            ray.shutdown()


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model as it can travel to any worker: on the CPU (a copy if it lives elsewhere, so the
    caller's model stays where it is)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return model if on_cpu else copy.deepcopy(model).to("cpu")


def _gather(pending: list, count: int) -> np.ndarray:
    """Collect chunk results as they finish into one (N, D) array."""
    out: np.ndarray | None = None
    done_rows = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        positions, vectors = ray.get(ready[0])
        if out is None:
            out = np.zeros((count, vectors.shape[1]), np.float32)
        out[positions] = vectors
        done_rows += len(positions)
        log.info("distributed extraction: %d / %d images", done_rows, count)
    return out
