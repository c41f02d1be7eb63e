"""`amldist tune`: a hyper-parameter search with Ray Tune, each trial a full Ray Train run.

    amldist tune --config presets/tiny-student-contrplus-asym.yaml --local \\
        --search 'optim.lr=loguniform(1e-4,1e-2)' --search 'loss.margin=uniform(0.6,1.0)' --num-samples 4
    amldist tune --config presets/tiny-student-contrplus-asym.yaml --local --resume      # after Ctrl-C

Everything the search is (preset, --set, --search, scheduler, metric) is checked before Ray starts; a
mistake is one line and exit code 2. Without --search, the loss's default space (docs/TUNING.md). The
table of trials is printed and written with the best preset and a figure into `<storage>/<name>/`.
"""

from __future__ import annotations

import argparse
import sys

from amldist.cli.common import add_command, positive_int
from amldist.cli.train import add_ray_arguments
from amldist.config import add_config_arguments, preset_sections, raw_config_from_args
from amldist.errors import INTERRUPTED_EXIT, require
from amldist.runs import check_storage
from amldist.tuning.plan import METRICS, SCHEDULERS, SearchSettings, plan_search
from amldist.wandb_log import MODES as WANDB_MODES


def register(subparsers) -> None:
    parser = add_command(subparsers, "tune", "search hyper-parameters with Ray Tune (each trial a Ray Train "
                         "run)", run)
    parser.add_argument("--config", dest="preset", metavar="NAME|FILE",
                        help="preset name or YAML file (= --preset); its `tune:` section may hold a search")
    add_config_arguments(parser)
    search = parser.add_argument_group("search")
    search.add_argument("--search", action="append", default=[], metavar="KEY=FUNCTION(ARGS)",
                        help="a searched config key, e.g. 'optim.lr=loguniform(1e-5,1e-2)' (repeatable); "
                             "functions: uniform, loguniform, quniform, qloguniform, randint, lograndint, "
                             "choice, grid")
    search.add_argument("--num-samples", type=positive_int, default=None,
                        help="trials to draw (each grid point that often; default 8)")
    search.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                        help="asha stops trials behind the others early (default); fifo runs every trial out")
    search.add_argument("--grace-period", type=positive_int, default=None,
                        help="ASHA: epochs before a trial can be stopped (default a fifth of the epochs)")
    search.add_argument("--reduction-factor", type=positive_int, default=None,
                        help="ASHA: 1 in this many trials goes on at each rung (default 2)")
    search.add_argument("--metric", choices=METRICS, default=None,
                        help="what picks the best trial (default: what each run picks its best model by)")
    search.add_argument("--max-concurrent", type=positive_int, default=None,
                        help="trials at once (default: as many as the cluster holds at a CPU or GPU per "
                             "worker)")
    ray_group = add_ray_arguments(parser, " per trial")
    ray_group.add_argument("--storage", default=None, help="storage folder or URI (default run.out_dir)")
    ray_group.add_argument("--name", default=None, help="search name (default tune-<run.name>)")
    ray_group.add_argument("--resume", action="store_true",
                           help="continue the interrupted search of this name")
    parser.add_argument("--wandb", choices=WANDB_MODES, default=None,
                        help="one wandb run per trial, grouped by search (default: auto if run.wandb, "
                             "else off)")


def plan_of(args: argparse.Namespace):
    """The checked search plan of the command line, or None for a bare `--resume --name NAME`."""
    if args.preset is None:
        return None
    _, section = preset_sections(args.preset)
    extra = {"run.num_workers": args.num_workers, "run.use_gpu": args.use_gpu}
    base = raw_config_from_args(args, {key: value for key, value in extra.items() if value is not None})
    settings = SearchSettings(num_samples=args.num_samples, scheduler=args.scheduler, metric=args.metric,
                              max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                              reduction_factor=args.reduction_factor)
    return plan_search(base, searches=args.search, section=section, settings=settings, source=args.preset)


def run(args: argparse.Namespace) -> int:
    from amldist.training.paths import resolve_paths
    from amldist.wandb_log import resolve_mode

    plan = plan_of(args)
    storage = args.storage or (plan.base_config().run.out_dir if plan else "runs")
    name = args.name or (f"tune-{plan.base_config().run.name}" if plan else None)
    require(name is not None, "--config: give a preset name or YAML file (or --resume --name NAME)")
    check_storage(storage)
    from amldist import tune_search

    wandb = resolve_mode(args.wandb, plan.base_config().run.wandb if plan else False)
    plan, wandb = tune_search.check_search_folder(plan, storage, name, args.resume, wandb)
    resolve_paths(plan.base_config())  # missing data, shards or teacher features: say so before Ray starts
    from amldist import driver
    from amldist.tuning.results import format_table

    driver.start_ray(args.local)
    import ray

    try:
        outcome = tune_search.run_search(plan, storage=storage, name=name, wandb=wandb, resume=args.resume,
                                         max_failures=args.max_failures)
    finally:
        ray.shutdown()
    print(format_table(outcome.results))
    for key, path in outcome.files.items():
        print(f"{key}: {path}")
    report_failures(outcome.results)
    if outcome.results.interrupted:
        sys.stderr.write(f"amldist: search interrupted; the same command with --resume runs its unfinished "
                         f"trials ({outcome.folder})\n")
        return INTERRUPTED_EXIT
    return 0


def report_failures(results) -> None:
    """Trials that failed: one line naming their error files; every trial failed: a UserError."""
    from pathlib import Path

    from amldist.tuning.results import FAILED

    failed = [trial for trial in results.trials if trial.status == FAILED]
    if not failed:
        return
    errors = ", ".join(str(Path(trial.folder) / "error.txt") for trial in failed[:3])
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    require(len(failed) < len(results.trials), f"every trial failed; see {errors}{more}")
    sys.stderr.write(f"amldist: {len(failed)} of {len(results.trials)} trials failed; see {errors}{more}\n")
