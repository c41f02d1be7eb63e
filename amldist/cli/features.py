"""`amldist features`: the teacher's descriptors of every image of a training split, as a feature store.

    amldist features --network TEACHER.pth --shards ROOT/shards/retrieval-SfM-120k-362/train --out DIR
                     [--num-workers N] [--image-size S] [--scales 1 0.7071 0.5]

Asymmetric training reads positives and negatives from this store instead of running the teacher
(`amldist.teacher_features` computes it). With --num-workers N the split is embedded by N Ray tasks at a
time; otherwise this process does it. A store already computed with the same teacher, size, scales and
split is left alone unless --force; one computed otherwise is replaced only with --force. --out must be
a missing or empty folder or a feature store, outside the --shards folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from amldist.cli.common import add_command, existing_dir, existing_file, positive_int
from amldist.errors import require


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
    from amldist.teacher_features import compute_features

    require(args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}")
    store = compute_features(args.network, args.shards, args.out, image_size=args.image_size,
                             scales=args.scales, num_workers=args.num_workers, batch_size=args.batch_size,
                             device=args.device, force=args.force, replace_other=args.force)
    print(f"{store.directory}: {len(store)} teacher features of dim {store.dim} "
          f"({store.manifest['architecture']}, {store.manifest['dataset']}/{store.manifest['split']})")
    return 0
