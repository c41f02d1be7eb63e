"""Batches of images of different sizes: aspect-ratio buckets and zero-padded batches.

Images keep their aspect ratio (longest side 362 for training, 1024 for testing), so cirtorch and aml
forward them one at a time. Here images of equal or nearly equal shape are grouped into buckets
(`bucket_by_shape`), each bucket is zero-padded to one shape (`pad_batch`), and `RetrievalNet` pools
each image over its own valid region (see amldist.nets.padding), which reproduces the one-at-a-time
embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amldist.errors import UserError


def pad_batch(images: Sequence[Tensor], pin_memory: bool = False) -> tuple[Tensor, Tensor]:
    """Zero-pad (bottom/right) images (3, h, w) to one (B, 3, H, W) batch; also return valid_hw (B, 2) on the
    CPU. `pin_memory`: build the batch in pinned memory (CPU images bound for a GPU: an asynchronous copy)."""
    if len(images) == 0:
        raise UserError("cannot build a batch from no images")
    channels = {image.shape[0] if image.dim() == 3 else None for image in images}
    if len(channels) != 1 or None in channels:
        raise UserError("every image of a batch must be a (C, h, w) tensor with the same C")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    shape = (len(images), images[0].shape[0], height, width)  # (B, C, H, W)
    if pin_memory:
        batch = torch.zeros(shape, dtype=images[0].dtype, pin_memory=True)
    else:
        batch = images[0].new_zeros(shape)
    for slot, image in zip(batch, images):
        slot[:, : image.shape[1], : image.shape[2]] = image
    valid_hw = torch.tensor([tuple(image.shape[1:]) for image in images], dtype=torch.long)  # (B, 2)
    return batch, valid_hw


def bucket_by_shape(shapes: Sequence[tuple[int, int]], max_batch: int, max_pad_frac: float = 0.1
                    ) -> list[list[int]]:
    """Group image indices into batches of at most `max_batch` whose padding stays small.

    Every image in a bucket covers at least (1 - max_pad_frac) of the bucket's padded area H x W.
    Shapes are visited sorted by (h, w): images resized to the same longest side then line up by their
    other side, so equal shapes share buckets and near-equal ones neighbour each other.
    """
    if max_batch < 1:
        raise UserError(f"max_batch must be >= 1, got {max_batch}")
    if not 0.0 <= max_pad_frac < 1.0:
        raise UserError(f"max_pad_frac must be in [0, 1), got {max_pad_frac}")
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0], shapes[i][1], i))
    buckets: list[list[int]] = []
    current: list[int] = []
    height = width = 0
    smallest_area = 0
    for index in order:
        h, w = shapes[index]
        new_height, new_width = max(height, h), max(width, w)
        new_smallest = min(smallest_area, h * w) if current else h * w
        fits = new_smallest >= (1.0 - max_pad_frac) * new_height * new_width
        if current and (len(current) == max_batch or not fits):
            buckets.append(current)
            current, new_height, new_width, new_smallest = [], h, w, h * w
        current.append(index)
        height, width, smallest_area = new_height, new_width, new_smallest
    if current:
        buckets.append(current)
    return buckets


def embed_in_buckets(model, images: Sequence[Tensor], max_batch: int, max_pad_frac: float = 0.1) -> Tensor:
    """Descriptors (N, D) of `images` (each (3, h, w)), forwarded in padded buckets, in input order."""
    buckets = bucket_by_shape([tuple(image.shape[1:]) for image in images], max_batch, max_pad_frac)
    device = next(model.parameters()).device
    rows: dict[int, Tensor] = {}
    for bucket in buckets:
        batch, valid_hw = pad_batch([images[i] for i in bucket])
        descriptors = model(batch.to(device), valid_hw)  # (b, D); valid sizes stay on the host
        rows.update(zip(bucket, descriptors))
    return torch.stack([rows[i] for i in range(len(images))])
