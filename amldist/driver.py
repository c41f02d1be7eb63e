"""The driver of a training run: start or join Ray, start the miner, run Ray Train's `TorchTrainer`.

    start_ray(local=True)
    result = run_training(config, storage="runs", name="my-run")      # starts the miner, fits, kills it

`run_training` checks the inputs (`amldist.training.paths`), computes the teacher's val features if
they are missing, starts the miner actor when the run needs one (`amldist.miner_actor`: teacher vectors,
asymmetric hard negatives, random negatives), and fits a `TorchTrainer` with one DDP process per
worker running `amldist.worker.train_loop_per_worker` on a `WorkerJob`. Ray Train restarts the worker
group after a failure (`max_failures`), except for an error a restart cannot cure: a `UserError` raised in
a worker (a corrupt sample, a NaN loss, a full disk) ends the run at once (`StopOnUserError`) and
`run_training` raises it, one line, as the driver's own `UserError`. Ray Tune runs it as a trial:
call it from a function trainable with `callbacks=[TuneReportCallback()]` and a per-trial `name`.
The run folder and the checks before a run starts are `amldist.runs`'.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from amldist.config import Config
from amldist.errors import UserError, user_message
from amldist.miner_actor import start_miner
from amldist.runs import DEFAULT_IMAGE_EVERY, DEFAULT_MAX_FAILURES, local_run_dir
from amldist.storage import is_uri, join, storage_filesystem, storage_filesystem_path
from amldist.training.family import RANDOM_NEGATIVES, TEACHER_POOL, tuple_family
from amldist.training.paths import TrainingPaths, prepare_inputs
from amldist.training.plan import busiest_rank_tuples, idle_share
from amldist.wandb_log import append_event
from amldist.worker import WorkerJob, train_loop_per_worker

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2
# Ray Train settings read from the environment by the controller and workers: no doubled prints, no
# preemption-watcher error line, reports polled every 0.5 s instead of 2 s, and 5 minutes instead of 60 s
# for a worker group to start (importing torch in each worker took most of a minute on a busy 2-core box).
QUIET_RAY_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
                 "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}


def start_ray(local: bool) -> None:
    """Start a single-node Ray in this process (`local`), else join the running cluster
    (`ray.init(address="auto")`, so `ray job submit -- amldist train ...` works unchanged); quietly."""
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    quiet = {"logging_level": logging.ERROR, "logging_config": ray.LoggingConfig(log_level="ERROR")}
    if local:
        # Ray's state API, which Ray Train's placement-group cleaner calls from a detached actor, finds the
        # cluster by scanning this machine's processes and gives up when several Ray instances run here
        # (other users, test sessions); then a trial that Tune stops leaks its workers' placement group.
        # The dashboard's address, set before Ray starts, reaches every Ray process (and stays set in this
        # one: Ray's clients here then reach this cluster too). address="local": not a cluster someone
        # started on this machine with `ray start`.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", dashboard_port=port, **quiet)
        return
    try:
        ray.init(address="auto", **quiet)
    except ConnectionError:
        raise UserError("no running Ray cluster to join; start one (`ray start --head`) "
                        "or pass --local") from None


class StopOnUserError(UserCallback):
    """Ray Train retries a failed worker group `max_failures` times, whatever the error, and Ray 2.60 has
    no public failure policy. This callback runs on the controller when a worker raised: a `UserError`
    (corrupt data, a NaN loss, a full disk: a restart would fail the same way) is raised again as a
    `ControllerError`, which the controller's failure policy never retries (it retries only a worker
    group's errors and its failures to start), so the run ends within one poll of the controller."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            error = _user_error(worker_exceptions[rank])
            if error is not None:
                raise ControllerError(UserError(error))


def _user_error(error: Exception) -> str | None:
    """The one-line message of a UserError a worker raised, else None. Ray Train hands the callback the
    worker's exception wrapped with its traceback (`UserExceptionWithTraceback._base_exc` in Ray 2.60;
    tests/test_faults.py fails should that change)."""
    base = getattr(error, "_base_exc", error)
    return user_message(base) if isinstance(base, UserError) else None


