"""`amldist data synth`: write a synthetic landmark data root in the real dataset layout."""

from __future__ import annotations

import argparse
import os
import time

from amldist.cli.common import add_command, non_negative_int, positive_int
from amldist.synth import PRESETS, generate
from amldist.synth.layouts import LAYOUTS


def register(data_subparsers) -> None:
    parser = add_command(data_subparsers, "synth",
                         "generate synthetic landmark datasets (SfM-120k, rOxford5k/rParis6k, R1M layout)",
                         run)
    parser.add_argument("--root", required=True, help="data root to write (created if missing)")
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS),
                        help="dataset size: tiny (~1.8k images, 512 px), small (~7.9k, 1024 px), "
                             "medium (~36k, 1024 px); micro is for tests")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="random seed; same seed and preset, same bytes")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="rendering processes (default: all CPU cores)")
    parser.add_argument("--layout", default="cirtorch", choices=LAYOUTS,
                        help="where the training landmarks go: cirtorch (SfM-120k pkl + ims/, default), "
                             "folders (ROOT/landmarks/<landmark>/...) or gldv2 (ROOT/gldv2/train.csv, "
                             "train_clean.csv, train/a/b/c/<id>.jpg), the last two for `amldist data import`")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a synthetic set made with other parameters (or re-render this one)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    record = generate(args.root, args.preset, args.seed, workers=args.workers, overwrite=args.overwrite,
                      layout_name=args.layout)
    counts = record["counts"]
    print(f"synthetic root {args.root}: preset {record['preset']}, seed {record['seed']}, layout "
          f"{record['layout']}, {counts['total_images']['images']} images in "
          f"{time.perf_counter() - start:.1f} s")
    for name, numbers in counts.items():
        if name != "total_images":
            print(f"  {name}: " + ", ".join(f"{value} {key}" for key, value in numbers.items()))
    return 0
