"""The Ray Train loop per worker: one DDP process of a training run (`amldist.driver` starts them).

Each worker composes `amldist.training.epoch.Trainer` from the `WorkerJob` the driver hands it; per epoch
it mines, trains, validates; rank 0 keeps the best model (`model_best.pth.tar` in the run folder), writes
metrics.jsonl and wandb, and every rank calls `ray.train.report` once (rank 0 with the checkpoint on
checkpoint epochs). After a failure (FailureConfig) or a re-run with the same name and storage,
`ray.train.get_checkpoint()` gives the last checkpoint and training continues at the next epoch with the
same optimiser and schedule; a last checkpoint that does not load is skipped for the one before it, and
the run says so.

Errors a restart cannot cure (a `UserError`: a corrupt shard sample, a NaN loss, a full disk while
writing a checkpoint) are raised as `UserError`s naming what to do; the driver's `StopOnUserError`
then ends the run without Ray Train's retries (docs/RELIABILITY.md).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train import Checkpoint

from amldist import node_cache
from amldist.atomic import disk_full_is_fatal
from amldist.checkpoints import save_checkpoint
from amldist.config import Config, config_to_dict
from amldist.errors import UserError, user_message
from amldist.miner_actor import MinerClient
from amldist.training.epoch import NonFiniteLoss, Trainer
from amldist.training.grid import negatives_grid
from amldist.training.negatives_log import append_negatives
from amldist.training.paths import TrainingPaths
from amldist.training.remote_paths import WORKER_INPUTS
from amldist.training.state import BEST_FILE, CHECKPOINT_FILE, Progress, save_training_state
from amldist.training.validation import higher_is_better, selection_metric
from amldist.wandb_log import RunLog, append_event

log = logging.getLogger(__name__)

JOB_KEY = "job"  # Ray Train hands `train_loop_config` over as a dict; the job is its one entry


@dataclass(frozen=True)
class WorkerJob:
    """What the driver hands every worker of a run."""

    config: Config                 # finalized once, by the driver's caller
    paths: TrainingPaths           # the run's inputs, absolute
    miner: str | None              # the miner actor's name; None when the run needs no miner
    run_dir: str                   # rank 0's folder: model_best, metrics.jsonl, negatives.jsonl, wandb
    wandb: str                     # off, offline or online
    resume_from: str | None        # a checkpoint file to start from when the run has none of its own
    image_every: int               # epochs between records of the probe anchors' negatives (0: none)
    checkpoint_root: str = ""      # where Ray Train keeps the checkpoints (`<storage>/<name>`), for messages
    pause_at_epoch: int | None = None  # test hook: see `_pause_for_a_kill`

    def to_loop_config(self) -> dict[str, Any]:
        return {JOB_KEY: self}


@dataclass
class Checkpoints:
    """The checkpoints this worker knows of: where it resumed from, the ones it skipped as unreadable,
    and the last good one (for the messages of a stopped run)."""

    resumed_from: str | None = None
    skipped: list[str] = field(default_factory=list)   # "PATH (reason)"
    last_good: str | None = None
    taken_names: set[str] = field(default_factory=set)  # folder names of skipped checkpoints

    def describe_last(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.last_good}"

    def advice(self) -> str:
        """What to do after a full disk."""
        return f"{self.describe_last()}: free space, then continue with --resume"


# Ray Train logs every exception of the train function with its traceback; for a UserError the driver's
# one line says all there is to say (Ray 2.60 logs it from this module).
RAY_TRAIN_ERROR_LOGGER = "ray.train.v2._internal.util"


class _DropUserErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _USER_ERROR_LINE.search(record.getMessage())


_USER_ERROR_LINE = re.compile(r"\namldist\.errors\.UserError: [^\n]*\s*$")  # as train_loop_per_worker raises


def _quiet_worker_logs() -> None:
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train's per-report INFO lines go to the root logger
    ray_errors = logging.getLogger(RAY_TRAIN_ERROR_LOGGER)
    if not any(isinstance(f, _DropUserErrorTracebacks) for f in ray_errors.filters):
        ray_errors.addFilter(_DropUserErrorTracebacks())
    ours = logging.getLogger("amldist")
    ours.setLevel(logging.INFO)
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
        ours.propagate = False
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


# ---------------------------------------------------------------- the worker loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One DDP process of the run described by `loop_config[JOB_KEY]`, a `WorkerJob`."""
    _quiet_worker_logs()
    try:
        return _train(loop_config[JOB_KEY])
    except UserError as err:  # one plain line for the driver, also when a DataLoader process raised it
        raise UserError(user_message(err)) from None


