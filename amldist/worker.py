"""Distributed training with Ray Train: the per-worker loop and the driver function around it.

    result = run_training(config, storage="runs", name="my-run")      # starts the miner, fits, kills it

`run_training` checks the inputs (`amldist.training.paths`), computes the teacher's val features if
they are missing, starts the miner actor (`amldist.miner_actor`, placed by `miner_options`), builds a
`TorchTrainer` with one DDP process per worker running `train_loop_per_worker`, and kills the miner at
the end. Ray Tune can run it as a trial: call it from a function trainable with
`callbacks=[TuneReportCallback()]` and a per-trial `name`.

Each worker composes `amldist.training.epoch.Trainer`; per epoch it mines, trains, validates; rank 0
keeps the best model (`model_best.pth.tar` in the run folder), writes metrics.jsonl and wandb, and
every rank calls `ray.train.report` once (rank 0 with the checkpoint on checkpoint epochs). After a
failure (FailureConfig) or a re-run with the same name and storage, `ray.train.get_checkpoint()` gives
the last checkpoint and training continues at the next epoch with the same optimiser and schedule.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from amldist import node_cache
from amldist.checkpoints import save_checkpoint
from amldist.config import Config, config_from_dict, config_to_dict
from amldist.miner_actor import start_miner
from amldist.storage import storage_filesystem, storage_filesystem_path
from amldist.training.epoch import Trainer
from amldist.training.grid import negatives_grid
from amldist.training.negatives_log import append_negatives
from amldist.training.paths import TrainingPaths, prepare_inputs
from amldist.training.plan import busiest_rank_tuples, idle_share
from amldist.training.remote_paths import WORKER_INPUTS
from amldist.training.state import BEST_FILE, CHECKPOINT_FILE, Progress, save_training_state
from amldist.wandb_log import RunLog

log = logging.getLogger(__name__)

DEFAULT_IMAGE_EVERY = 5      # epochs between records of the fixed anchors' negatives (negatives.jsonl, wandb)
DEFAULT_MAX_FAILURES = 2
CHECKPOINTS_KEPT = 2


class RemoteMiner:
    """The miner actor behind the synchronous interface `Trainer` expects."""

    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, method: str):
        remote = getattr(self.handle, method)
        return lambda *args, **kwargs: ray.get(remote.remote(*args, **kwargs))


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
    """One DDP process. `loop_config` (plain values, built by `run_training`): config, paths, miner,
    run_dir, wandb, resume_from, image_every, and the test hook fail_at_epoch."""
    _quiet_worker_logs()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config = config_from_dict(loop_config["config"])
    paths = node_cache.localize(TrainingPaths.from_dict(loop_config["paths"]), WORKER_INPUTS)  # URIs: node copies
    trainer = Trainer(config, paths,
                      RemoteMiner(ray.get_actor(loop_config["miner"])), device=ray.train.torch.get_device(),
                      wrap=ray.train.torch.prepare_model, rank=rank, world_size=world_size)
    progress, restored = _restore(trainer, loop_config)
    run_log = _open_run_log(loop_config, config, progress) if rank == 0 else None
    try:
        for epoch in range(progress.epochs_done, config.run.epochs):
            if loop_config.get("fail_at_epoch") == epoch and not restored and rank == world_size - 1:
                raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
            _run_epoch(trainer, progress, epoch, loop_config, run_log)
    finally:
        if run_log is not None:
            run_log.finish()
    return {"epochs_done": progress.epochs_done, "best_score": progress.best_score,
            "best_epoch": progress.best_epoch, "best_metric": progress.best_metric}


def _restore(trainer: Trainer, loop_config: dict) -> tuple[Progress, bool]:
    """This run's own last checkpoint (after a failure, or re-run with the same name), else an explicit
    --resume file, else a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            return trainer.restore(Path(folder) / CHECKPOINT_FILE), True
    if loop_config.get("resume_from"):
        return trainer.restore(loop_config["resume_from"]), True
    return Progress(best_metric=_best_metric(trainer)), False


def _best_metric(trainer: Trainer) -> str:
    """The validation score that picks the best model: asym mAP when the student is trained against the
    teacher's space (asym labelled losses, regression), else sym mAP; the loss without validation."""
    if not trainer.config.run.val_freq:
        return "loss"
    return "val_map_asym" if trainer.spec.asym and trainer.paths.val_store else "val_map_sym"


def _open_run_log(loop_config: dict, config: Config, progress: Progress) -> RunLog:
    return RunLog(loop_config["run_dir"], mode=loop_config.get("wandb", "off"), project=config.run.wandb_project,
                  name=Path(loop_config["run_dir"]).name, config=loop_config["config"],
                  start_epoch=progress.epochs_done)


