"""The teacher's descriptors of every image of a training split, computed into a feature store.

Asymmetric training reads positives and negatives from this store instead of running the teacher
(`amldist.feature_store` is the format). With num_workers > 0 the split is embedded by that many Ray
tasks at a time (`amldist.distributed_extract`; one GPU each when the cluster has GPUs); otherwise one
process does it. A store already computed with the same teacher, image size, scales and split is
reused; one computed otherwise is replaced only when asked (`replace_other`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amldist.atomic import ensure_writable_dir
from amldist.checkpoints import load_network_file
from amldist.errors import UserError
from amldist.extract import ShardSource, checked_device, embed
from amldist.feature_store import FeatureStore, file_sha256, not_a_store, write_feature_store
from amldist.shards import read_manifest

log = logging.getLogger(__name__)


def compute_features(network: str | Path, split_dir: str | Path, out: str | Path, *,
                     image_size: int | None = None, scales: Sequence[float] = (1.0,), num_workers: int = 0,
                     batch_size: int = 16, device: str | None = None, force: bool = False,
                     replace_other: bool = True) -> FeatureStore:
    """Embed every image of the split with the teacher and write the store; returns it opened.

    force recomputes an up-to-date store. replace_other=False refuses (UserError) to replace a store
    computed with another teacher, size, scales or split; the CLI passes --force there, while training
    replaces its stale val store. A folder holding anything but a store is always refused.
    """
    shards = read_manifest(split_dir)
    network, out = Path(network), Path(out)
    device = checked_device(device)  # a GPU asked for but absent: say so before any work
    provenance = {"network_sha256": file_sha256(network),
                  "image_size": int(image_size or shards["image_size"]), "scales": [float(s) for s in scales],
                  "dataset": shards["dataset"], "split": shards["split"], "count": int(shards["num_images"])}
    existing = _existing_store(out, split_dir, provenance, replace_other)
    if existing is not None and not force:
        log.info("%s is up to date; nothing to do (use --force to recompute)", out)
        return existing
    net = load_network_file(network)
    ensure_writable_dir(out, "teacher feature store")  # a read-only disk fails now, not after embedding
    options = {"image_size": provenance["image_size"], "scales": provenance["scales"],
               "batch_size": batch_size}
    features = embed_split(net, split_dir, provenance["count"], num_workers, device, options)
    return write_feature_store(out, features, network=str(network),
                               network_sha256=provenance["network_sha256"],
                               architecture=net.meta.architecture, image_size=provenance["image_size"],
                               scales=provenance["scales"], dataset=provenance["dataset"],
                               split=provenance["split"])


def _existing_store(out: Path, split_dir: str | Path, provenance: dict[str, Any],
                    replace_other: bool) -> FeatureStore | None:
    """The store in `out` when it matches `provenance`; None when `out` may be written; else UserError."""
    if out.resolve().is_relative_to(Path(split_dir).resolve()):
        raise UserError(f"--out {out} lies in the --shards folder {split_dir}; choose another folder")
    problem = not_a_store(out)
    if problem is not None:
        raise UserError(f"--out {out} is not a teacher feature store: {problem}; choose another folder")
    if not (out / "manifest.json").is_file():
        return None
    try:
        store = FeatureStore.open(out)
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
    source = ShardSource(split_dir, expected_count=count)  # a row per image, or a clear error
    if num_workers == 0:
        return embed(net, source, device=device, desc="teacher features", **options)
    from amldist.distributed_extract import embed_distributed

    return embed_distributed(net, source, num_workers=num_workers, gpus_per_worker=_gpus_per_worker(),
                             **options)
