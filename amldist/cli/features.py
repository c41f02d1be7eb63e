"""`amldist features`: the teacher's descriptors of every image of a training split, as a feature store.

    amldist features --network TEACHER.pth --shards ROOT/shards/retrieval-SfM-120k-362/train --out DIR
                     [--num-workers N] [--image-size S] [--scales 1 0.7071 0.5]

Asymmetric training reads positives and negatives from this store instead of running the teacher.
With --num-workers N the split is cut into N contiguous parts embedded by Ray tasks (one GPU each when
the cluster has GPUs); otherwise one process does it. A store already computed with the same teacher,
size, scales and split is left alone unless --force.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amldist.cli.common import add_command, existing_dir, existing_file, positive_int, require
from amldist.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = add_command(subparsers, "features", "compute a teacher's features of a training split "
                         "(the fixed database of asymmetric training)", run)
    parser.add_argument("--network", required=True, type=existing_file,
                        help="teacher network file (cirtorch/aml network or amldist checkpoint)")
    parser.add_argument("--shards", required=True, type=existing_dir,
                        help="shard folder of one split, e.g. ROOT/shards/retrieval-SfM-120k-362/train")
    parser.add_argument("--out", required=True, type=Path, help="feature store folder to write")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="longest image side (default: the size the shards were written at)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="extraction scales, e.g. 1 0.7071 0.5 (default: 1)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="Ray tasks to spread the split over (0: this process only)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--force", action="store_true", help="recompute even when the store is up to date")


def run(args: argparse.Namespace) -> int:
    require(args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}")
    store = compute_features(args.network, args.shards, args.out, image_size=args.image_size, scales=args.scales,
                             num_workers=args.num_workers, batch_size=args.batch_size, device=args.device,
                             force=args.force)
    print(f"{store.directory}: {len(store)} teacher features of dim {store.dim} "
          f"({store.manifest['architecture']}, {store.manifest['dataset']}/{store.manifest['split']})")
    return 0


def compute_features(network: str | Path, split_dir: str | Path, out: str | Path, *, image_size: int | None = None,
                     scales: Sequence[float] = (1.0,), num_workers: int = 0, batch_size: int = 16,
                     device: str | None = None, force: bool = False):
    """Embed every image of the split with the teacher and write the store; returns it opened."""
    from amldist.checkpoints import load_network_file
    from amldist.feature_store import FeatureStore, file_sha256, write_feature_store
    from amldist.shards import read_manifest

    shards = read_manifest(split_dir)
    network = Path(network)
    provenance = {"network_sha256": file_sha256(network), "image_size": int(image_size or shards["image_size"]),
                  "scales": [float(s) for s in scales], "dataset": shards["dataset"], "split": shards["split"],
                  "count": int(shards["num_images"])}
    if not force:
        existing = _up_to_date(FeatureStore, out, provenance)
        if existing is not None:
            log.info("%s is up to date; nothing to do (use --force to recompute)", out)
            return existing
    net = load_network_file(network)
    options = {"image_size": provenance["image_size"], "scales": provenance["scales"], "batch_size": batch_size}
    if num_workers > 0:
        features = embed_with_ray(net, split_dir, provenance["count"], num_workers, options)
    else:
        features = embed_split(net, split_dir, provenance["count"], None, device, options)
    return write_feature_store(out, features, network=str(network), network_sha256=provenance["network_sha256"],
                               architecture=net.meta.architecture, image_size=provenance["image_size"],
                               scales=provenance["scales"], dataset=provenance["dataset"], split=provenance["split"])


def _up_to_date(store_class, out: str | Path, provenance: dict[str, Any]):
    if not (Path(out) / "manifest.json").is_file():
        return None
    try:
        return store_class.open(out, expected=provenance)
    except UserError as err:
        log.info("recomputing %s: %s", out, err)
        return None


def _default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def embed_split(net, split_dir: str | Path, count: int, positions: np.ndarray | None, device: str | None,
                options: dict[str, Any]) -> np.ndarray:
    """Descriptors (len(positions) or count, D) of images `positions` of the split (all when None)."""
    from amldist.extract import ShardSource, embed

    source = ShardSource(split_dir, expected_count=count)  # a row per image, or a clear error
    if positions is not None:
        source = SubsetSource(source, positions)
    return embed(net, source, device=_default_device(device), desc="teacher features", **options)


class SubsetSource:
    """Images `positions` of another image source, in that order (the protocol of amldist.extract)."""

    def __init__(self, source, positions: np.ndarray):
        self.source = source
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def size(self, i: int):
        return self.source.size(int(self.positions[i]))

    def original_size(self, i: int):
        return self.source.original_size(int(self.positions[i]))

    def bbx(self, i: int):
        return self.source.bbx(int(self.positions[i]))

    def load(self, i: int):
        return self.source.load(int(self.positions[i]))


def embed_with_ray(net, split_dir: str | Path, count: int, num_workers: int, options: dict[str, Any]) -> np.ndarray:
    """Cut the split into `num_workers` contiguous parts, embed them in Ray tasks, put the rows back in order.

    Joins the running Ray cluster (RAY_ADDRESS or the one this process started), else starts a local one.
    The shard folder must be readable from every node (shared storage), as for training.
    """
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(_embed_part).options(num_cpus=1, num_gpus=gpus, max_retries=2)
    net_ref = ray.put(net)
    parts = [p for p in np.array_split(np.arange(count), min(num_workers, count)) if len(p)]
    pending = [task.remote(net_ref, str(split_dir), count, part, options) for part in parts]
    features = None
    for part, vectors in zip(parts, ray.get(pending)):
        if features is None:
            features = np.zeros((count, vectors.shape[1]), np.float32)
        features[part] = vectors  # (len(part), D)
    return features


def _embed_part(net, split_dir: str, count: int, positions: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    logging.getLogger("amldist").setLevel(logging.WARNING)
    return embed_split(net, split_dir, count, positions, None, options)
