"""The Ray Train loop per worker: one DDP process of a training run (`amldist.driver` starts them).

Each worker composes `amldist.training.epoch.Trainer` from the `WorkerJob` the driver hands it; per epoch
it mines, trains, validates; rank 0 keeps the best model (`model_best.pth.tar` in the run folder), writes
metrics.jsonl and wandb, and every rank calls `ray.train.report` once (rank 0 with the checkpoint on
checkpoint epochs). After a failure (FailureConfig) or a re-run with the same name and storage,
`ray.train.get_checkpoint()` gives the last checkpoint and training continues at the next epoch with the
same optimiser and schedule.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train import Checkpoint

from amldist import node_cache
from amldist.checkpoints import save_checkpoint
from amldist.config import Config, config_to_dict
from amldist.miner_actor import MinerClient
from amldist.training.epoch import Trainer
from amldist.training.grid import negatives_grid
from amldist.training.negatives_log import append_negatives
from amldist.training.paths import TrainingPaths
from amldist.training.remote_paths import WORKER_INPUTS
from amldist.training.state import BEST_FILE, CHECKPOINT_FILE, Progress, save_training_state
from amldist.training.validation import higher_is_better, selection_metric
from amldist.wandb_log import RunLog

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
    fail_at_epoch: int | None      # test hook: the last rank raises once at this epoch

    def to_loop_config(self) -> dict[str, Any]:
        return {JOB_KEY: self}


def _quiet_worker_logs() -> None:
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train's per-report INFO lines go to the root logger
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
    job: WorkerJob = loop_config[JOB_KEY]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    miner = MinerClient.connect(job.miner) if job.miner else None
    paths = node_cache.localize(job.paths, WORKER_INPUTS)  # inputs at URIs: this node's checked copies
    trainer = Trainer(job.config, paths, miner, device=ray.train.torch.get_device(),
                      wrap=ray.train.torch.prepare_model, rank=rank, world_size=world_size)
    progress, restored = _restore(trainer, job)
    run_log = _open_run_log(job, progress) if rank == 0 else None
    try:
        for epoch in range(progress.epochs_done, job.config.run.epochs):
            if job.fail_at_epoch == epoch and not restored and rank == world_size - 1:
                raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
            _run_epoch(trainer, progress, epoch, job, run_log)
    finally:
        if run_log is not None:
            run_log.finish()
    return {"epochs_done": progress.epochs_done, "best_score": progress.best_score,
            "best_epoch": progress.best_epoch, "best_metric": progress.best_metric}


def _restore(trainer: Trainer, job: WorkerJob) -> tuple[Progress, bool]:
    """This run's own last checkpoint (after a failure, or re-run with the same name), else an explicit
    --resume file, else a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            return trainer.restore(Path(folder) / CHECKPOINT_FILE), True
    if job.resume_from:
        return trainer.restore(job.resume_from), True
    return Progress(best_metric=_best_metric(trainer)), False


def _best_metric(trainer: Trainer) -> str:
    return selection_metric(trainer.config, has_teacher_store=trainer.paths.val_store is not None)


def _open_run_log(job: WorkerJob, progress: Progress) -> RunLog:
    return RunLog(job.run_dir, mode=job.wandb, project=job.config.run.wandb_project,
                  name=Path(job.run_dir).name, config=config_to_dict(job.config),
                  start_epoch=progress.epochs_done)


def _run_epoch(trainer: Trainer, progress: Progress, epoch: int, job: WorkerJob,
               run_log: RunLog | None) -> None:
    config = trainer.config
    every = job.image_every
    wants_probes = run_log is not None and every > 0 and epoch % every == 0
    outcome = trainer.run_epoch(epoch, progress, with_probes=wants_probes)
    progress.epochs_done = epoch + 1
    metrics = {"epoch": epoch, **outcome.metrics, "global_step": progress.global_step}
    if run_log is not None:
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
        if trainer.rank == 0 and due:
            save_training_state(Path(folder) / CHECKPOINT_FILE, trainer.net, trainer.optimizer,
                                trainer.scheduler, config_to_dict(config), progress, metrics)
            checkpoint = Checkpoint.from_directory(folder)
        # Every rank reports once per epoch (a barrier); only rank 0 attaches the checkpoint.
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_epoch{epoch + 1:04d}" if checkpoint else None)


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
