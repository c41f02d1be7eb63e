"""Exact forward passes of zero-padded batches.

Images of different sizes are zero-padded (bottom/right) to one shape. Pooling over only the valid
region is not enough: every convolution near the padding edge would read padded activations where the
lone image reads its convolution's zero padding. So, for the duration of a padded forward, each
spatial layer (convolutions wider than 1x1, pooling layers, squeeze-excitation averages) gets a hook
that resets its input outside the image's valid region to what a lone image's padding holds (0, or
-inf for max pooling). TensorFlow 'same' convolutions (`SamePadConv2d`) pad by an amount that depends
on the input size, so their hook also shifts each image to where its own padding would put it. The
valid size at each layer comes from one shape-only forward per distinct image size on an empty batch
(no arithmetic), cached. Batched embeddings then equal one-at-a-time
embeddings up to float rounding, as long as BatchNorm uses running statistics (eval or frozen BN).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amldist.nets.pooling import masked_adaptive_avg, max_pool_padding_value
from amldist.transfer import to_device

log = logging.getLogger(__name__)

_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
_BATCHNORMS = nn.modules.batchnorm._BatchNorm
_MAX_POOLS = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_CACHE_LIMIT = 4096

Size = tuple[int, int]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding of one dimension: (before, after), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """A convolution with TensorFlow's 'SAME' padding (output ceil(size / stride)), padded from the input
    size at every call. TF-trained weights (EfficientNet) expect it: with stride 2 an even input gets no
    padding before, an odd one a pixel more. Parameters are nn.Conv2d's (padding 0)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # an export (amldist.retrieval.export): one graph for every input size
            for axis in (-2, -1):
                x = traced_same_pad(x, axis, self.kernel_size[axis], self.stride[axis], self.dilation[axis])
            return super().forward(x)
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


