"""cirtorch's image preparation as tensor operations, so an exported network carries it (no PIL).

`extract.prepare_image` crops a query to its bbx and shrinks the image with PIL's
`thumbnail(..., LANCZOS)`. A client of an exported network has no PIL, so the same steps are written
here with tensor operations only: every size is computed from the input's shape by tensor operations,
never held as a Python number, so that one trace (`torch.jit.trace`, the ONNX exporter) serves images
of any size.

PIL's thumbnail, reproduced to the integer (Pillow >= 13):
1. size: longest side <= floor(max side), aspect kept, never upscaled (`extract.thumbnail_size`'s rule);
2. `reducing_gap=2`: when the image is at least 4x the target on an axis, it is first box-reduced by
   the integer factor f = floor(in / out / 2) (blocks of f x f pixels, partial blocks at the right and
   bottom edges; PIL's fixed-point mean ((sum + n // 2) * trunc(2^32 / (256 n))) >> 24);
3. Lanczos-3 resampling in two passes, each rounded to 8 bits: PIL's coefficients (the taps within
   3 * max(scale, 1) input pixels of each output centre, normalised to sum 1) quantised to 22
   fractional bits, output clip((2^21 + sum pixel * coefficient) >> 22). Pillow 13 runs the vertical
   pass first when the height loses more than twice as many pixels as the width (earlier versions
   always ran the horizontal pass first; the order changes the rounding).
All sums are of integers in float64, hence exact; `tests/test_retrieval.py` compares the result
with PIL pixel for pixel. A pass works on rows: the resampled axis first, the other axes flattened.
Sizes in floating-point arithmetic are (1,) float64 tensors, never 0-d ones: torch's ONNX exporter types
0-d tensors like Python numbers and would compute with them in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PRECISION_BITS = 22      # PIL's fractional bits of 8-bit resampling coefficients (32 - 8 - 2)
LANCZOS_SUPPORT = 3.0    # Lanczos-3: taps within 3 input pixels (times the downscale factor)
REDUCING_GAP = 2.0       # Image.thumbnail's default: box-reduce first when shrinking 2 x 2 times or more
# After the box reduction every Lanczos pass shrinks by less than 2 * REDUCING_GAP, so an output pixel
# reads fewer than 2 * 3 * 4 + 1 input pixels: a fixed tap count keeps the trace free of branches.
TAPS = 2 * math.ceil(LANCZOS_SUPPORT * 2 * REDUCING_GAP) + 1
F64 = torch.float64


def _trunc(x: Tensor) -> Tensor:
    """C's cast to int (toward zero), written with floor so that every exporter knows it."""
    return torch.sign(x) * torch.floor(torch.abs(x))


def _round_aspect(low: Tensor, high: Tensor, low_error: Tensor, high_error: Tensor) -> Tensor:
    """PIL's round_aspect: floor or ceil, whichever keeps the aspect better (floor on a tie), at least 1."""
    return torch.clamp(torch.where(high_error < low_error, high, low), min=1.0)


def thumbnail_hw(height: Tensor, width: Tensor, max_side: Tensor) -> tuple[Tensor, Tensor]:
    """(h, w) that PIL's thumbnail((max_side, max_side)) gives a (height, width) image; (1,) float64."""
    box = torch.clamp(torch.floor(max_side), min=1.0)
    aspect = width / height
    # Taller than wide (aspect <= 1): the height becomes `box`, the width is rounded to keep the aspect.
    tall_low, tall_high = torch.floor(box * aspect), torch.ceil(box * aspect)
    tall_w = _round_aspect(tall_low, tall_high, torch.abs(aspect - tall_low / box),
                           torch.abs(aspect - tall_high / box))
    # Wider than tall: the width becomes `box`; PIL counts a height of 0 as a perfect fit.
    wide_low, wide_high = torch.floor(box / aspect), torch.ceil(box / aspect)
    zero = torch.zeros_like(box)
    wide_h = _round_aspect(wide_low, wide_high,
                           torch.where(wide_low == 0, zero, torch.abs(aspect - box / wide_low)),
                           torch.where(wide_high == 0, zero, torch.abs(aspect - box / wide_high)))
    fits = (box >= width) & (box >= height)
    new_h = torch.where(fits, height, torch.where(aspect <= 1, box, wide_h))
    new_w = torch.where(fits, width, torch.where(aspect <= 1, tall_w, box))
    return new_h, new_w


# ---------------------------------------------------------------- passes over rows (N, M): axis 0 resampled


