"""`amldist demo`: the end-to-end demo on synthetic landmarks, on this machine (no cluster, GPU or network).

    amldist demo                          # = --preset lite: ImageNet-pretrained EfficientNet-Lite
    amldist demo --preset tiny            # plain CNNs from scratch: the fastest
    amldist demo --preset small           # bigger data, more epochs (from scratch)
    amldist demo --force teacher          # retrain the teacher (and what depends on it)
    amldist demo --set run.epochs=4       # scale every training run
    amldist demo --search                 # then asymmetric search: export, index, query (make search-demo)

Synthesises and shards the datasets, trains a teacher, stores its features, trains three students
through `amldist train` (Ray local mode), evaluates them through `amldist eval`, prints a table shaped
like the paper's Table 3 and writes runs/demo/report.md. A re-run reuses every finished stage.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from amldist.cli.common import add_command, positive_int


def register(subparsers) -> None:
    from amldist.demo import DEMO_PRESETS
    from amldist.demo.pipeline import FORCE_GROUPS, STAGES
    from amldist.demo.settings import DEFAULT_DEMO

    parser = add_command(subparsers, "demo",
                         "run the end-to-end demo on synthetic data and write a report", run)
    parser.add_argument("--preset", default=DEFAULT_DEMO, choices=DEMO_PRESETS,
                        help="demo: lite (default; ImageNet-pretrained EfficientNet-Lite, README "
                             "\"Demo\"), tiny (plain CNNs from scratch, the fastest), small (from scratch, "
                             "longer); micro is for tests")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help=f"redo a stage even if its output exists (repeatable): {', '.join(STAGES)}, or "
                             f"{' / '.join(FORCE_GROUPS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every training run, e.g. --set run.epochs=4 (repeatable)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="synthetic data root (default data/synth-PRESET)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="training runs folder (default runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default runs/demo, or runs/demo-PRESET for other sizes)")
    parser.add_argument("--num-workers", type=positive_int, default=2,
                        help="Ray Train workers per run (default 2)")
    parser.add_argument("--search", action="store_true",
                        help="then export the asymmetric students, index the test sets with the teacher and "
                             "query them (report in OUT/search/)")
    parser.add_argument("--wandb", choices=("offline", "off"), default="offline",
                        help="wandb mode of the training runs "
                             "(default offline: files only, nothing uploaded)")


def run(args: argparse.Namespace) -> int:
    from amldist.config import parse_set
    from amldist.demo import demo_settings, run_demo

    for text in args.overrides:
        parse_set(text)  # a malformed KEY=VALUE stops here, before any stage runs
    settings = demo_settings(args.preset, data_root=args.data_root, runs_dir=args.runs_dir,
                             report_dir=args.out, extra_overrides=tuple(args.overrides),
                             num_workers=args.num_workers, wandb=args.wandb)
    command = "amldist " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["demo"] else \
        f"amldist demo --preset {args.preset}"
    run_demo(settings, force=args.force, command=command)
    if args.search:
        from amldist.demo.search import run_search_demo

        run_search_demo(settings)
    return 0
