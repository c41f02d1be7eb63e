"""Descriptor extraction: `embed(model, images, ...) -> (N, D)` float32, single- or multi-scale.

One function serves evaluation, mining and the teacher feature store. Images come from an *image
source* (anything with `__len__`, `size(i)`, `original_size(i)`, `bbx(i)`, `load(i)`; see
`FileSource` and `ShardSource`), are prepared exactly as cirtorch prepares them:
- database images: thumbnail to longest side <= image_size (aspect kept, never upscaled);
- queries with a bbx: crop to the bbx, then thumbnail to image_size * max(crop) / max(full image),
  i.e. the crop keeps the scale the full image would get;
and are batched by aspect-ratio buckets (nearly equal shapes, zero-padded, the network pools only
each image's valid region), decoded by DataLoader workers.

Multi-scale (cirtorch's rule): v = (mean_s f(x_s)^msp)^(1/msp), L2-normalised, where x_s is the
normalised input bilinearly resized by s and msp = GeM's p for GeM networks (1 otherwise).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from amldist import batching
from amldist.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
# Images per forward pass when the caller does not say. On the GPU batching is the point; on a CPU
# large batches of ~1024 px images gain little (MobileNetV2's wide depthwise layers even lose, see
# docs/BENCHMARKS.md "Extraction") and cost a lot of memory, so the CPU default stays small.
DEFAULT_BATCH_SIZE = {"cuda": 16, "cpu": 4}
DEFAULT_MAX_PAD_FRAC = 0.1
NORM_EPS = 1e-6

Box = tuple[float, float, float, float]


class ImageSource(Protocol):
    """What `embed` reads. Positions 0..len-1 are the rows of the result."""

    def __len__(self) -> int: ...
    def size(self, i: int) -> tuple[int, int]: ...  # (width, height) of load(i), without decoding
    def original_size(self, i: int) -> tuple[int, int]: ...  # (width, height) the bbx refers to
    def bbx(self, i: int) -> Box | None: ...  # query crop box [x1, y1, x2, y2] in original pixels
    def load(self, i: int) -> Image.Image: ...  # RGB


# ---------------------------------------------------------------- image sources


class FileSource:
    """Image files (e.g. `formats.list_images` records), optionally with query boxes."""

    def __init__(self, paths: Sequence[str | Path], bbxs: Sequence[Box | None] | None = None):
        self.paths = [Path(p) for p in paths]
        self.bbxs = list(bbxs) if bbxs is not None else [None] * len(self.paths)
        if len(self.bbxs) != len(self.paths):
            raise ValueError("one bbx (or None) per path")
        self._sizes: dict[int, tuple[int, int]] = {}

    @classmethod
    def from_records(cls, records: Sequence[Any]) -> FileSource:
        """From `formats.ImageRecord`s (path, bbx), in the order given."""
        return cls([r.path for r in records], [r.bbx for r in records])

    def __len__(self) -> int:
        return len(self.paths)

    def size(self, i: int) -> tuple[int, int]:
        if i not in self._sizes:
            try:
                with Image.open(self.paths[i]) as img:  # reads the header only
                    self._sizes[i] = img.size
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read image {self.paths[i]}: {err}") from None
        return self._sizes[i]

    def original_size(self, i: int) -> tuple[int, int]:
        return self.size(i)

    def bbx(self, i: int) -> Box | None:
        return self.bbxs[i]

    def load(self, i: int) -> Image.Image:
        try:
            with Image.open(self.paths[i]) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image {self.paths[i]}: {err}") from None


class ShardSource:
    """A shard split folder (`amldist.shards.ShardReader`), rows in dataset-index order.

    Stored images are already resized; sizes come from the shard index without decoding. With
    `crop_to_bbx` (query splits) each sample's bbx, in original pixels, is read from its meta. The
    reader is reopened lazily in each process (DataLoader/Ray workers).
    """

    def __init__(self, split_dir: str | Path, crop_to_bbx: bool = False, expected_count: int | None = None):
        from amldist.shards import ShardReader

        self.reader = ShardReader(split_dir)
        self.crop_to_bbx = crop_to_bbx
        self.indices = self.reader.indices  # (N,) dataset indices, ascending
        if expected_count is not None and not np.array_equal(self.indices, np.arange(expected_count)):
            raise UserError(f"{split_dir} holds {len(self.indices)} of the {expected_count} images "
                            "(some were skipped when sharding); evaluate from the image folders instead")
        self._sizes = self.reader.sizes  # (N, 2) stored (w, h)
        self._original_sizes = self.reader.original_sizes  # (N, 2) original (w, h)
        self._bbxs: dict[int, Box | None] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def size(self, i: int) -> tuple[int, int]:
        return int(self._sizes[i, 0]), int(self._sizes[i, 1])

    def original_size(self, i: int) -> tuple[int, int]:
        return int(self._original_sizes[i, 0]), int(self._original_sizes[i, 1])

    def bbx(self, i: int) -> Box | None:
        if not self.crop_to_bbx:
            return None
        if i not in self._bbxs:
            box = self.reader.meta(int(self.indices[i])).get("bbx")
            self._bbxs[i] = None if box is None else tuple(float(v) for v in box)
        return self._bbxs[i]

    def load(self, i: int) -> Image.Image:
        return self.reader.read_image(int(self.indices[i]))


class SubsetSource:
    """Positions `positions` of another source, renumbered 0..len-1 (work split across processes)."""

    def __init__(self, source: ImageSource, positions: Sequence[int]):
        self.source = source
        self.positions = [int(p) for p in positions]

    def __len__(self) -> int:
        return len(self.positions)

    def size(self, i: int) -> tuple[int, int]:
        return self.source.size(self.positions[i])

    def original_size(self, i: int) -> tuple[int, int]:
        return self.source.original_size(self.positions[i])

    def bbx(self, i: int) -> Box | None:
        return self.source.bbx(self.positions[i])

    def load(self, i: int) -> Image.Image:
        return self.source.load(self.positions[i])


# ---------------------------------------------------------------- geometry (cirtorch's rules)


def thumbnail_size(width: int, height: int, max_side: float) -> tuple[int, int]:
    """(w, h) that PIL's `thumbnail((max_side, max_side))` produces: aspect kept, never upscaled."""
    box = max(1, math.floor(max_side))
    if box >= width and box >= height:
        return width, height
    aspect = width / height

    def closest(number: float, error) -> int:
        return max(min(math.floor(number), math.ceil(number), key=error), 1)

    if aspect <= 1:  # taller than wide: height is the limit
        return closest(box * aspect, lambda n: abs(aspect - n / box)), box
    return box, closest(box / aspect, lambda n: 0 if n == 0 else abs(aspect - box / n))