def _sinc(x: Tensor) -> Tensor:
    # pi as a float64 tensor: the ONNX exporter would store a Python float constant in float32.
    scaled = x * torch.full_like(x[:1, :1], math.pi)
    safe = torch.where(x == 0, torch.ones_like(x), scaled)
    return torch.where(x == 0, torch.ones_like(x), torch.sin(safe) / safe)


def lanczos_taps(in_size: Tensor, box_end: Tensor, out_size: Tensor) -> tuple[Tensor, Tensor]:
    """PIL's Lanczos resampling of input pixels [0, box_end) to `out_size` pixels: each output's first
    input pixel (out,) and the integer coefficients of that pixel and the next TAPS - 1 (out, TAPS)."""
    scale = box_end / out_size
    filter_scale = torch.clamp(scale, min=1.0)
    support = LANCZOS_SUPPORT * filter_scale
    centres = (torch.arange(out_size[0].to(torch.int64), dtype=F64) + 0.5) * scale  # (out,)
    first = torch.clamp(torch.floor(centres - support + 0.5), min=0.0)
    last = torch.minimum(torch.floor(centres + support + 0.5), in_size)  # exclusive
    pixels = first[:, None] + torch.arange(TAPS, dtype=F64)[None, :]  # (out, TAPS)
    t = (pixels - centres[:, None] + 0.5) / filter_scale
    inside = (pixels < last[:, None]) & (t >= -LANCZOS_SUPPORT) & (t < LANCZOS_SUPPORT)
    weights = torch.where(inside, _sinc(t) * _sinc(t / 3.0), torch.zeros_like(t))
    total = weights.sum(dim=1, keepdim=True)
    fixed = weights / torch.where(total == 0, torch.ones_like(total), total) * float(1 << PRECISION_BITS)
    return first, torch.where(fixed < 0, _trunc(fixed - 0.5), _trunc(fixed + 0.5))


def _resample_rows(rows: Tensor, first: Tensor, coefficients: Tensor) -> Tensor:
    """(N, M) -> (out, M): each output row is sum_j rows[first + j] * coefficient j, rounded to 8 bits."""
    last_row = torch._shape_as_tensor(rows)[0:1].to(F64) - 1
    acc = torch.zeros_like(rows[:1]) + float(1 << (PRECISION_BITS - 1))  # PIL's rounding bias
    for tap in range(TAPS):
        index = torch.clamp(first + tap, max=last_row).to(torch.int64)  # a clamped tap has coefficient 0
        acc = acc + rows.index_select(0, index) * coefficients[:, tap:tap + 1]
    return torch.clamp(torch.floor(acc / float(1 << PRECISION_BITS)), 0.0, 255.0)


def _columns_as_rows(image: Tensor) -> Tensor:
    """(H, W, 3) -> (W, H * 3): the horizontal axis first."""
    return image.permute(1, 0, 2).reshape(image.shape[1], -1)


def _rows_as_image(rows: Tensor, width: int) -> Tensor:
    return rows.reshape(rows.shape[0], width, 3)


def _transposed_back(rows: Tensor, height: int) -> Tensor:
    """(W', H * 3) -> (H, W', 3)."""
    return rows.reshape(rows.shape[0], height, 3).permute(1, 0, 2)


def _block_counts(size: Tensor, factor: Tensor) -> Tensor:
    """Lengths of the blocks of `factor` pixels along an axis of `size` (the last one may be shorter)."""
    starts = torch.arange(torch.ceil(size / factor)[0].to(torch.int64), dtype=F64) * factor
    return torch.minimum(starts + factor, size) - starts


def box_reduce(image: Tensor, factor_h: Tensor, factor_w: Tensor) -> Tensor:
    """PIL's Image.reduce((factor_w, factor_h)) of an (H, W, 3) image of 8-bit values -> float64.

    Blocks are summed by zero-padding to whole blocks and reshaping; float32 holds these sums exactly
    while a block has fewer than 2^24 / 255 pixels (factors below 256)."""
    shape = torch._shape_as_tensor(image)
    height, width = shape[0], shape[1]
    step_h, step_w = factor_h[0].to(torch.int64), factor_w[0].to(torch.int64)
    blocks_h, blocks_w = (height + step_h - 1) // step_h, (width + step_w - 1) // step_w
    image = image.float()
    image = torch.cat([image, torch.zeros(height, blocks_w * step_w - width, 3)], dim=1)
    image = torch.cat([image, torch.zeros(blocks_h * step_h - height, blocks_w * step_w, 3)], dim=0)
    sums = image.reshape(blocks_h, step_h, blocks_w, step_w, 3).sum(dim=(1, 3)).to(F64)  # (h, w, 3)
    count = (_block_counts(shape[0:1].to(F64), factor_h)[:, None]
             * _block_counts(shape[1:2].to(F64), factor_w)[None, :])[:, :, None]  # (h, w, 1) pixels per block
    # PIL divides in single precision: multiplier = trunc(2^32 / (256 n)) as float32.
    multiplier = _trunc((torch.full_like(count, 4294967296.0).float() / (256.0 * count).float()).to(F64))
    return torch.floor((sums + torch.floor(count / 2)) * multiplier / 2.0 ** 24)