def run_training(config: Config, *, storage: str, name: str, callbacks: list | None = None,
                 wandb: str = "off", resume_from: str | None = None,
                 max_failures: int = DEFAULT_MAX_FAILURES, image_every: int = DEFAULT_IMAGE_EVERY,
                 pause_at_epoch: int | None = None, cpus_per_worker: float | None = None):
    """Train one run (a finalized `Config`) on the connected Ray cluster; returns the `ray.train.Result`.

    storage: local folder or URI (RunConfig.storage_path); the run lives in `<storage>/<name>`, and a
    re-run with the same storage and name continues it. wandb: off, offline or online (see wandb_log).
    resume_from: a checkpoint file to start from when the run has none of its own. max_failures: worker
    group restarts after a failure that is not a UserError. pause_at_epoch: a test hook
    (`amldist.worker._pause_for_a_kill`). cpus_per_worker: the CPUs Ray reserves for each worker (default
    1); a search gives its trials fractions so that several fit beside each other. Raises UserError for
    bad inputs and for a worker's UserError.
    """
    if not ray.is_initialized():
        raise RuntimeError("run_training needs a running Ray (ray.init) first")
    paths, train_labels = prepare_inputs(config,
                                         num_feature_workers=0 if _single_node() else config.run.num_workers)
    _warn_uneven_batch(config.run.batch_size, config.run.num_workers)
    run_dir = local_run_dir(config.run.out_dir, storage, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    miner_name = f"amldist-miner-{uuid.uuid4().hex[:12]}" if needs_miner(config, paths) else None
    miner = None
    if miner_name is not None:
        miner = start_miner(train_labels.clusters, paths.train_store, paths.val_store, name=miner_name,
                            pool_size=config.mining.pool_size, state_dir=str(run_dir / "miner"),
                            backend=config.mining.backend, **_miner_gpu(config))
    try:
        if miner is not None:
            _wait_for_miner(miner)  # surface a miner that cannot start before the workers wait on it
        job = WorkerJob(config=config, paths=paths, miner=miner_name, run_dir=str(run_dir), wandb=wandb,
                        resume_from=resume_from, image_every=image_every,
                        checkpoint_root=join(storage if is_uri(storage) else storage_filesystem_path(storage),
                                             name),
                        pause_at_epoch=pause_at_epoch)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=job.to_loop_config(),
            scaling_config=ScalingConfig(num_workers=config.run.num_workers, use_gpu=config.run.use_gpu,
                                         resources_per_worker=_worker_resources(config, cpus_per_worker)),
            run_config=RunConfig(name=name, callbacks=[*(callbacks or []), StopOnUserError()],
                                 storage_path=storage_filesystem_path(storage),
                                 storage_filesystem=storage_filesystem(storage),  # endpoint settings of a URI
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                                 logging_config=ray.train.LoggingConfig(log_level="WARNING")))
        started = time.perf_counter()
        try:
            result = trainer.fit()
        except ControllerError as err:
            if not isinstance(err.controller_failure, UserError):
                raise
            append_event(run_dir, "stopped", error=str(err.controller_failure))
            raise UserError(str(err.controller_failure)) from None
        append_event(run_dir, "finished", epochs_done=(result.return_value or {}).get("epochs_done"))
        log.info("training %s finished in %.1f s", name, time.perf_counter() - started)
        return result
    finally:
        if miner is not None:
            ray.kill(miner)


def _wait_for_miner(miner) -> None:
    """The miner's first answer. It checks its inputs when it starts (the driver checked them before, so
    this fails only when the miner's node sees other files); its UserError comes back as Ray's text."""
    try:
        ray.get(miner.stats.remote())
    except ray.exceptions.RayActorError as err:
        last = (str(err).strip().splitlines() or [""])[-1]
        if last.startswith("amldist.") and ": " in last:
            raise UserError(f"the miner could not start: {last.partition(': ')[2]}") from None
        raise


def needs_miner(config: Config, paths: TrainingPaths) -> bool:
    """The miner serves teacher vectors, asymmetric hard negatives and random negatives; a run with no
    teacher that mines its own (symmetric) hard negatives, or none, needs no miner."""
    return paths.train_store is not None or tuple_family(config).negatives in (RANDOM_NEGATIVES, TEACHER_POOL)


def _warn_uneven_batch(batch_size: int, num_workers: int) -> None:
    idle = idle_share(batch_size, num_workers)
    if idle > 0:
        log.warning("run.batch_size %d does not split evenly over %d workers: every step waits for the ranks "
                    "with %d tuples, about %.0f%% of the workers' time idle; "
                    "a multiple of %d keeps them all busy",
                    batch_size, num_workers, busiest_rank_tuples(batch_size, num_workers),
                    100 * idle, num_workers)


def _worker_resources(config: Config, cpus: float | None) -> dict[str, float] | None:
    if cpus is None:
        return None  # Ray's default: 1 CPU, or 1 GPU with use_gpu
    return {"CPU": cpus, **({"GPU": 1} if config.run.use_gpu else {})}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_node() -> bool:
    return len([node for node in ray.nodes() if node.get("Alive")]) <= 1


def _miner_gpu(config: Config) -> dict[str, Any]:
    """Leave the GPUs to the trainers when they need all of them (e.g. one GPU, one worker)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= 1 and config.run.use_gpu and gpus < config.run.num_workers + 1:
        return {"num_gpus": 0}
    return {}