def crop_box(bbx: Box, stored_size: tuple[int, int], original_size: tuple[int, int]) -> tuple[int, ...]:
    """The bbx (original pixels) in stored-image pixels, rounded as PIL's crop rounds, at least 1 px."""
    scale = stored_size[0] / original_size[0]
    x1, y1, x2, y2 = (round(float(v) * scale) for v in bbx)
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def query_max_side(bbx: Box, original_size: tuple[int, int], image_size: int) -> float:
    """cirtorch's scale rule: the crop is resized by the factor the full image would get,
    image_size * max(crop w, crop h) / max(full w, full h)."""
    x1, y1, x2, y2 = (round(float(v)) for v in bbx)
    return max(1.0, image_size * max(x2 - x1, y2 - y1) / max(original_size))


def input_size(source: ImageSource, i: int, image_size: int) -> tuple[int, int]:
    """(h, w) of the network input for image i, predicted without decoding (for bucketing)."""
    box = source.bbx(i)
    if box is None:
        w, h = thumbnail_size(*source.size(i), image_size)
        return h, w
    x1, y1, x2, y2 = crop_box(box, source.size(i), source.original_size(i))
    w, h = thumbnail_size(x2 - x1, y2 - y1, query_max_side(box, source.original_size(i), image_size))
    return h, w


def prepare_image(source: ImageSource, i: int, image_size: int) -> Image.Image:
    """Load image i, crop it to its bbx if it has one, resize it by cirtorch's rule."""
    img = source.load(i)
    box = source.bbx(i)
    max_side: float = image_size
    if box is not None:
        img = img.crop(crop_box(box, img.size, source.original_size(i)))
        max_side = query_max_side(box, source.original_size(i), image_size)
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


class _PreparedImages(torch.utils.data.Dataset):
    """Decoding + resizing in DataLoader workers; yields (position, (3, h, w) uint8)."""

    def __init__(self, source: ImageSource, image_size: int):
        self.source, self.image_size = source, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        array = np.asarray(prepare_image(self.source, i, self.image_size), dtype=np.uint8)  # (h, w, 3)
        return i, torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _collate(items):
    return [i for i, _ in items], [t for _, t in items]


# ---------------------------------------------------------------- embedding


def _meta_value(model: torch.nn.Module, key: str, default: Any = None) -> Any:
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        return meta.get(key, default)
    return getattr(meta, key, default)


def multiscale_power(model: torch.nn.Module, scales: Sequence[float]) -> float:
    """msp: GeM's p when combining several scales of a plain GeM network, else 1 (cirtorch)."""
    plain_gem = (_meta_value(model, "pooling") == "gem" and not _meta_value(model, "regional", False)
                 and not _meta_value(model, "whitening", False))
    if len(scales) > 1 and plain_gem:
        return float(model.pool.p.detach().float().item())
    return 1.0


