"""Networks under test and their descriptors of each test set, computed once and shared across modes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amldist.checkpoints import load_checkpoint
from amldist.datasets import formats, layout
from amldist.errors import UserError
from amldist.extract import FileSource, ShardSource, embed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """How networks are evaluated (`amldist eval`'s flags)."""

    data_root: Path                        # data root in cirtorch's layout
    datasets: tuple[str, ...]              # test sets (layout.TEST_DATASETS)
    image_size: int = 1024                 # longest image side
    scales: tuple[float, ...] = (1.0,)     # multi-scale extraction, e.g. (1, 1/sqrt(2), 1/2)
    whitening: str | None = None           # learn Lw on this training set's whitening pairs
    distractors: str | None = None         # add this distractor set to every database (+R1M)
    device: str = "cpu"
    batch_size: int | None = None          # images per forward pass (None: extract's default)
    workers: int = 2                       # DataLoader decoding workers
    ray_workers: int = 0                   # Ray tasks for the distractors (0: this process)


@dataclass(eq=False)
class LoadedNet:
    """A network under test: its role in the modes ("student", "teacher"), its file and the module."""

    role: str
    path: Path
    net: Any

    @property
    def dim(self) -> int:
        return int(self.net.meta.outputdim)


def load_net(role: str, path: str | Path, device: str) -> LoadedNet:
    """An amldist checkpoint or a cirtorch/aml {'state_dict', 'meta'} file, in eval mode on `device`."""
    net, _ = load_checkpoint(path)
    return LoadedNet(role, Path(path), net.to(device).eval())


@dataclass
class DescriptorCache:
    """Descriptors per (network role, dataset, split), computed once and reused across modes. Images are
    read from shards under the root when they exist at this image size, else from the image folders."""

    settings: EvalSettings
    cache: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)

    def source(self, dataset: str, split: str, count: int):
        root = self.settings.data_root
        shard_dir = layout.shards_dir(root, dataset, self.settings.image_size) / split
        if (shard_dir / "manifest.json").is_file():
            log.info("%s/%s: reading shards %s", dataset, split, shard_dir)
            return ShardSource(shard_dir, crop_to_bbx=split == "query", expected_count=count)
        records = formats.list_images(root, dataset)[split]
        missing = [r.path for r in records if not r.path.is_file()]
        if missing:
            raise UserError(f"{len(missing)} image(s) of {dataset}/{split} are missing, e.g. {missing[0]}")
        return FileSource.from_records(records)

    def descriptors(self, network: LoadedNet, dataset: str, split: str, count: int,
                    distributed: bool = False) -> np.ndarray:
        """(count, D) descriptors; `distributed` spreads them over the settings' Ray workers when asked."""
        key = (network.role, dataset, split)
        if key not in self.cache:
            source = self.source(dataset, split, count)
            self.cache[key] = self._embed(network, source, f"{network.role} {dataset}/{split}", distributed)
        return self.cache[key]

    def _embed(self, network: LoadedNet, source, desc: str, distributed: bool) -> np.ndarray:
        s = self.settings
        options = {"image_size": s.image_size, "scales": list(s.scales), "batch_size": s.batch_size}
        if distributed and s.ray_workers > 0:
            from amldist.distributed_extract import embed_distributed

            gpus = 1.0 if s.device.startswith("cuda") else 0.0
            return embed_distributed(network.net, source, num_workers=s.ray_workers, gpus_per_worker=gpus,
                                     **options)
        log.info("extracting %s (%d images)", desc, len(source))
        return embed(network.net, source, device=s.device, num_workers=s.workers, desc=desc, **options)
