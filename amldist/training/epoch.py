"""One worker's share of a training epoch: plan, mine, train, validate (no Ray).

`Trainer` composes the library pieces for one process of a (possibly distributed) run. The miner is
injected: anything with the methods of `amldist.miner_actor.Miner` (`new_epoch`, `mine`,
`random_negatives`, `teacher_vectors`) answering synchronously -- the plain `Miner` in tests, a thin
wrapper over the Ray actor in `amldist.worker`. The DDP wrapper is injected too (`wrap`).

Per epoch, on every rank:
1. step the lr schedule; draw the epoch's tuples from (seed, epoch) and take this rank's share;
2. mine: hard negatives -- asym: embed the rank's anchors with the current student, ask the miner
   (student anchors vs the teacher's pool); sym: the ranks also embed the epoch's pool in parallel,
   gather it, and rank 0 sends it to the miner with its anchors, the others after a barrier. Random
   negatives/examples are drawn by the miner from (seed, epoch); regression mines nothing;
3. fetch the teacher vectors the rank's tuples read (one miner call, only those rows);
4. train: per step, load the rank's images (DataLoader workers), forward, loss, backward; the
   optimiser steps every `update_every` steps;
5. validate every `val_freq` epochs (the val images are split over the ranks, rank 0 scores).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from amldist.config import build_loss_from_config
from amldist.extract import embed
from amldist.feature_store import FeatureStore
from amldist.nets import create_net
from amldist.training import collective
from amldist.training.data import TrainImages, split_source, step_loader
from amldist.training.optim import (
    calibrate_batchnorm,
    make_optimizer,
    make_scheduler,
    set_train_mode,
    start_epoch_schedule,
)
from amldist.training.paths import TrainingPaths, read_labels
from amldist.training.plan import (
    RELATIONAL,
    EpochTuples,
    TupleSpec,
    draw_epoch_tuples,
    probe_anchors,
    rank_positions,
    rank_steps,
)
from amldist.training.state import Progress, load_training_state
from amldist.training.step import (
    StepSettings,
    StepTuples,
    TupleEmbedder,
    VectorTable,
    loss_and_backward,
    student_image_ids,
    teacher_image_ids,
)
from amldist.training.validation import ValidationSet

log = logging.getLogger(__name__)

NUM_PROBES = 4          # anchors in the hard-negative grid
EVAL_BATCH = 32         # images per forward when embedding for mining and validation
BN_CALIBRATION_IMAGES = 256  # training images that set a from-scratch student's BatchNorm statistics
BN_CALIBRATION_STREAM = 7


def _is_missing_pool(err: BaseException) -> bool:
    """The miner lost its sym pool (restarted); matched by name: the Ray wrapper subclasses it."""
    return any(cls.__name__ == "MissingPoolVectors" for cls in type(err).__mro__)


@dataclass
class EpochOutcome:
    metrics: dict[str, float]
    probes: np.ndarray | None = None            # (p,) anchors of the grid, when asked for
    probe_negatives: np.ndarray | None = None   # (p, N) their negatives
    timings: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(self, config, paths: TrainingPaths, miner, *, device: torch.device | str = "cpu",
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m, rank: int = 0, world_size: int = 1):
        self.config, self.paths, self.miner = config, paths, miner
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.spec = TupleSpec.from_config(config)
        self.train_labels, self.val_labels = read_labels(paths)
        model = config.model
        torch.manual_seed(config.run.seed)  # the same initial student on every rank and every run
        self.net = create_net(model.arch, model.pooling, model.projection_dim, pretrained=model.pretrained)
        self.freeze_batchnorm = bool(model.freeze_batchnorm)
        self.settings = StepSettings.for_device(self.device, all_images=self.spec.students_references,
                                                exact_shapes=not self.freeze_batchnorm,
                                                world_size=world_size, global_batch=config.run.batch_size,
                                                reduction=config.loss.reduction)
        if self.settings.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.images = TrainImages(paths.train_shards, config.data.image_size, self.net.meta.mean, self.net.meta.std)
        if self.freeze_batchnorm and not model.pretrained:
            self._calibrate_batchnorm()
        self.model = wrap(TupleEmbedder(self.net))
        self.optimizer = make_optimizer(self.net, config.optim)
        self.scheduler = make_scheduler(self.optimizer, config.optim.lr_decay)
        self.loss_fn = build_loss_from_config(config)
        self.val_set = ValidationSet.from_labels(self.val_labels)
        self._val_teacher: np.ndarray | None = None
        self.miner_wait = 0.0

    def _calibrate_batchnorm(self) -> None:
        """BatchNorm statistics of a from-scratch student, from the same training images on every rank."""
        rng = np.random.default_rng(np.random.SeedSequence([self.config.run.seed, BN_CALIBRATION_STREAM]))
        count = min(BN_CALIBRATION_IMAGES, self.train_labels.num_images)
        ids = np.sort(rng.choice(self.train_labels.num_images, size=count, replace=False))
        self.net.to(self.device)
        used = calibrate_batchnorm(self.net, (self.images.load(int(i)) for i in ids), self.device)
        log.debug("BatchNorm statistics estimated on %d training images", used)

    # ------------------------------------------------------------ state

    def restore(self, path) -> Progress:
        progress = load_training_state(path, self.net, self.optimizer, self.scheduler)
        log.info("resumed from %s after %d epochs", path, progress.epochs_done)
        return progress

    def _ask(self, method: str, *args, **kwargs):
        """A miner call, timed (the wait is reported per epoch)."""
        started = time.perf_counter()
        try:
            return getattr(self.miner, method)(*args, **kwargs)
        finally:
            self.miner_wait += time.perf_counter() - started

    # ------------------------------------------------------------ embedding (eval mode, no grad)

    def embed_images(self, split_dir: str, num_images: int, ids: np.ndarray) -> np.ndarray:
        source = split_source(split_dir, num_images, ids)
        return embed(self.net, source, image_size=self.config.data.image_size, batch_size=EVAL_BATCH,
                     autocast=self.settings.amp_dtype or False, num_workers=self.config.data.workers,
                     desc="embed")  # (len(ids), D)

    def embed_train(self, ids: np.ndarray) -> np.ndarray:
        return self.embed_images(self.paths.train_shards, self.train_labels.num_images, ids)

    def embed_split_parts(self, split_dir: str, num_images: int, ids: np.ndarray) -> np.ndarray:
        """Embed `ids` with every rank doing an equal part; all ranks get all rows (len(ids), D)."""
        part = np.array_split(np.asarray(ids, np.int64), self.world_size)[self.rank]
        return np.concatenate(collective.all_gather_arrays(self.embed_images(split_dir, num_images, part)))

    # ------------------------------------------------------------ mining

    def _hard_negatives(self, anchors: np.ndarray, pool_vecs: np.ndarray | None, first: bool) -> tuple[np.ndarray, float]:
        count = self.spec.num_negatives
        vecs = self.embed_train(anchors)
        if self.spec.asym:
            return self._ask("mine", anchors, vecs, count, mode="asym")
        if first:
            return self._ask("mine", anchors, vecs, count, mode="sym", pool_vecs=pool_vecs)
        try:
            return self._ask("mine", anchors, vecs, count, mode="sym")
        except Exception as err:
            if not _is_missing_pool(err):
                raise
            log.warning("the miner lost the epoch's pool (restarted?); sending it again")
            return self._ask("mine", anchors, vecs, count, mode="sym", pool_vecs=pool_vecs)

    def mine(self, epoch: int, all_tuples: EpochTuples, mine_positions: np.ndarray) -> tuple[np.ndarray, float, np.ndarray | None]:
        """Negatives (n, N) of the rank's tuples `mine_positions`, their mean distance (NaN when not hard
        mined), and the student pool vectors (sym hard mining) for later calls."""
        spec, seed = self.spec, self.config.run.seed
        mine_anchors = all_tuples.anchors[mine_positions]
        if spec.mining == "none":
            return np.zeros((len(mine_anchors), 0), np.int64), float("nan"), None
        pool_ids = self._ask("new_epoch", epoch, seed)
        if spec.mining == "random":  # every rank draws for all anchors: the same answer at any world size
            rule = "uniform" if spec.kind == RELATIONAL else "clusters"
            negatives = self._ask("random_negatives", all_tuples.anchors, spec.num_negatives, rule=rule, key=0)
            return np.asarray(negatives)[mine_positions], float("nan"), None
        pool_vecs = None
        if not spec.asym:
            pool_vecs = self.embed_split_parts(self.paths.train_shards, self.train_labels.num_images, pool_ids)
        if spec.asym:
            negatives, distance = self._hard_negatives(mine_anchors, None, first=True)
            return np.asarray(negatives), float(distance), None
        if self.rank == 0:
            negatives, distance = self._hard_negatives(mine_anchors, pool_vecs, first=True)
        collective.barrier()  # sym: rank 0 has sent the pool before the other ranks ask
        if self.rank != 0:
            negatives, distance = self._hard_negatives(mine_anchors, pool_vecs, first=False)
        return np.asarray(negatives), float(distance), pool_vecs

    def probe_negatives(self, pool_vecs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
        """Rank 0: the fixed grid anchors and the negatives the miner gives them now (Fig. 2)."""
        spec = self.spec
        if spec.mining == "none":
            return None
        probes = probe_anchors(self.train_labels, spec, NUM_PROBES, self.config.run.seed)
        if spec.mining == "random":
            rule = "uniform" if spec.kind == RELATIONAL else "clusters"
            return probes, np.asarray(self._ask("random_negatives", probes, spec.num_negatives, rule=rule, key=1))
        return probes, self._hard_negatives(probes, pool_vecs, first=False)[0]

    def teacher_table(self, steps: list[StepTuples]) -> VectorTable | None:
        ids = np.unique(np.concatenate([teacher_image_ids(self.spec, st) for st in steps] or [np.zeros(0, np.int64)]))
        if not len(ids):
            return None
        vectors = np.array(self._ask("teacher_vectors", ids), np.float32)  # (T, D), only these rows (a copy)
        return VectorTable(ids, torch.from_numpy(vectors).to(self.device))

    # ------------------------------------------------------------ training

    def train_steps(self, steps: list[StepTuples], teacher: VectorTable | None, progress: Progress) -> np.ndarray:
        """Train on the rank's steps; returns every tuple loss (n,)."""
        set_train_mode(self.net, self.freeze_batchnorm)  # after any eval-mode embedding
        every = self.config.optim.update_every
        loader = step_loader(self.images, [student_image_ids(self.spec, st) for st in steps],
                             self.config.data.workers, pin_memory=self.device.type == "cuda")
        losses = []
        for index, (tuples, images) in enumerate(zip(steps, loader)):
            updates = (index + 1) % every == 0 or index == len(steps) - 1
            no_sync = getattr(self.model, "no_sync", None)
            with contextlib.nullcontext() if updates or no_sync is None else no_sync():
                losses.append(loss_and_backward(self.model, self.loss_fn, self.spec, tuples, images, teacher,
                                                self.settings))  # on the device: read once, after the epoch
            if updates:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                progress.global_step += 1
        return torch.cat(losses).cpu().numpy() if losses else np.zeros(0, np.float32)

    # ------------------------------------------------------------ validation

    def validate(self) -> dict[str, float]:
        """Val mAP (%) sym and, with a teacher, asym; computed on rank 0 (others return {})."""
        val_ids = np.arange(self.val_labels.num_images)
        student_db = self.embed_split_parts(self.paths.val_shards, self.val_labels.num_images, val_ids)
        if self.rank != 0:
            return {}
        return self.val_set.scores(student_db, self.val_teacher())

    def val_teacher(self) -> np.ndarray | None:
        if self.paths.val_store is None:
            return None
        if self._val_teacher is None:
            store = FeatureStore.open(self.paths.val_store, verify=False)
            self._val_teacher = store.vectors(np.arange(len(store)))  # (N_val, D), the val split is small
        return self._val_teacher

    # ------------------------------------------------------------ the epoch

    def run_epoch(self, epoch: int, progress: Progress, with_probes: bool = False) -> EpochOutcome:
        cfg, timings = self.config, {}
        started = time.perf_counter()
        self.miner_wait = 0.0
        torch.manual_seed(int(np.random.SeedSequence([cfg.run.seed, epoch, self.rank]).generate_state(1)[0]))
        lr = start_epoch_schedule(self.scheduler)
        all_tuples = draw_epoch_tuples(self.train_labels, self.spec, cfg.mining.queries_per_epoch, cfg.run.seed, epoch)
        step_positions = rank_steps(len(all_tuples), cfg.run.batch_size, self.rank, self.world_size)
        mine_positions = rank_positions(step_positions)
        negatives, distance, pool_vecs = self.mine(epoch, all_tuples, mine_positions)
        row_of = {int(p): i for i, p in enumerate(mine_positions)}
        steps = [StepTuples(all_tuples.anchors[pos], all_tuples.positives[pos],
                            negatives[[row_of[int(p)] for p in pos]]) for pos in step_positions]
        probes = self.probe_negatives(pool_vecs) if with_probes and self.rank == 0 else None
        teacher = self.teacher_table(steps)
        timings["mining_s"] = time.perf_counter() - started
        train_started = time.perf_counter()
        losses = self.train_steps(steps, teacher, progress)
        timings["train_s"] = time.perf_counter() - train_started
        metrics = self._epoch_metrics(losses, distance, lr, timings)
        if cfg.run.val_freq and (epoch + 1) % cfg.run.val_freq == 0:
            val_started = time.perf_counter()
            metrics.update(self.validate())
            metrics["val_time_s"] = time.perf_counter() - val_started
        metrics["epoch_time_s"] = time.perf_counter() - started
        return EpochOutcome(metrics, *(probes if probes is not None else (None, None)), timings=timings)

    def _epoch_metrics(self, losses: np.ndarray, distance: float, lr: float, timings: dict) -> dict[str, float]:
        hard = not np.isnan(distance)
        total_loss, tuples, dist_sum, dist_count = collective.all_reduce(
            [float(losses.sum()), len(losses), distance * len(losses) if hard else 0.0, len(losses) if hard else 0],
            device=self.device if self.device.type == "cuda" else None)
        train_s, miner_wait, mining_s = collective.all_reduce(
            [timings["train_s"], self.miner_wait, timings["mining_s"]], op="max",
            device=self.device if self.device.type == "cuda" else None)
        return {"loss": total_loss / max(tuples, 1), "lr": lr, "tuples": tuples,
                "avg_neg_distance": dist_sum / dist_count if dist_count else float("nan"),
                "tuples_per_s": tuples / train_s if train_s > 0 else float("nan"),
                "train_time_s": train_s, "mining_time_s": mining_s, "miner_wait_s": miner_wait}