def combine_scales(per_scale: list[torch.Tensor], power: float) -> torch.Tensor:
    """(mean_s v_s^power)^(1/power), L2-normalised: list of (B, D) -> (B, D)."""
    if len(per_scale) == 1:
        return per_scale[0]
    v = torch.stack([x.float().pow(power) for x in per_scale]).mean(dim=0).pow(1.0 / power)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _autocast_dtype(autocast: Any, device: torch.device) -> torch.dtype | None:
    """None/True -> bf16 on CUDA (off on CPU); False -> off; 'bf16'/'fp16' or a dtype -> that."""
    if autocast is False or (autocast is None and device.type != "cuda"):
        return None
    if autocast is None or autocast is True:
        return torch.bfloat16
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16}
    dtype = names.get(autocast, autocast) if isinstance(autocast, str) else autocast
    if dtype not in (torch.bfloat16, torch.float16):
        raise UserError(f"autocast must be bf16 or fp16, got {autocast!r}")
    return dtype


def _normalise(images: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor,
               device: torch.device) -> list[torch.Tensor]:
    """uint8 (3, h, w) -> float (3, h, w), ToTensor + Normalize on the device."""
    return [(img.to(device, non_blocking=True).float().div_(255.0) - mean) / std for img in images]


def _rescale(images: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """Bilinear resize by `scale` of each normalised image (cirtorch resizes the normalised tensor)."""
    if scale == 1.0:
        return images
    if len({tuple(x.shape) for x in images}) == 1:  # one shape: one call
        batch = F.interpolate(torch.stack(images), scale_factor=scale, mode="bilinear", align_corners=False)
        return list(batch)
    return [F.interpolate(x[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
            for x in images]


def _forward(model, images: list[torch.Tensor]) -> torch.Tensor:
    """One padded batch through the network: list of (3, h, w) -> (B, D)."""
    batch, valid_hw = batching.pad_batch(images)
    return model(batch, valid_hw)  # valid sizes stay on the host (amldist.transfer)


def _progress_enabled() -> bool:
    return os.environ.get("AMLDIST_NO_PROGRESS") != "1" and sys.stderr.isatty()


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def embed(model: torch.nn.Module, images: ImageSource, *, image_size: int = 1024,
          scales: Sequence[float] = (1.0,), device: str | torch.device | None = None,
          batch_size: int | None = None, autocast: Any = None, num_workers: int = 0,
          max_pad_frac: float = DEFAULT_MAX_PAD_FRAC, desc: str = "extract") -> np.ndarray:
    """Descriptors of every image of `images`: (N, D) float32, row i = image i, L2-normalised.

    `device=None` keeps the model where it is; otherwise the model is moved there. `batch_size=1`
    is the reference's one-image-at-a-time loop; None picks DEFAULT_BATCH_SIZE for the device.
    `autocast`: None = bf16 on CUDA and off on CPU; False; 'bf16'/'fp16'. `num_workers`: DataLoader
    processes decoding images. The model is put in eval mode and restored after.
    """
    scales = [float(s) for s in scales]
    if not scales or any(not 0 < s <= 8 for s in scales):
        raise UserError(f"scales must be positive numbers, got {scales}")
    if len(images) == 0:
        return np.zeros((0, int(_meta_value(model, "outputdim", 0) or 0)), np.float32)
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(device)
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE["cpu"])
    shapes = [input_size(images, i, image_size) for i in range(len(images))]
    buckets = batching.bucket_by_shape(shapes, max_batch=batch_size, max_pad_frac=max_pad_frac)
    loader = torch.utils.data.DataLoader(
        _PreparedImages(images, image_size), batch_sampler=buckets, collate_fn=_collate,
        num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=False)
    was_training = model.training
    model.eval()
    try:
        return _run(model, loader, len(images), scales, device, _autocast_dtype(autocast, device), desc)
    finally:
        model.train(was_training)


def _run(model, loader, count: int, scales: list[float], device: torch.device,
         amp_dtype: torch.dtype | None, desc: str) -> np.ndarray:
    mean = torch.tensor(_meta_value(model, "mean", (0.485, 0.456, 0.406)), device=device).view(3, 1, 1)
    std = torch.tensor(_meta_value(model, "std", (0.229, 0.224, 0.225)), device=device).view(3, 1, 1)
    power = multiscale_power(model, scales)
    out: np.ndarray | None = None
    with torch.inference_mode(), tqdm(total=count, desc=desc, unit="img",
                                      disable=not _progress_enabled()) as bar:
        for positions, uint8_images in loader:
            normalised = _normalise(uint8_images, mean, std, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                per_scale = [_forward(model, _rescale(normalised, s)).float() for s in scales]
            vectors = combine_scales(per_scale, power).cpu().numpy()  # (B, D)
            if out is None:
                out = np.zeros((count, vectors.shape[1]), np.float32)
            out[positions] = vectors
            bar.update(len(positions))
    return out


def checked_device(device: str | None) -> str:
    """--device: None = cuda when a GPU is visible, else cpu; a GPU asked for but absent, or an unknown
    device, is one line before any work."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no GPU is visible")
    return device