def _horizontal(image: Tensor, taps: tuple[Tensor, Tensor]) -> Tensor:
    height = image.shape[0]
    return _transposed_back(_resample_rows(_columns_as_rows(image), taps[0], taps[1]), height)


def _vertical(image: Tensor, taps: tuple[Tensor, Tensor]) -> Tensor:
    width = image.shape[1]
    return _rows_as_image(_resample_rows(image.reshape(image.shape[0], -1), taps[0], taps[1]), width)


def thumbnail(image: Tensor, max_side: Tensor) -> Tensor:
    """PIL's `thumbnail((max_side, max_side), LANCZOS)` of an (H, W, 3) image of 8-bit values -> float64."""
    shape = torch._shape_as_tensor(image).to(F64)
    height, width = shape[0:1], shape[1:2]
    new_h, new_w = thumbnail_hw(height, width, max_side)
    factor_h = torch.clamp(torch.floor(height / new_h / REDUCING_GAP), min=1.0)
    factor_w = torch.clamp(torch.floor(width / new_w / REDUCING_GAP), min=1.0)
    reduced = box_reduce(image, factor_h, factor_w)  # an identity when both factors are 1
    reduced_shape = torch._shape_as_tensor(reduced).to(F64)
    in_h, in_w = reduced_shape[0:1], reduced_shape[1:2]
    # After the reduction PIL resamples the box (0, 0, W / f_w, H / f_h), handed to C as float32.
    horizontal = lanczos_taps(in_w, (width / factor_w).float().to(F64), new_w)
    vertical = lanczos_taps(in_h, (height / factor_h).float().to(F64), new_h)
    # Both orders are computed and one is kept: a trace has no branches. (Resampling an axis that keeps
    # its size is an exact identity: one coefficient of 2^22, the others 0.)
    rows_first = _vertical(_horizontal(reduced, horizontal), vertical)
    columns_first = _horizontal(_vertical(reduced, vertical), horizontal)
    vertical_first = (in_h - new_h > 0) & (in_h - new_h > (in_w - new_w) * 2)
    return torch.where(vertical_first, columns_first, rows_first)  # (new_h, new_w, 3)


def crop_and_scale(image: Tensor, box: Tensor, image_size: float) -> tuple[Tensor, Tensor]:
    """A query's crop and the longest side it is shrunk to (`extract.crop_box`, `extract.query_max_side`).

    image (H, W, 3); box (4,) = x1, y1, x2, y2 in the image's pixels, rounded half to even as Python's
    round; the crop is clipped to the image. The full box (0, 0, W, H) keeps the whole image at
    `image_size`, the database rule."""
    shape = torch._shape_as_tensor(image).to(F64)
    height, width = shape[0:1], shape[1:2]
    corners = torch.round(box.to(F64))
    x1, y1, x2, y2 = corners[0:1], corners[1:2], corners[2:3], corners[3:4]
    longest_crop = torch.maximum(x2 - x1, y2 - y1)
    max_side = torch.clamp(image_size * longest_crop / torch.maximum(width, height), min=1.0)
    left = torch.minimum(torch.clamp(x1, min=0.0), width - 1)
    top = torch.minimum(torch.clamp(y1, min=0.0), height - 1)
    right = torch.minimum(torch.maximum(torch.maximum(x2, x1 + 1), left + 1), width)
    bottom = torch.minimum(torch.maximum(torch.maximum(y2, y1 + 1), top + 1), height)
    rows = torch.arange(top[0].to(torch.int64), bottom[0].to(torch.int64))
    columns = torch.arange(left[0].to(torch.int64), right[0].to(torch.int64))
    return image.index_select(0, rows).index_select(1, columns), max_side


def prepare(image: Tensor, box: Tensor, image_size: float) -> Tensor:
    """uint8 (H, W, 3) RGB + bbx (4,) -> (h, w, 3) float64 of 8-bit values, as `extract.prepare_image`."""
    cropped, max_side = crop_and_scale(image, box, image_size)  # the crop is taken on the 8-bit image
    return thumbnail(cropped, max_side)