def _run_epoch(trainer: Trainer, progress: Progress, epoch: int, loop_config: dict, run_log: RunLog | None) -> None:
    config = trainer.config
    every = int(loop_config.get("image_every") or 0)
    wants_probes = run_log is not None and every > 0 and epoch % every == 0
    outcome = trainer.run_epoch(epoch, progress, with_probes=wants_probes)
    progress.epochs_done = epoch + 1
    metrics = {"epoch": epoch, **outcome.metrics, "global_step": progress.global_step}
    if run_log is not None:
        _track_best(trainer, progress, metrics, Path(loop_config["run_dir"]))
        metrics["best_score"] = progress.best_score
        run_log.log_epoch(epoch, metrics)
        if outcome.probes is not None:
            append_negatives(loop_config["run_dir"], epoch, outcome.probes, outcome.probe_negatives)  # Fig. 2 data
            if run_log.run is not None:
                run_log.log_image(epoch, "hard_negatives", _grid(trainer, outcome.probes, outcome.probe_negatives),
                                  caption=f"epoch {epoch}: anchors (green) and their mined negatives (red)")
        log.info("epoch %d/%d: %s", epoch + 1, config.run.epochs, _summary(metrics))
    last = epoch == config.run.epochs - 1
    due = last or (config.run.save_freq and (epoch + 1) % config.run.save_freq == 0)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if trainer.rank == 0 and due:
            save_training_state(Path(folder) / CHECKPOINT_FILE, trainer.net, trainer.optimizer, trainer.scheduler,
                                loop_config["config"], progress, metrics)
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
    if progress.better(float(score), higher_is_better=name != "loss"):
        progress.best_score, progress.best_epoch = float(score), int(metrics["epoch"])
        save_checkpoint(run_dir / BEST_FILE, trainer.net, epoch=progress.epochs_done,
                        config=config_to_dict(trainer.config), metrics={"best": {name: float(score)}})


def _grid(trainer: Trainer, probes: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    reader = trainer.images.reader
    rows = [[reader.read_image(int(a)), *[reader.read_image(int(n)) for n in row]] for a, row in zip(probes, negatives)]
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


# ---------------------------------------------------------------- the driver


def local_run_dir(config: Config, storage: str, name: str) -> Path:
    """Where rank 0 writes model_best, metrics.jsonl and wandb: the Ray run folder for a local storage
    path, else run.out_dir/<name> on rank 0's node (a URI storage holds only Ray's checkpoints)."""
    if "://" in str(storage):
        return Path(config.run.out_dir).expanduser().resolve() / name
    return Path(storage).expanduser().resolve() / name


def run_training(config: Config | dict, *, storage: str, name: str, callbacks: list | None = None,
                 wandb: str = "off", resume_from: str | None = None, max_failures: int = DEFAULT_MAX_FAILURES,
                 image_every: int = DEFAULT_IMAGE_EVERY, fail_at_epoch: int | None = None):
    """Train one run on the connected Ray cluster; returns the `ray.train.Result`.

    storage: local folder or URI (RunConfig.storage_path); the run lives in `<storage>/<name>`, and a
    re-run with the same storage and name continues it. wandb: off, offline or online (see wandb_log).
    resume_from: a checkpoint file to start from when the run has none of its own.
    """
    config = config if isinstance(config, Config) else config_from_dict(config)
    if not ray.is_initialized():
        raise RuntimeError("run_training needs a running Ray (ray.init) first")
    paths, train_labels = prepare_inputs(config, num_feature_workers=0 if _single_node() else config.run.num_workers)
    _warn_uneven_batch(config.run.batch_size, config.run.num_workers)
    run_dir = local_run_dir(config, storage, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    miner_name = f"amldist-miner-{uuid.uuid4().hex[:12]}"
    miner = start_miner(train_labels.clusters, paths.train_store, name=miner_name, pool_size=config.mining.pool_size,
                        state_dir=str(run_dir / "miner"), backend=config.mining.backend, **_miner_gpu(config))
    try:
        ray.get(miner.stats.remote())  # surface a miner that cannot start before the workers wait on it
        loop_config = {"config": config_to_dict(config), "paths": paths.to_dict(), "miner": miner_name,
                       "run_dir": str(run_dir), "wandb": wandb, "resume_from": resume_from,
                       "image_every": image_every, "fail_at_epoch": fail_at_epoch}
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=config.run.num_workers, use_gpu=config.run.use_gpu),
            run_config=RunConfig(name=name, storage_path=_storage_path(storage), callbacks=callbacks,
                                 storage_filesystem=storage_filesystem(storage),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                                 logging_config=ray.train.LoggingConfig(log_level="WARNING")))
        started = time.perf_counter()
        result = trainer.fit()
        log.info("training %s finished in %.1f s", name, time.perf_counter() - started)
        return result
    finally:
        ray.kill(miner)


def _warn_uneven_batch(batch_size: int, num_workers: int) -> None:
    idle = idle_share(batch_size, num_workers)
    if idle > 0:
        log.warning("run.batch_size %d does not split evenly over %d workers: every step waits for the ranks "
                    "with %d tuples, about %.0f%% of the workers' time idle; a multiple of %d keeps them all busy",
                    batch_size, num_workers, busiest_rank_tuples(batch_size, num_workers), 100 * idle, num_workers)


def _storage_path(storage: str) -> str:
    """An absolute folder, or for a URI the path inside `storage_filesystem(storage)` (no scheme)."""
    return storage_filesystem_path(storage)


def _single_node() -> bool:
    return len([node for node in ray.nodes() if node.get("Alive")]) <= 1


def _miner_gpu(config: Config) -> dict[str, Any]:
    """Leave the GPUs to the trainers when they need all of them (e.g. one GPU, one worker)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= 1 and config.run.use_gpu and gpus < config.run.num_workers + 1:
        return {"num_gpus": 0}
    return {}
