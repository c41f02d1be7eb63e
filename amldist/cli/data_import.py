"""`amldist data import`: a folder per landmark, or GLDv2's CSV + image tree, into a training set in
SfM-120k's layout under ROOT/train/NAME/ (docs/DATA.md, "Your own landmarks")."""

from __future__ import annotations

import argparse
from pathlib import Path

from amldist.cli.common import add_command, existing_dir, existing_file, non_negative_int, positive_int
from amldist.datasets.importing import ImportOptions, RunSettings, import_folders, import_gldv2

DEFAULTS = ImportOptions()


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive): {text}")
    return value


def at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (a pair needs two images of a landmark): {text}")
    return value


def register(data_subparsers) -> None:
    parser = add_command(data_subparsers, "import",
                         "import your own landmark photos (a folder per landmark) or GLDv2 as a training set",
                         run)
    parser.add_argument("--images", type=existing_dir, required=True,
                        help="a folder with one sub-folder per landmark (any depth, any image format PIL "
                             "reads); with --gldv2, GLDv2's train/ folder (a/b/c/<id>.jpg)")
    parser.add_argument("--gldv2", type=existing_file, default=None, metavar="CSV",
                        help="GLDv2's train.csv (id,url,landmark_id) or train_clean.csv (landmark_id,images)")
    parser.add_argument("--root", type=Path, required=True,
                        help="data root; the set goes to ROOT/train/NAME/")
    parser.add_argument("--name", required=True,
                        help="dataset name, used as --dataset / data.dataset / -w later")
    parser.add_argument("--val-fraction", type=fraction, default=DEFAULTS.val_fraction,
                        help="share of the landmarks held out as the val split (default "
                             f"{DEFAULTS.val_fraction})")
    parser.add_argument("--min-per-landmark", type=at_least_two, default=DEFAULTS.min_per_landmark,
                        help="landmarks with fewer usable images are left out "
                             f"(default {DEFAULTS.min_per_landmark})")
    parser.add_argument("--seed", type=non_negative_int, default=DEFAULTS.seed,
                        help="seed of the val split and the pairs (default 0)")
    parser.add_argument("--min-side", type=positive_int, default=DEFAULTS.min_side,
                        help=f"images with a shorter side below this many pixels are left out "
                             f"(default {DEFAULTS.min_side})")
    parser.add_argument("--pairs-per-image", type=positive_int, default=DEFAULTS.pairs_per_image,
                        help=f"query/positive pairs per query image (default {DEFAULTS.pairs_per_image})")
    parser.add_argument("--max-pairs-per-landmark", type=positive_int,
                        default=DEFAULTS.max_pairs_per_landmark,
                        help=f"cap of one landmark's pairs (default {DEFAULTS.max_pairs_per_landmark})")
    parser.add_argument("--copy", action="store_true",
                        help="copy images into ims/ even where a hard link works")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="checking processes (default: all CPUs; 0 or 1 runs in-process)")
    parser.add_argument("--ray-workers", type=positive_int, default=None,
                        help="check and store with this many Ray tasks at a time instead of local processes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier import of another source or with other options")


def run(args: argparse.Namespace) -> int:
    options = ImportOptions(val_fraction=args.val_fraction, min_per_landmark=args.min_per_landmark,
                            min_side=args.min_side, pairs_per_image=args.pairs_per_image,
                            max_pairs_per_landmark=args.max_pairs_per_landmark, seed=args.seed)
    settings = RunSettings(workers=args.workers, ray_workers=args.ray_workers, copy=args.copy,
                           overwrite=args.overwrite)
    if args.gldv2 is not None:
        record = import_gldv2(args.gldv2, args.images, args.root, args.name, options, settings)
    else:
        record = import_folders(args.images, args.root, args.name, options, settings)
    for line in summary_lines(record):
        print(line)
    return 0


def summary_lines(record: dict) -> list[str]:
    counts = record["counts"]
    skipped = {key: value for key, value in counts["skipped"].items() if value}
    rate = counts["listed"] / max(record["seconds"], 1e-3)
    head = (f"{record['name']}: {counts['kept']} of {counts['listed']} images kept, "
            f"{counts['landmarks']['kept']} of {counts['landmarks']['listed']} landmarks, in "
            f"{record['seconds']} s ({rate:.0f} images/s)")
    lines = [head]
    if skipped:
        lines.append("  skipped: " + ", ".join(f"{value} {key.replace('_', ' ')}"
                                               for key, value in skipped.items())
                     + f" (list: {record['name']}-skipped.tsv)")
    for split in ("train", "val"):
        numbers = counts[split]
        lines.append(f"  {split}: {numbers['images']} images, {numbers['landmarks']} landmarks, "
                     f"{numbers['pairs']} pairs")
    lines.append(f"  whiten: {counts['whiten']['images']} images, {counts['whiten']['pairs']} pairs")
    stored = counts["stored"]
    lines.append(f"  ims/: {stored['linked']} linked, {stored['copied']} copied, "
                 f"{stored['present']} already there"
                 + (f", {counts['pruned']} no longer listed removed" if counts["pruned"] else ""))
    return lines
