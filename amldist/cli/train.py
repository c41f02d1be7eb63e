"""`amldist train`: train a student (or a teacher) with Ray Train, locally or on a Ray cluster.

    amldist train --config presets/tiny-student-contrplus-asym.yaml --local --num-workers 2
    amldist train --config mnv2-vgg16-contrplus-asym --use-gpu --num-workers 8 --storage s3://bucket/runs
    amldist train --config presets/tiny-student-contrplus-asym.yaml --local --resume          # continue it

`--local` starts a single-node Ray in this process (all CPUs, the GPUs it sees); without it the command
joins the running cluster (`ray.init(address="auto")`), so `ray job submit -- amldist train ...` works
unchanged. Config precedence: preset < aml flags < --set < the flags of this command. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from amldist.cli.common import add_command, non_negative_int, positive_int, require
from amldist.config import add_config_arguments, config_from_args, with_overrides
from amldist.errors import INTERRUPTED_EXIT, UserError

log = logging.getLogger(__name__)

# Ray Train settings read from the environment by the controller and workers: no doubled prints, no
# preemption-watcher error line, reports polled every 0.5 s instead of 2 s, and 5 minutes instead of 60 s
# for a worker group to start (importing torch in each worker took most of a minute on a busy 2-core box).
QUIET_RAY_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
                 "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}


def register(subparsers) -> None:
    parser = add_command(subparsers, "train", "train a network with Ray Train (local or on a cluster)", run)
    parser.add_argument("--config", dest="preset", metavar="NAME|FILE", help="preset name or YAML file (= --preset)")
    add_config_arguments(parser)
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--local", action="store_true", help="start a single-node Ray here instead of joining a cluster")
    ray_group.add_argument("--num-workers", type=positive_int, default=None, help="training processes (run.num_workers)")
    ray_group.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker (run.use_gpu)")
    ray_group.add_argument("--storage", default=None, help="run storage folder or URI (default run.out_dir)")
    ray_group.add_argument("--name", default=None, help="run name (run.name; default the preset's name)")
    ray_group.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                           help="continue the run of this name, or start from checkpoint PATH")
    ray_group.add_argument("--max-failures", type=restarts, default=2,
                           help="worker-group restarts after a failure (-1: no limit)")
    log_group = parser.add_argument_group("logging")
    log_group.add_argument("--wandb", choices=("off", "offline", "online", "auto"), default=None,
                           help="Weights & Biases mode (default: auto if run.wandb, else off; auto = online "
                                "with WANDB_API_KEY, else offline)")
    log_group.add_argument("--image-every", type=non_negative_int, default=5,
                           help="epochs between records of a few anchors' mined negatives "
                                "(negatives.jsonl, wandb grid; 0: none)")


def restarts(text: str) -> int:
    """argparse type of --max-failures: a count, or -1 for Ray's "restart without limit"."""
    return -1 if text.strip() == "-1" else non_negative_int(text)


def config_of(args: argparse.Namespace):
    require(args.preset is not None, "--config: give a preset name or YAML file (see presets/README.md)")
    config = config_from_args(args)
    overrides = {"run.num_workers": args.num_workers, "run.use_gpu": args.use_gpu, "run.name": args.name}
    return with_overrides(config, {key: value for key, value in overrides.items() if value is not None})


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
    start_ray(args.local)
    import ray
    from ray.train.v2.api.exceptions import RayTrainError

    from amldist.worker import local_run_dir, run_training

    try:
        result = run_training(config, storage=storage, name=name, wandb=wandb_mode, resume_from=resume_from,
                              max_failures=args.max_failures, image_every=args.image_every)
    except (ray.exceptions.RayError, RayTrainError) as err:  # TrainingFailedError is a RayTrainError
        # a worker's or the miner's error, or Ray Train refusing the run folder: the first cause, one line
        # (Ray has already logged the remote tracebacks)
        raise UserError(f"training failed: {_first_cause(err)}") from None
    except SystemExit:
        # Ray Train's own Ctrl-C handler aborts the run; the driver's wait for it then ends in SystemExit
        sys.stderr.write(f"amldist: {interrupted_message(storage, name, local_run_dir(config, storage, name))}\n")
        return INTERRUPTED_EXIT
    finally:
        ray.shutdown()
    print_summary(result, local_run_dir(config, storage, name), wandb_mode)
    return 0