def _train(job: WorkerJob) -> dict[str, Any]:
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    miner = MinerClient.connect(job.miner) if job.miner else None
    paths = node_cache.localize(job.paths, WORKER_INPUTS)  # inputs at URIs: this node's checked copies
    trainer = Trainer(job.config, paths, miner, device=ray.train.torch.get_device(),
                      wrap=ray.train.torch.prepare_model, rank=rank, world_size=world_size)
    progress, checkpoints = _restore(trainer, job, rank)
    pause = job.pause_at_epoch
    if pause is not None and progress.epochs_done < pause and rank == world_size - 1:
        trainer.after_step = lambda epoch, step: _pause_for_a_kill(job, epoch, step)
    run_log = _open_run_log(job, progress) if rank == 0 else None
    if rank == 0:
        append_event(job.run_dir, "start", epochs_done=progress.epochs_done, workers=world_size,
                     resumed_from=checkpoints.resumed_from, skipped_checkpoints=checkpoints.skipped)
    try:
        for epoch in range(progress.epochs_done, job.config.run.epochs):
            _run_epoch(trainer, progress, epoch, job, run_log, checkpoints)
    finally:
        if run_log is not None:
            run_log.finish()
    return {"epochs_done": progress.epochs_done, "best_score": progress.best_score,
            "best_epoch": progress.best_epoch, "best_metric": progress.best_metric,
            "resumed_from": checkpoints.resumed_from, "skipped_checkpoints": checkpoints.skipped}


def _pause_for_a_kill(job: WorkerJob, epoch: int, step: int) -> None:
    """Test hook: after the first step of epoch `job.pause_at_epoch`, write this process's pid to
    `<run_dir>/pause-epoch<E>.pid` and wait there, mid-epoch, for the test to kill it or the driver. Not
    after a restart at that epoch (`_train` sets it only when the attempt starts before it)."""
    if epoch != job.pause_at_epoch or step != 0:
        return
    marker = Path(job.run_dir) / f"pause-epoch{epoch}.pid"
    if marker.exists():  # paused once already: a second pause would wait for a kill that never comes
        return
    marker.write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.1)
    raise RuntimeError(f"nobody killed the paused worker within 600 s ({marker})")


