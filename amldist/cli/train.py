"""`amldist train`: train a student (or a teacher) with Ray Train, locally or on a Ray cluster.

    amldist train --config presets/tiny-student-contrplus-asym.yaml --local --num-workers 2
    amldist train --config mnv2-vgg16-contrplus-asym --use-gpu --num-workers 8 --storage s3://bucket/runs
    amldist train --config presets/tiny-student-contrplus-asym.yaml --local --resume          # continue it

`--local` starts a single-node Ray in this process (all CPUs, the GPUs it sees); without it the command
joins the running cluster (`ray.init(address="auto")`), so `ray job submit -- amldist train ...` works
unchanged. Config precedence: preset < aml flags < --set < the flags of this command. See docs/TRAINING.md.
SIGTERM (a scheduler, `ray job stop`) stops a run as Ctrl-C does (docs/RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from amldist.cli.common import add_command, non_negative_int, positive_int
from amldist.config import add_config_arguments, config_from_args
from amldist.errors import INTERRUPTED_EXIT, UserError, require
from amldist.runs import (
    DEFAULT_IMAGE_EVERY,
    DEFAULT_MAX_FAILURES,
    check_resume,
    check_storage,
    interrupted_message,
    local_run_dir,
)
from amldist.wandb_log import MODES as WANDB_MODES

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = add_command(subparsers, "train", "train a network with Ray Train (local or on a cluster)", run)
    parser.add_argument("--config", dest="preset", metavar="NAME|FILE",
                        help="preset name or YAML file (= --preset)")
    add_config_arguments(parser)
    ray_group = add_ray_arguments(parser, "")
    ray_group.add_argument("--storage", default=None, help="run storage folder or URI (default run.out_dir)")
    ray_group.add_argument("--name", default=None, help="run name (run.name; default the preset's name)")
    ray_group.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                           help="continue the run of this name, or start from checkpoint PATH")
    log_group = parser.add_argument_group("logging")
    log_group.add_argument("--wandb", choices=WANDB_MODES, default=None,
                           help="Weights & Biases mode (default: auto if run.wandb, else off; auto = online "
                                "with WANDB_API_KEY, else offline)")
    log_group.add_argument("--image-every", type=non_negative_int, default=DEFAULT_IMAGE_EVERY,
                           help="epochs between records of a few anchors' mined negatives "
                                "(negatives.jsonl, wandb grid; 0: none)")


def add_ray_arguments(parser: argparse.ArgumentParser, per: str) -> argparse._ArgumentGroup:
    """The "Ray" flags every training command shares (`per`: " per trial" for a search); returns the
    group for the command's own."""
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--local", action="store_true",
                           help="start a single-node Ray here instead of joining a cluster")
    ray_group.add_argument("--num-workers", type=positive_int, default=None,
                           help=f"training processes{per} (run.num_workers)")
    ray_group.add_argument("--use-gpu", action="store_true", default=None,
                           help="one GPU per worker (run.use_gpu)")
    ray_group.add_argument("--max-failures", type=restarts, default=DEFAULT_MAX_FAILURES,
                           help=f"worker-group restarts{per} after a failure (-1: no limit)")
    return ray_group


def restarts(text: str) -> int:
    """argparse type of --max-failures: a count, or -1 for Ray's "restart without limit"."""
    return -1 if text.strip() == "-1" else non_negative_int(text)


def config_of(args: argparse.Namespace):
    """The finalized Config of the command line: preset < aml flags < --set < this command's flags."""
    require(args.preset is not None, "--config: give a preset name or YAML file (see presets/README.md)")
    overrides = {"run.num_workers": args.num_workers, "run.use_gpu": args.use_gpu, "run.name": args.name}
    return config_from_args(args, {key: value for key, value in overrides.items() if value is not None})


def run(args: argparse.Namespace) -> int:
    from amldist.training.paths import resolve_paths
    from amldist.wandb_log import resolve_mode

    config = config_of(args)
    storage = args.storage or config.run.out_dir
    name = config.run.name
    check_storage(storage)
    resume_from = check_resume(storage, name, args.resume, config.run.epochs)
    wandb_mode = resolve_mode(args.wandb, config.run.wandb)
    resolve_paths(config)  # missing data, shards or teacher features: say so before starting Ray
    from amldist import driver

    driver.start_ray(args.local)
    import ray
    from ray.train.v2.api.exceptions import RayTrainError

    run_dir = local_run_dir(config.run.out_dir, storage, name)
    with sigterm_as_ctrl_c() as received:
        try:
            result = driver.run_training(config, storage=storage, name=name, wandb=wandb_mode,
                                         resume_from=resume_from, max_failures=args.max_failures,
                                         image_every=args.image_every)
        except (ray.exceptions.RayError, RayTrainError) as err:  # TrainingFailedError is a RayTrainError
            # a worker's or the miner's error, or Ray Train refusing the run folder: the first cause, one
            # line (Ray has already logged the remote tracebacks)
            raise UserError(f"training failed: {_first_cause(err)}") from None
        except (SystemExit, KeyboardInterrupt):
            # Ray Train's own Ctrl-C handler aborts the run; the driver's wait for it then ends in SystemExit
            # (KeyboardInterrupt: stopped before the trainer started)
            sys.stderr.write(f"amldist: {interrupted_message(storage, name, run_dir)}\n")
            return 128 + received[-1] if received else INTERRUPTED_EXIT
        finally:
            ray.shutdown()
    print_summary(result, run_dir, wandb_mode)
    return 0


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """While training, SIGTERM (a scheduler, `ray job stop`, `kill`) stops the run as Ctrl-C does: Ray
    Train's SIGINT handler, installed by `fit`, aborts the workers, and the driver then stops the miner
    and Ray. Without it Python would die at once and leave the local Ray's processes behind. Yields the
    list of the signals received, for the exit code (128 + signal, as a shell reports it)."""
    received: list[int] = []

    def on_sigterm(signum, frame):
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _first_cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    errors = [line for line in text if "Error" in line and ":" in line]
    return (errors[-1] if errors else (text[-1] if text else type(err).__name__))[:300]


def print_summary(result, run_dir: Path, wandb_mode: str) -> None:
    from amldist.training.state import BEST_FILE

    value = result.return_value or {}
    print(f"run folder: {run_dir}")
    if value.get("skipped_checkpoints"):
        print(f"note: unreadable checkpoints skipped: {'; '.join(value['skipped_checkpoints'])}; "
              f"the run went on from {value['resumed_from']}")
    if value.get("best_score") is not None:  # epochs count from 1 in what users read, from 0 in metrics
        print(f"best {value['best_metric']}: {value['best_score']:.2f} at epoch {value['best_epoch'] + 1} "
              f"-> {run_dir / BEST_FILE}")
    if result.checkpoint is not None:
        print(f"last checkpoint: {result.checkpoint.path}")
    print(f"metrics per epoch: {run_dir / 'metrics.jsonl'}")
    if wandb_mode == "offline":
        print(f"wandb (offline): upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