def traced_same_pad(x: Tensor, axis: int, kernel: int, stride: int, dilation: int) -> Tensor:
    """`same_padding` of one axis with tensor operations only, for a trace (TorchScript, ONNX) that must
    serve any input size: Python arithmetic on a traced size would fix the example's padding in the graph.

    The total never exceeds (kernel - 1) * dilation, so the axis is zero-padded by that much on both
    sides (a constant), and the rows of the size-dependent padding are then gathered from it."""
    most = (kernel - 1) * dilation
    size = torch._shape_as_tensor(x)[axis % x.dim():][:1]  # (1,) int64, a graph value in the trace
    total = torch.clamp(((size + stride - 1) // stride - 1) * stride + most + 1 - size, min=0)
    before = total // 2
    pad = [0, 0] * (x.dim() - axis % x.dim() - 1) + [most, most]
    rows = torch.arange((size + total)[0]) + (most - before)
    return F.pad(x, pad).index_select(axis % x.dim(), rows)


def align_for_same_padding(conv: SamePadConv2d, x: Tensor, sizes: Sequence[Size]) -> Tensor:
    """Move each zero-padded image of `x` (B, C, H, W; valid (h, w) = `sizes`) so that `conv`'s padding of
    the batch gives every image the padding before it that it gets alone.

    The batch is first extended to a multiple of the stride (the output size does not change), where
    'SAME' pads least; an image whose own padding is larger is shifted down/right by the difference.
    It still fits: padding before grows by at most the rows an image lacks to a multiple of the stride."""
    height, width = x.shape[-2:]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    new_height, new_width = math.ceil(height / sh) * sh, math.ceil(width / sw) * sw
    base_top, base_left = same_padding(new_height, kh, sh, dh)[0], same_padding(new_width, kw, sw, dw)[0]
    offsets = [(same_padding(h, kh, sh, dh)[0] - base_top, same_padding(w, kw, sw, dw)[0] - base_left)
               for h, w in sizes]
    if (new_height, new_width) == (height, width) and not any(top or left for top, left in offsets):
        return x
    out = x.new_zeros(*x.shape[:2], new_height, new_width)
    for top, left in set(offsets):
        rows = torch.tensor([i for i, offset in enumerate(offsets) if offset == (top, left)], device=x.device)
        h, w = min(height, new_height - top), min(width, new_width - left)  # what is cut is padding
        out[rows, :, top:top + h, left:left + w] = x[rows, :, :h, :w]
    return out


def spatial_modules(features: nn.Module) -> list[nn.Module]:
    """The layers whose output at a position depends on neighbouring positions. A pointwise convolution
    (1x1 kernel, no padding, any stride) reads only the position it writes, so whatever the padding
    holds stays in the padding: it needs no mask, and skipping it saves two masking kernels (forward,
    backward) per such layer, most of MobileNetV2's and ResNet's convolutions."""
    return [m for m in features.modules() if isinstance(m, _SPATIAL) and not _pointwise(m)]


def _pointwise(module: nn.Module) -> bool:
    """A 1x1 convolution without padding ("same" and "valid" pad a 1x1 kernel by nothing)."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and module.padding in ("valid", "same", (0, 0)))


def trace_sizes(features: nn.Module, layers: list[nn.Module], in_channels: int, size: Size
                ) -> tuple[list[Size | None], Size]:
    """Input (h, w) of each layer in `layers` and the output (h, w), for one image of `size`.

    Runs the layers on an empty batch (0, C, h, w): shapes propagate, nothing is computed. Eval mode
    for the duration, so BatchNorm neither needs batch statistics nor updates its running ones."""
    seen: dict[int, Size] = {}

    def record(module, args):
        seen[id(module)] = tuple(args[0].shape[-2:])

    modes = [(module, module.training) for module in features.modules()]
    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    reference = next(chain(features.parameters(), features.buffers()), None)
    device = reference.device if reference is not None else None
    try:
        features.eval()
        with torch.no_grad():
            out = features(torch.empty(0, in_channels, *size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return [seen.get(id(layer)) for layer in layers], tuple(out.shape[-2:])


def host_sizes(valid_hw: Tensor | Sequence[Sequence[int]]) -> list[Size]:
    """Each image's valid (h, w) as Python ints, from a (B, 2) tensor or a sequence of pairs. Pass a CPU
    tensor or a sequence: reading a GPU tensor here would wait for the GPU (amldist.transfer)."""
    rows = valid_hw.tolist() if isinstance(valid_hw, Tensor) else valid_hw
    return [(int(h), int(w)) for h, w in rows]


def sizes_on(sizes: Sequence[Size], device: torch.device) -> Tensor:
    """(B, 2) long tensor of host sizes on `device`, copied without stalling the host."""
    return to_device(torch.tensor(sizes, dtype=torch.long).reshape(-1, 2), device)


def valid_mask(valid_hw: Tensor, height: int, width: int) -> Tensor:
    """(B, 2) valid sizes -> (B, 1, H, W) bool, True inside each image's top-left valid region."""
    rows = torch.arange(height, device=valid_hw.device)[None, :] < valid_hw[:, :1]  # (B, H)
    cols = torch.arange(width, device=valid_hw.device)[None, :] < valid_hw[:, 1:]  # (B, W)
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)


class PaddedForward:
    """Per-network helper: cached size traces and the masking hooks for padded batches."""

    def __init__(self) -> None:
        self._cache: dict[Size, tuple[list[Size | None], Size]] = {}
        self._warned = False

    def sizes(self, features: nn.Module, layers: list[nn.Module], in_channels: int, size: Size):
        key = (in_channels, *size)
        if key not in self._cache:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = trace_sizes(features, layers, in_channels, size)
        return self._cache[key]

    @contextmanager
    def masking(self, features: nn.Module, x: Tensor, sizes: Sequence[Size]) -> Iterator[Tensor]:
        """Install masking hooks for a forward of `x` (B, C, H, W) whose images have the valid (h, w)
        `sizes` (host ints); yields the output valid sizes (B, 2) on x's device."""
        layers = spatial_modules(features)
        if not self._warned and any(m.training for m in features.modules() if isinstance(m, _BATCHNORMS)):
            self._warned = True
            log.warning("padded batch through BatchNorm in training mode: batch statistics mix the padding "
                        "in; use eval() or freeze_batchnorm() for exact results")
        per_image = [self.sizes(features, layers, x.shape[1], size) for size in sizes]
        layer_sizes = [[image_sizes[i] for image_sizes, _ in per_image] for i in range(len(layers))]
        masks: dict[tuple, Tensor] = {}

        def mask_for(index: int, height: int, width: int) -> Tensor | None:
            """The valid region of each image at layer `index`, or None where nothing is padding."""
            sizes = layer_sizes[index]
            if any(s is None for s in sizes) or all(s == (height, width) for s in sizes):
                return None
            key = (height, width, tuple(sizes))
            if key not in masks:
                masks[key] = valid_mask(sizes_on(sizes, x.device), height, width)
            return masks[key]

        handles = [_install(layer, index, mask_for, layer_sizes[index]) for index, layer in enumerate(layers)]
        try:
            yield sizes_on([out_size for _, out_size in per_image], x.device)
        finally:
            for handle in handles:
                handle.remove()


def _install(layer: nn.Module, index: int, mask_for, sizes: list[Size | None]):
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return layer.register_forward_hook(_average_hook(layer, index, mask_for))
    align = isinstance(layer, SamePadConv2d)
    return layer.register_forward_pre_hook(_input_hook(index, mask_for, isinstance(layer, _MAX_POOLS), align,
                                                       sizes))


def _input_hook(index: int, mask_for, is_max_pool: bool, align: bool, sizes: list[Size | None]):
    def hook(module, args):
        x = args[0]
        mask = mask_for(index, x.shape[-2], x.shape[-1])
        if mask is None:
            return None
        x = x.masked_fill(~mask, max_pool_padding_value(x) if is_max_pool else 0.0)
        if align:  # mask_for found every size, so none is None
            x = align_for_same_padding(module, x, sizes)
        return (x, *args[1:])
    return hook


def _average_hook(layer: nn.AdaptiveAvgPool2d, index: int, mask_for):
    def hook(module, args, output):
        x = args[0]
        mask = mask_for(index, x.shape[-2], x.shape[-1])
        if mask is None:
            return None
        if output.shape[-2:] != (1, 1):
            raise NotImplementedError("padded batches support AdaptiveAvgPool2d only with output size 1")
        return masked_adaptive_avg(x, mask)
    return hook