def _restore(trainer: Trainer, job: WorkerJob, rank: int) -> tuple[Progress, Checkpoints]:
    """This run's own last checkpoint (after a failure, or re-run with the same name), else an explicit
    --resume file, else a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        return _restore_newest_readable(trainer, checkpoint, rank)
    if job.resume_from:
        checkpoints = Checkpoints(resumed_from=job.resume_from, last_good=job.resume_from)
        return trainer.restore(job.resume_from), checkpoints
    return Progress(best_metric=_best_metric(trainer)), Checkpoints()


def _restore_newest_readable(trainer: Trainer, latest: Checkpoint, rank: int) -> tuple[Progress, Checkpoints]:
    """The run's newest checkpoint that loads: Ray Train's last one, or a newer one that a worker wrote
    but Ray Train had not registered when the worker group died (Ray polls the workers' reports; a kill
    right after a report loses it), or when neither loads (truncated, damaged), the newest older one.
    Every rank makes the same choice from the same files."""
    checkpoints = Checkpoints()
    newer, older = _other_checkpoints(latest)
    for candidate in [*newer, latest, *older]:
        try:
            with candidate.as_directory() as folder:
                progress = trainer.restore(Path(folder) / CHECKPOINT_FILE)
        except (UserError, OSError) as err:
            checkpoints.skipped.append(f"{candidate.path} ({user_message(err)})")
            checkpoints.taken_names.add(_folder_name(candidate.path))
            continue
        checkpoints.resumed_from = checkpoints.last_good = candidate.path
        if checkpoints.skipped and rank == 0:
            log.warning("skipped unreadable checkpoints: %s; resumed from %s after %d epochs",
                        "; ".join(checkpoints.skipped), candidate.path, progress.epochs_done)
        return progress, checkpoints
    raise UserError(f"no readable checkpoint in {_parent(latest.path)}: {'; '.join(checkpoints.skipped)}")


CHECKPOINT_DIR = re.compile(r"checkpoint_epoch(\d+)(-\w+)?")


def _checkpoint_dir_name(epochs_done: int, taken: set[str]) -> str:
    """`checkpoint_epochNNNN`, or `...-rK` when a skipped unreadable checkpoint holds that name: Ray Train
    still lists it and deletes it by its path once it falls out of the kept ones. The same on every rank."""
    name = f"checkpoint_epoch{epochs_done:04d}"
    again = 1
    while name in taken:
        name, again = f"checkpoint_epoch{epochs_done:04d}-r{again}", again + 1
    return name


def _other_checkpoints(latest: Checkpoint) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """The run's other checkpoint folders (on any storage Ray uses), newest first: those of later epochs
    than `latest`, and the older ones."""
    import pyarrow.fs

    parent, name = _parent(latest.path), _folder_name(latest.path)
    latest_match = CHECKPOINT_DIR.fullmatch(name)
    if latest_match is None:
        return [], []
    infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    newer, older = [], []
    for info in infos:
        match = CHECKPOINT_DIR.fullmatch(info.base_name)
        if info.type == pyarrow.fs.FileType.Directory and match and info.base_name != name:
            side = newer if int(match[1]) > int(latest_match[1]) else older
            side.append((int(match[1]), info.mtime_ns or 0, info.path))

    def as_checkpoints(found):
        return [Checkpoint(path, filesystem=latest.filesystem) for *_, path in sorted(found, reverse=True)]
    return as_checkpoints(newer), as_checkpoints(older)


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _folder_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _best_metric(trainer: Trainer) -> str:
    return selection_metric(trainer.config, has_teacher_store=trainer.paths.val_store is not None)


def _open_run_log(job: WorkerJob, progress: Progress) -> RunLog:
    return RunLog(job.run_dir, mode=job.wandb, project=job.config.run.wandb_project,
                  name=Path(job.run_dir).name, config=config_to_dict(job.config),
                  start_epoch=progress.epochs_done)


def _run_epoch(trainer: Trainer, progress: Progress, epoch: int, job: WorkerJob, run_log: RunLog | None,
               checkpoints: Checkpoints) -> None:
    config = trainer.config
    every = job.image_every
    wants_probes = run_log is not None and every > 0 and epoch % every == 0
    try:
        outcome = trainer.run_epoch(epoch, progress, with_probes=wants_probes)
    except NonFiniteLoss as err:
        raise UserError(f"training stopped: {err}; nothing of epoch {epoch} was saved and "
                        f"{checkpoints.describe_last()}") from None
    progress.epochs_done = epoch + 1
    metrics = {"epoch": epoch, **outcome.metrics, "global_step": progress.global_step}
    if run_log is not None:
        with disk_full_is_fatal(f"the best model in {job.run_dir}", checkpoints.advice()):
            _track_best(trainer, progress, metrics, Path(job.run_dir))
        metrics["best_score"] = progress.best_score
        run_log.log_epoch(epoch, metrics)
        if outcome.probes is not None:
            append_negatives(job.run_dir, epoch, outcome.probes, outcome.probe_negatives)  # Fig. 2 data
            if run_log.run is not None:
                run_log.log_image(epoch, "hard_negatives",
                                  _grid(trainer, outcome.probes, outcome.probe_negatives),
                                  caption=f"epoch {epoch}: anchors (green) and their mined negatives (red)")
        log.info("epoch %d/%d: %s", epoch + 1, config.run.epochs, _summary(metrics))
    last = epoch == config.run.epochs - 1
    due = last or (config.run.save_freq and (epoch + 1) % config.run.save_freq == 0)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        name = _checkpoint_dir_name(epoch + 1, checkpoints.taken_names)
        if trainer.rank == 0 and due:
            with disk_full_is_fatal(f"the checkpoint of epoch {epoch}", checkpoints.advice()):
                save_training_state(Path(folder) / CHECKPOINT_FILE, trainer.net, trainer.optimizer,
                                    trainer.scheduler, config_to_dict(config), progress, metrics)
            checkpoint = Checkpoint.from_directory(folder)
        # Every rank reports once per epoch (a barrier); only rank 0 attaches the checkpoint.
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        if due:
            checkpoints.last_good = f"{job.checkpoint_root}/{name}"


def _track_best(trainer: Trainer, progress: Progress, metrics: dict, run_dir: Path) -> None:
    """Rank 0: write model_best.pth.tar when the epoch beats the best score so far."""
    name = progress.best_metric or _best_metric(trainer)
    progress.best_metric = name
    score = metrics.get(name)
    if score is None or not np.isfinite(score):
        return
    if progress.better(float(score), higher_is_better=higher_is_better(name)):
        progress.best_score, progress.best_epoch = float(score), int(metrics["epoch"])
        save_checkpoint(run_dir / BEST_FILE, trainer.net, epoch=progress.epochs_done,
                        config=config_to_dict(trainer.config), metrics={"best": {name: float(score)}})


def _grid(trainer: Trainer, probes: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    reader = trainer.images.reader
    rows = [[reader.read_image(int(a)), *[reader.read_image(int(n)) for n in row]]
            for a, row in zip(probes, negatives)]
    return negatives_grid(rows)


def _summary(metrics: dict) -> str:
    keys = ("loss", "lr", "avg_neg_distance", "val_map_sym", "val_map_asym", "tuples_per_s", "epoch_time_s",
            "miner_wait_s")
    shown = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, float) and np.isfinite(value):
            shown.append(f"{key}={value:.4g}")
    return " ".join(shown)
