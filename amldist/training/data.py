"""Training images by dataset index from shards, and the per-step image loader (no Ray).

Images are read from the split's shards (one positioned read each), resized to the training size by
cirtorch's rule (thumbnail: longest side <= image_size, aspect kept, never upscaled; a no-op when the
shards were written at that size) and normalised with the network's mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from amldist.extract import ShardSource, SubsetSource
from amldist.shards import ShardReader, load_tensor


class TrainImages:
    """Normalised (3, h, w) float32 training tensors of a shard split, by dataset index. Picklable
    (DataLoader workers reopen the shards lazily)."""

    def __init__(self, split_dir: str | Path, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.reader = ShardReader(split_dir)
        self.image_size = int(image_size)
        self.stored_size = int(self.reader.manifest["image_size"])
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    def load(self, index: int) -> Tensor:
        if self.stored_size <= self.image_size:  # stored images are already at (or below) the size
            return load_tensor(self.reader, int(index), self.mean, self.std)
        image = self.reader.read_image(int(index))
        image.thumbnail((self.image_size, self.image_size), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std


class StepImages(torch.utils.data.Dataset):
    """Item s = the list of tensors of `ids_per_step[s]`, decoded in DataLoader workers."""

    def __init__(self, images: TrainImages, ids_per_step: Sequence[np.ndarray]):
        self.images = images
        self.ids_per_step = [np.asarray(ids, np.int64) for ids in ids_per_step]

    def __len__(self) -> int:
        return len(self.ids_per_step)

    def __getitem__(self, step: int) -> list[Tensor]:
        return [self.images.load(int(i)) for i in self.ids_per_step[step]]


def _keep_list(item: list[Tensor]) -> list[Tensor]:
    return item


def step_loader(images: TrainImages, ids_per_step: Sequence[np.ndarray], workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Yields each step's image list in step order; `workers` processes decode ahead of training."""
    return torch.utils.data.DataLoader(StepImages(images, ids_per_step), batch_size=None, shuffle=False,
                                       num_workers=workers, collate_fn=_keep_list, pin_memory=pin_memory,
                                       prefetch_factor=2 if workers > 0 else None)


def split_source(split_dir: str | Path, num_images: int, positions: np.ndarray | None = None):
    """An `amldist.extract` image source over a split (rows = dataset indices), or a subset of it."""
    source = ShardSource(split_dir, expected_count=num_images)
    return source if positions is None else SubsetSource(source, np.asarray(positions, np.int64))