def interrupted_message(storage: str, name: str, run_dir: Path) -> str:
    """What a stopped run left behind and how to go on from it."""
    if "://" in str(storage):
        return (f"training interrupted; its checkpoints are under {str(storage).rstrip('/')}/{name}: "
                f"the same command with --resume continues it")
    if not checkpoint_dirs(run_dir):
        return (f"training interrupted before its first checkpoint, so there is nothing to resume: "
                f"remove {run_dir} or pass --name to start again")
    return f"training interrupted; its checkpoints are in {run_dir}: the same command with --resume continues it"


def _first_cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    errors = [line for line in text if "Error" in line and ":" in line]
    return (errors[-1] if errors else (text[-1] if text else type(err).__name__))[:300]


def start_ray(local: bool) -> None:
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    quiet = {"logging_level": logging.ERROR, "logging_config": ray.LoggingConfig(log_level="ERROR")}
    if local:
        ray.init(**quiet)
        return
    try:
        ray.init(address="auto", **quiet)
    except ConnectionError:
        raise UserError("no running Ray cluster to join; start one (`ray start --head`) or pass --local") from None


def check_storage(storage: str) -> None:
    """A storage URI must name a filesystem Ray Train can open (it resolves it with pyarrow, as here):
    one line now instead of a pyarrow traceback after Ray has started. Local folders are left to Ray."""
    if "://" not in str(storage):
        return
    import pyarrow
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(str(storage))
    except (pyarrow.ArrowException, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--storage {storage}: not a storage Ray Train can open ({reason})") from None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Ray Train checkpoint folders of a run that hold our checkpoint file, oldest first."""
    from amldist.training.state import CHECKPOINT_FILE

    found = [d for d in run_dir.glob("checkpoint_*") if (d / CHECKPOINT_FILE).is_file()]
    return sorted(found, key=lambda d: (d / CHECKPOINT_FILE).stat().st_mtime)


def check_resume(storage: str, name: str, resume: str | None, epochs: int) -> str | None:
    """Refuse to silently continue (or clobber) a run; returns the explicit checkpoint file to start from."""
    from amldist.training.state import checkpoint_file, load_epochs_done

    if "://" in str(storage):  # Ray checks a remote run itself
        return None if not resume else str(checkpoint_file(resume).resolve())
    run_dir = Path(storage).expanduser() / name
    existing = checkpoint_dirs(run_dir)
    if resume is None:
        require(not existing, f"{run_dir} already holds checkpoints of a run named {name!r}; pass --resume to "
                              "continue it, or --name to start a new run")
        leftovers = sorted(entry.name for entry in run_dir.iterdir()) if run_dir.is_dir() else []
        require(not leftovers, f"{run_dir} already holds files of a run named {name!r} but no checkpoint to "
                               f"resume ({', '.join(leftovers[:4])}{', ...' if len(leftovers) > 4 else ''}); "
                               "pass --name to start a new run, or move that folder away")
        return None
    if resume == "":
        require(bool(existing), f"nothing to resume: no checkpoints in {run_dir}")
        last = existing[-1]
    else:
        require(not existing, f"{run_dir} already holds checkpoints; pass --resume without a path to continue "
                              f"that run, or --name to start a new run from {resume}")
        last = checkpoint_file(resume)
    done = load_epochs_done(checkpoint_file(last))
    require(done < epochs, f"the checkpoint {last} has finished {done} epochs and --epochs asks for {epochs}; "
                           f"pass --epochs above {done} to train longer")
    return None if resume == "" else str(Path(last).resolve())  # the workers run in other folders


def print_summary(result, run_dir: Path, wandb_mode: str) -> None:
    from amldist.training.state import BEST_FILE

    value = result.return_value or {}
    print(f"run folder: {run_dir}")
    if value.get("best_score") is not None:
        print(f"best {value['best_metric']}: {value['best_score']:.2f} at epoch {value['best_epoch']} "
              f"-> {run_dir / BEST_FILE}")
    if result.checkpoint is not None:
        print(f"last checkpoint: {result.checkpoint.path}")
    print(f"metrics per epoch: {run_dir / 'metrics.jsonl'}")
    if wandb_mode == "offline":
        print(f"wandb (offline): upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
