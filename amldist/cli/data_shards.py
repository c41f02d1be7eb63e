"""`amldist data shards`: write WebDataset shards of datasets; `amldist data shards-info`: summarise them."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from amldist.cli.common import add_command, existing_dir, non_negative_int, positive_int
from amldist.datasets import layout
from amldist.errors import UserError, require
from amldist.shards import (
    DEFAULT_QUALITY,
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_COUNT,
    find_split_dirs,
    read_manifest,
    shard_dataset,
)

_BYTE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MAX_LISTED_SKIPS = 20


def dataset_list(text: str) -> list[str]:
    """argparse type: one dataset name or a comma list, each a known dataset."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no dataset named")
    try:
        return [layout.check_dataset(name) for name in dict.fromkeys(names)]
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def name_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty list")
    return names


def byte_size(text: str) -> int:
    """argparse type: bytes as an integer with an optional K/M/G suffix (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"not a positive size like 256M: {text!r}")
    return int(match[1]) * _BYTE_UNITS[match[2].lower()]


def jpeg_quality(text: str) -> int:
    value = positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be in 1..100: {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `amldist data shards` (scripts/make_shards.py shares them)."""
    parser.add_argument("--root", type=existing_dir, required=True, help="data root in the cirtorch layout")
    parser.add_argument("--dataset", type=dataset_list, required=True,
                        help=f"dataset or comma list: {', '.join(layout.ALL_DATASETS)}, "
                             "or an imported set's name")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (one dataset only; default ROOT/shards/<dataset>-<image size>)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="longest stored side, never upscaled (default 362 training sets, 1024 others)")
    parser.add_argument("--splits", type=name_list, default=None,
                        help="comma list of splits (default all: train,val,whiten / db,query / db)")
    parser.add_argument("--shard-count", type=positive_int, default=DEFAULT_SHARD_COUNT,
                        help=f"most images per shard (default {DEFAULT_SHARD_COUNT})")
    parser.add_argument("--shard-bytes", type=byte_size, default=DEFAULT_SHARD_BYTES,
                        help="target bytes per shard, e.g. 256M (default 256M)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="processes (default: all CPUs; 0 or 1 runs in-process)")
    parser.add_argument("--ray-workers", type=positive_int, default=None,
                        help="write with this many Ray tasks at a time instead of local processes (joins the "
                             "cluster RAY_ADDRESS names, else starts a local Ray; data on shared storage)")
    parser.add_argument("--quality", type=jpeg_quality, default=DEFAULT_QUALITY,
                        help=f"JPEG quality of re-encoded images (default {DEFAULT_QUALITY})")
    parser.add_argument("--force", action="store_true",
                        help="replace shards of another dataset or split found in the output folder")


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def summary_line(manifest: dict) -> str:
    return (f"{manifest['dataset']}/{manifest['split']} @{manifest['image_size']}px: "
            f"{manifest['num_samples']}/{manifest['num_images']} images in {manifest['num_shards']} "
            f"shard{'' if manifest['num_shards'] == 1 else 's'} "
            f"({_human_bytes(manifest['total_bytes'])}), {manifest['num_skipped']} skipped")


def run_shards(args: argparse.Namespace) -> int:
    require(args.out is None or len(args.dataset) == 1,
            "--out takes a single --dataset; leave it out to write ROOT/shards/<dataset>-<image size>")
    for name in args.dataset:
        manifests = shard_dataset(args.root, name, out=args.out, image_size=args.image_size,
                                  splits=args.splits, shard_count=args.shard_count,
                                  shard_bytes=args.shard_bytes, workers=args.workers, quality=args.quality,
                                  force=args.force, ray_workers=args.ray_workers)
        for manifest in manifests.values():
            print(summary_line(manifest))
    return 0


def run_info(args: argparse.Namespace) -> int:
    for split_dir in find_split_dirs(args.dir):
        manifest = read_manifest(split_dir)
        print(f"{summary_line(manifest)}  [{split_dir}]")
        for skip in manifest["skipped"][:MAX_LISTED_SKIPS]:
            print(f"  skipped {skip['index']} {skip['name']}: {skip['reason']}")
        if manifest["num_skipped"] > MAX_LISTED_SKIPS:
            print(f"  ... and {manifest['num_skipped'] - MAX_LISTED_SKIPS} more skipped")
    return 0


def register(data_subparsers) -> None:
    parser = add_command(data_subparsers, "shards", "write WebDataset shards of datasets (resumable)",
                         run_shards)
    add_arguments(parser)
    info = add_command(data_subparsers, "shards-info", "print sample, shard and skip counts of shards",
                       run_info)
    info.add_argument("dir", type=existing_dir, metavar="DIR",
                      help="a split folder (with manifest.json) or a dataset's shard folder")
