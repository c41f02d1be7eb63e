"""The training step on a batch of tuples (no Ray).

asym (3): only the anchors go through the student; positives, negatives and g(a) are stored teacher
vectors. sym (2) and the relational losses: every distinct image of the tuples goes through the student.
How images are batched depends on the device (`StepSettings.for_device`): on a GPU the anchors form one
zero-padded batch (`RetrievalNet` pools each image over its valid region, so padding changes nothing)
and sym images go in batches of nearly equal shapes (`amldist.batching.bucket_by_shape`); on a CPU only
images of exactly equal shape share a batch: there padded batches trained slower than the reference's
one image at a time (docs/BENCHMARKS.md, "Training step").

The student is wrapped in `TupleEmbedder`, whose single forward embeds all of a step's batches, so DDP
sees one forward per backward whatever the number of shape buckets.

Loss scale: cirtorch/aml back-propagate every tuple's loss and accumulate, i.e. the gradient of the sum
over the `batch_size` tuples of a global batch. Under DDP each rank holds a part of that batch and DDP
averages the ranks' gradients, so each rank back-propagates `world_size * sum(its tuple losses)`
(divided by the global batch size for reduction "mean"): the average over ranks is then exactly the
gradient of the global sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from amldist.batching import bucket_by_shape, pad_batch
from amldist.nets.padding import host_sizes
from amldist.training.family import TupleFamily
from amldist.training.plan import StepTuples
from amldist.transfer import to_device

# Sym buckets: an image must fill at least 75% of its padded batch (fewer, larger batches).
SYM_MAX_PAD_FRAC = 0.25


class TupleEmbedder(nn.Module):
    """One forward for all image batches of a step: list of (images (B, 3, H, W), valid sizes: B (h, w)
    pairs of ints) -> list of descriptors (B, D). The sizes are plain ints so that DDP, which moves every
    input tensor to the device, leaves them on the host."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, batches: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        return [self.net(images, valid_hw) for images, valid_hw in batches]


class VectorTable:
    """Vectors of a sorted set of image ids; `rows(ids)` gathers them in any shape: ids (...) -> (..., D)."""

    def __init__(self, ids: np.ndarray, vectors: Tensor):
        order = np.argsort(ids, kind="stable")
        self.ids = np.asarray(ids, np.int64)[order]
        self.vectors = vectors[to_device(torch.from_numpy(order), vectors.device)] if len(order) else vectors

    def rows(self, ids: np.ndarray) -> Tensor:
        ids = np.asarray(ids, np.int64)
        where = np.searchsorted(self.ids, ids.ravel())
        if ids.size and (where.max() >= len(self.ids) or not np.array_equal(self.ids[where], ids.ravel())):
            raise KeyError("an image id is missing from the vector table")
        picked = self.vectors[to_device(torch.from_numpy(where), self.vectors.device)]
        return picked.reshape(*ids.shape, self.vectors.shape[-1])


@dataclass
class StepSettings:
    """How a step runs on this worker."""

    device: torch.device
    world_size: int = 1
    global_batch: int = 10               # tuples per global batch (run.batch_size)
    reduction: str = "sum"
    amp_dtype: torch.dtype | None = None  # bf16 autocast on GPU
    channels_last: bool = False
    max_pad_frac: float = SYM_MAX_PAD_FRAC  # shape buckets: padding at most this share of a batch
    anchors_one_batch: bool = True          # asym: all anchors in one padded batch

    @classmethod
    def for_device(cls, device: torch.device, all_images: bool = False, exact_shapes: bool = False,
                   **settings) -> StepSettings:
        """GPU: bf16, channels-last, padded batches. CPU: fp32, exact-shape batches, channels-last only when
        every tuple image goes through the student (`all_images`: sym, relational), where it paid on the
        CPU; for anchors alone it did not (docs/BENCHMARKS.md, "Training step"). `exact_shapes`: no padded
        batches on any device (BatchNorm that trains would count the padding in its batch statistics)."""
        if device.type == "cuda":
            padding = {"max_pad_frac": 0.0, "anchors_one_batch": False} if exact_shapes else {}
            return cls(device=device, amp_dtype=torch.bfloat16, channels_last=True, **padding, **settings)
        return cls(device=device, max_pad_frac=0.0, anchors_one_batch=False, channels_last=all_images,
                   **settings)

    @property
    def loss_scale(self) -> float:
        """Factor on a rank's summed tuple losses so DDP's mean over ranks gives the global sum (or mean)."""
        return self.world_size / (self.global_batch if self.reduction == "mean" else 1)


def image_batches(images: Sequence[Tensor], one_batch: bool, max_pad_frac: float, pin_memory: bool = False
                  ) -> list[tuple[list[int], Tensor, Tensor]]:
    """(positions, padded images (B, 3, H, W), valid_hw (B, 2)) per batch: one batch, or shape buckets."""
    if one_batch:
        groups = [list(range(len(images)))]
    else:
        shapes = [tuple(image.shape[1:]) for image in images]
        groups = bucket_by_shape(shapes, max_batch=len(images), max_pad_frac=max_pad_frac)
    return [(group, *pad_batch([images[i] for i in group], pin_memory=pin_memory)) for group in groups]


def embed_for_step(embedder: nn.Module, images: Sequence[Tensor], ids: np.ndarray, settings: StepSettings,
                   one_batch: bool) -> VectorTable:
    """Student descriptors (U, D) of the step's images, with gradients, as a table by image id."""
    pin = settings.device.type == "cuda" and not any(image.is_cuda for image in images)
    batches = image_batches(images, one_batch, settings.max_pad_frac, pin_memory=pin)
    inputs = []
    for _, pixels, valid_hw in batches:
        pixels = pixels.to(settings.device, non_blocking=True)  # from pinned memory on a GPU: asynchronous
        if settings.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        inputs.append((pixels, host_sizes(valid_hw)))  # host ints: DDP moves tensors, not these
    with torch.autocast(settings.device.type, dtype=settings.amp_dtype,
                        enabled=settings.amp_dtype is not None):
        outputs = embedder(inputs)
    order = np.concatenate([positions for positions, _, _ in batches])
    descriptors = torch.cat([out.float() for out in outputs])  # (U, D) in `order`
    return VectorTable(np.asarray(ids)[order], descriptors)


def loss_and_backward(embedder: nn.Module, loss_fn, family: TupleFamily, tuples: StepTuples,
                      images: Sequence[Tensor], teacher: VectorTable | None,
                      settings: StepSettings) -> Tensor:
    """Forward the step's images, compute the loss of its tuples, back-propagate the scaled sum.

    `images[i]` is the normalised (3, h, w) tensor of `family.student_image_ids(tuples)[i]`. Returns the
    per-tuple losses (b,), detached. The optimiser step is the caller's (gradient accumulation)."""
    ids = family.student_image_ids(tuples)
    if len(images) != len(ids):
        raise ValueError(f"expected {len(ids)} images for the step, got {len(images)}")
    one_batch = settings.anchors_one_batch and not family.students_references
    student = embed_for_step(embedder, images, ids, settings, one_batch=one_batch)
    losses = loss_fn(family.loss_batch(tuples, student, teacher))  # (b,)
    (losses.sum() * settings.loss_scale).backward()
    return losses.detach()
