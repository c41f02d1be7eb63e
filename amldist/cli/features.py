"""`amldist features`: the teacher's descriptors of every image of a training split, as a feature store.

    amldist features --network TEACHER.pth --shards ROOT/shards/retrieval-SfM-120k-362/train --out DIR
                     [--num-workers N] [--image-size S] [--scales 1 0.7071 0.5]

Asymmetric training reads positives and negatives from this store instead of running the teacher.
With --num-workers N the split is embedded by N Ray tasks at a time (amldist.distributed_extract; one
GPU each when the cluster has GPUs); otherwise one process does it. A store already computed with the same teacher,
size, scales and split is left alone unless --force; one computed otherwise is replaced only with --force.
--out must be a missing or empty folder or a feature store, outside the --shards folder.
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
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--force", action="store_true",
                        help="recompute even when the store is up to date, and replace a store computed with "
                             "another teacher, image size, scales or split")


def run(args: argparse.Namespace) -> int:
    require(args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}")
    store = compute_features(args.network, args.shards, args.out, image_size=args.image_size, scales=args.scales,
                             num_workers=args.num_workers, batch_size=args.batch_size, device=args.device,
                             force=args.force, replace_other=args.force)
    print(f"{store.directory}: {len(store)} teacher features of dim {store.dim} "
          f"({store.manifest['architecture']}, {store.manifest['dataset']}/{store.manifest['split']})")
    return 0


def compute_features(network: str | Path, split_dir: str | Path, out: str | Path, *, image_size: int | None = None,
                     scales: Sequence[float] = (1.0,), num_workers: int = 0, batch_size: int = 16,
                     device: str | None = None, force: bool = False, replace_other: bool = True):
    """Embed every image of the split with the teacher and write the store; returns it opened.

    force recomputes an up-to-date store. replace_other=False refuses (UserError) to replace a store
    computed with another teacher, size, scales or split; the CLI passes --force there, while training
    replaces its stale val store. A folder holding anything but a store is always refused.
    """
    from amldist.atomic import ensure_writable_dir
    from amldist.checkpoints import load_network_file
    from amldist.cli.common import checked_device
    from amldist.feature_store import FeatureStore, file_sha256, write_feature_store
    from amldist.shards import read_manifest

    shards = read_manifest(split_dir)
    network, out = Path(network), Path(out)
    device = checked_device(device)  # a GPU asked for but absent: say so before any work
    provenance = {"network_sha256": file_sha256(network), "image_size": int(image_size or shards["image_size"]),
                  "scales": [float(s) for s in scales], "dataset": shards["dataset"], "split": shards["split"],
                  "count": int(shards["num_images"])}
    existing = _existing_store(FeatureStore, out, split_dir, provenance, replace_other)
    if existing is not None and not force:
        log.info("%s is up to date; nothing to do (use --force to recompute)", out)
        return existing
    net = load_network_file(network)
    ensure_writable_dir(out, "teacher feature store")  # a read-only disk fails now, not after embedding
    options = {"image_size": provenance["image_size"], "scales": provenance["scales"], "batch_size": batch_size}
    features = embed_split(net, split_dir, provenance["count"], num_workers, device, options)
    return write_feature_store(out, features, network=str(network), network_sha256=provenance["network_sha256"],
                               architecture=net.meta.architecture, image_size=provenance["image_size"],
                               scales=provenance["scales"], dataset=provenance["dataset"], split=provenance["split"])


def _existing_store(store_class, out: Path, split_dir: str | Path, provenance: dict[str, Any], replace_other: bool):
    """The store in `out` when it matches `provenance`; None when `out` may be written; else UserError."""
    from amldist.feature_store import not_a_store

    if out.resolve().is_relative_to(Path(split_dir).resolve()):
        raise UserError(f"--out {out} lies in the --shards folder {split_dir}; choose another folder")
    problem = not_a_store(out)
    if problem is not None:
        raise UserError(f"--out {out} is not a teacher feature store: {problem}; choose another folder")
    if not (out / "manifest.json").is_file():
        return None
    try:
        store = store_class.open(out)
    except UserError as err:  # a damaged store of ours: rewritten atomically
        log.info("recomputing %s: %s", out, err)
        return None
    difference = store.mismatch(provenance)
    if difference is None:
        return store
    if not replace_other:
        raise UserError(f"--out {out} holds teacher features computed with {difference}; "
                        f"pass --force to replace them, or choose another folder")
    log.info("recomputing %s: it was computed with %s", out, difference)
    return None


def _gpus_per_worker() -> float:
    """One GPU per Ray task when the cluster (or, before Ray starts, this machine) has one."""
    import ray
    import torch

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else torch.cuda.device_count()
    return 1.0 if gpus >= 1 else 0.0


def embed_split(net, split_dir: str | Path, count: int, num_workers: int, device: str | None,
                options: dict[str, Any]) -> np.ndarray:
    """Descriptors (count, D) of every image of the split, row i = dataset index i.

    num_workers > 0 spreads the work over Ray tasks (amldist.distributed_extract); it joins the running
    Ray cluster (RAY_ADDRESS or one this process started), else starts a local one. The shard folder
    must then be readable from every node (shared storage), as for training.
    """
    from amldist.extract import ShardSource, embed

    source = ShardSource(split_dir, expected_count=count)  # a row per image, or a clear error
    if num_workers == 0:
        return embed(net, source, device=device, desc="teacher features", **options)
    from amldist.distributed_extract import embed_distributed

    return embed_distributed(net, source, num_workers=num_workers, gpus_per_worker=_gpus_per_worker(), **options)
