"""One worker's share of a training epoch: plan, mine, train, validate (no Ray).

`Trainer` composes the library pieces for one process of a (possibly distributed) run. The miner is
injected as an `amldist.miner_actor.MinerClient` (over the plain `Miner` in tests and in one-process
training, over the Ray actor in `amldist.worker`), or None for a run that needs none; the DDP wrapper
is injected too (`wrap`). What a tuple holds and where its negatives come from is the loss family's
(`amldist.training.family`).

Per epoch, on every rank:
1. step the lr schedule; draw the epoch's tuples from (seed, epoch) and take this rank's share;
2. negatives -- teacher pool (asym hard mining): embed the rank's anchors with the current student and
   ask the miner, which searches the teacher's vectors of the epoch's pool; student pool (sym hard
   mining): the ranks embed the epoch's pool in parallel, gather it, and each searches it for its own
   anchors; random: the miner draws them from (seed, epoch); regression mines nothing;
3. fetch the teacher vectors the rank's tuples read (one miner call, only those rows);
4. train: per step, load the rank's images (DataLoader workers), forward, loss, backward; the
   optimiser steps every `update_every` steps;
5. validate every `val_freq` epochs (the val images are split over the ranks, rank 0 scores).

A step whose loss is NaN or infinite stops the epoch with `NonFiniteLoss` (`FiniteLosses`), before
anything of that epoch is validated or saved.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from amldist import mining, search
from amldist.config import build_loss_from_config
from amldist.errors import UserError
from amldist.extract import embed
from amldist.miner_actor import MinerClient
from amldist.nets import create_net
from amldist.nets.meta import TEACHER_KEY
from amldist.training import collective
from amldist.training.data import TrainImages, split_source, step_loader
from amldist.training.family import NO_NEGATIVES, RANDOM_NEGATIVES, STUDENT_POOL, tuple_family
from amldist.training.optim import (
    calibrate_batchnorm,
    make_optimizer,
    make_scheduler,
    set_train_mode,
    start_epoch_schedule,
)
from amldist.training.paths import TrainingPaths, read_labels, teacher_record
from amldist.training.plan import (
    EpochTuples,
    StepTuples,
    draw_epoch_tuples,
    probe_anchors,
    rank_positions,
    rank_steps,
)
from amldist.training.state import Progress, load_training_state
from amldist.training.step import StepSettings, TupleEmbedder, VectorTable, loss_and_backward
from amldist.training.validation import ValidationSet

log = logging.getLogger(__name__)

NUM_PROBES = 4          # anchors in the hard-negative grid
EVAL_BATCH = 32         # images per forward when embedding for mining and validation
BN_CALIBRATION_IMAGES = 256  # training images that set a from-scratch student's BatchNorm statistics
BN_CALIBRATION_STREAM = 7


class NonFiniteLoss(UserError):
    """A step's loss was NaN or infinite: the weights it updates can no longer be trusted."""

    def __init__(self, epoch: int, step: int, num_steps: int, value: float, rank: int = 0):
        super().__init__(epoch, step, num_steps, value, rank)  # the args rebuild it when pickled
        self.epoch, self.step, self.num_steps, self.value, self.rank = epoch, step, num_steps, value, rank

    def __str__(self) -> str:
        return (f"the loss became {self.value} at epoch {self.epoch}, step {self.step + 1} of "
                f"{self.num_steps} (rank {self.rank})")


class FiniteLosses:
    """Checks every step's losses (b,) and raises `NonFiniteLoss` at the first that is not finite.

    On a CPU it reads a step's losses before the optimiser uses its gradients (`lag` 0). On a GPU
    (`lag` 1) it reads the step before the last: reading the last one would make the host wait for the
    device at every step (the step itself never waits, see `amldist.transfer`), and the check would
    only save the weights in memory, which a failed epoch never saves anyway.
    """

    def __init__(self, epoch: int, num_steps: int, rank: int, lag: int):
        self.epoch, self.num_steps, self.rank, self.lag = epoch, num_steps, rank, lag
        self._pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, losses: torch.Tensor) -> None:
        self._pending.append((step, losses))
        while len(self._pending) > self.lag:
            self._check(*self._pending.pop(0))

    def flush(self) -> None:
        while self._pending:
            self._check(*self._pending.pop(0))

    def _check(self, step: int, losses: torch.Tensor) -> None:
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            raise NonFiniteLoss(self.epoch, step, self.num_steps, float(losses[~finite][0]), self.rank)


@dataclass
class EpochOutcome:
    metrics: dict[str, float]
    probes: np.ndarray | None = None            # (p,) anchors of the grid, when asked for
    probe_negatives: np.ndarray | None = None   # (p, N) their negatives


@dataclass(frozen=True)
class StudentPool:
    """Sym hard mining: the epoch's pool as the student sees it, held by every rank."""

    ids: np.ndarray          # (P,) image ids
    vectors: np.ndarray      # (P, D) the student's descriptors
    top_k: search.SearchFn   # exact search over `vectors`


class Trainer:
    def __init__(self, config, paths: TrainingPaths, miner: MinerClient | None, *,
                 device: torch.device | str = "cpu", wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                 rank: int = 0, world_size: int = 1):
        self.config, self.paths, self.miner = config, paths, miner
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.family = tuple_family(config)
        self.search_backend = search.choose_backend(config.mining.backend)  # sym hard mining searches here
        self.train_labels, self.val_labels = read_labels(paths)
        model = config.model
        torch.manual_seed(config.run.seed)  # the same initial student on every rank and every run
        self.net = create_net(model.arch, model.pooling, model.projection_dim, pretrained=model.pretrained)
        if paths.train_store is not None and (self.family.asym or self.family.use_self):
            # The student learns the teacher's space: its checkpoints say which teacher (amldist search).
            self.net.meta.extra[TEACHER_KEY] = teacher_record(paths.train_store)
        self.freeze_batchnorm = bool(model.freeze_batchnorm)
        self.settings = StepSettings.for_device(self.device, all_images=self.family.students_references,
                                                exact_shapes=not self.freeze_batchnorm,
                                                world_size=world_size, global_batch=config.run.batch_size,
                                                reduction=config.loss.reduction)
        if self.settings.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.images = TrainImages(paths.train_shards, config.data.image_size, self.net.meta.mean,
                                  self.net.meta.std)
        if self.freeze_batchnorm and not model.pretrained:
            self._calibrate_batchnorm()
        self.model = wrap(TupleEmbedder(self.net))
        self.optimizer = make_optimizer(self.net, config.optim)
        self.scheduler = make_scheduler(self.optimizer, config.optim.lr_decay)
        self.loss_fn = build_loss_from_config(config)
        self.val_set = ValidationSet.from_labels(self.val_labels)
        self._val_teacher: np.ndarray | None = None
        self.after_step: Callable[[int, int], None] | None = None  # called with (epoch, step) after each step

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

    def mine(self, epoch: int, all_tuples: EpochTuples, mine_positions: np.ndarray
             ) -> tuple[np.ndarray, float, StudentPool | None]:
        """Negatives (n, N) of the rank's tuples `mine_positions`, their mean distance (NaN when not hard
        mined), and the student's pool (sym hard mining) for the probes of the same epoch."""
        family, seed = self.family, self.config.run.seed
        anchors = all_tuples.anchors[mine_positions]
        if family.negatives == NO_NEGATIVES:
            return np.zeros((len(anchors), 0), np.int64), float("nan"), None
        # every rank draws for all anchors: the same at any world size
        if family.negatives == RANDOM_NEGATIVES:
            self.miner.new_epoch(epoch, seed)
            negatives = self.miner.random_negatives(all_tuples.anchors, family.num_negatives,
                                                    family.random_rule, 0)
            return negatives[mine_positions], float("nan"), None
        pool = self.student_pool(epoch) if family.negatives == STUDENT_POOL else None
        if pool is None:
            self.miner.new_epoch(epoch, seed)
        negatives, distance = self.hard_negatives(anchors, pool)
        return negatives, distance, pool

    def student_pool(self, epoch: int) -> StudentPool:
        """The epoch's pool (the miner's draw from (seed, epoch)), embedded by all ranks in parallel."""
        ids = mining.epoch_pool(self.train_labels.num_images, self.config.mining.pool_size,
                                self.config.run.seed, epoch)
        vectors = self.embed_split_parts(self.paths.train_shards, self.train_labels.num_images, ids)  # (P, D)
        return StudentPool(ids, vectors, search.searcher(vectors, self.search_backend))

    def hard_negatives(self, anchors: np.ndarray, pool: StudentPool | None) -> tuple[np.ndarray, float]:
        """Hard negatives of `anchors`, embedded by the current student: searched in the student's pool
        when given, else among the teacher's pool vectors by the miner."""
        vecs = self.embed_train(anchors)
        count = self.family.num_negatives
        if pool is None:
            return self.miner.hard_negatives(anchors, vecs, count)
        clusters = self.train_labels.clusters
        return mining.select_hard_negatives(vecs, pool.vectors, pool.ids, clusters[pool.ids],
                                            clusters[anchors], count, search=pool.top_k)

    def probe_negatives(self, pool: StudentPool | None) -> tuple[np.ndarray, np.ndarray] | None:
        """Rank 0: the fixed grid anchors and the negatives they get now (Fig. 2)."""
        family = self.family
        if family.negatives == NO_NEGATIVES:
            return None
        probes = probe_anchors(self.train_labels, family, NUM_PROBES, self.config.run.seed)
        if family.negatives == RANDOM_NEGATIVES:
            return probes, self.miner.random_negatives(probes, family.num_negatives, family.random_rule, 1)
        return probes, self.hard_negatives(probes, pool)[0]

    def teacher_table(self, steps: list[StepTuples]) -> VectorTable | None:
        ids = np.unique(np.concatenate([self.family.teacher_image_ids(st) for st in steps]
                                       or [np.zeros(0, np.int64)]))
        if not len(ids):
            return None
        vectors = self.miner.teacher_vectors(ids)  # (T, D), only these rows
        return VectorTable(ids, torch.from_numpy(vectors).to(self.device))

    # ------------------------------------------------------------ training

    def train_steps(self, epoch: int, steps: list[StepTuples], teacher: VectorTable | None,
                    progress: Progress) -> np.ndarray:
        """Train on the rank's steps; returns every tuple loss (n,)."""
        set_train_mode(self.net, self.freeze_batchnorm)  # after any eval-mode embedding
        every = self.config.optim.update_every
        loader = step_loader(self.images, [self.family.student_image_ids(st) for st in steps],
                             self.config.data.workers, pin_memory=self.device.type == "cuda")
        finite = FiniteLosses(epoch, len(steps), self.rank, lag=1 if self.device.type == "cuda" else 0)
        losses = []
        for index, (tuples, images) in enumerate(zip(steps, loader)):
            updates = (index + 1) % every == 0 or index == len(steps) - 1
            no_sync = getattr(self.model, "no_sync", None)
            with contextlib.nullcontext() if updates or no_sync is None else no_sync():
                # on the device: read once, after the epoch
                losses.append(loss_and_backward(self.model, self.loss_fn, self.family, tuples, images,
                                                teacher, self.settings))
            finite.add(index, losses[-1])
            if updates:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                progress.global_step += 1
            if self.after_step is not None:
                self.after_step(epoch, index)
        finite.flush()
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
        """The teacher's vectors of every val image (N_val, D), read once through the miner as the train
        split's are; None without a teacher."""
        if self.paths.val_store is None:
            return None
        if self._val_teacher is None:
            self._val_teacher = self.miner.teacher_vectors(np.arange(self.val_labels.num_images), "val")
        return self._val_teacher

    # ------------------------------------------------------------ the epoch

    def run_epoch(self, epoch: int, progress: Progress, with_probes: bool = False) -> EpochOutcome:
        cfg, timings = self.config, {}
        started = time.perf_counter()
        if self.miner is not None:
            self.miner.wait_s = 0.0
        torch.manual_seed(int(np.random.SeedSequence([cfg.run.seed, epoch, self.rank]).generate_state(1)[0]))
        lr = start_epoch_schedule(self.scheduler)
        all_tuples = draw_epoch_tuples(self.train_labels, self.family, cfg.mining.queries_per_epoch,
                                       cfg.run.seed, epoch)
        step_positions = rank_steps(len(all_tuples), cfg.run.batch_size, self.rank, self.world_size)
        mine_positions = rank_positions(step_positions)
        negatives, distance, pool = self.mine(epoch, all_tuples, mine_positions)
        row_of = {int(p): i for i, p in enumerate(mine_positions)}
        steps = [StepTuples(all_tuples.anchors[pos], all_tuples.positives[pos],
                            negatives[[row_of[int(p)] for p in pos]]) for pos in step_positions]
        probes = self.probe_negatives(pool) if with_probes and self.rank == 0 else None
        teacher = self.teacher_table(steps)
        timings["mining_s"] = time.perf_counter() - started
        train_started = time.perf_counter()
        losses = self.train_steps(epoch, steps, teacher, progress)
        timings["train_s"] = time.perf_counter() - train_started
        metrics = self._epoch_metrics(losses, distance, lr, timings)
        if cfg.run.val_freq and (epoch + 1) % cfg.run.val_freq == 0:
            val_started = time.perf_counter()
            metrics.update(self.validate())
            metrics["val_time_s"] = time.perf_counter() - val_started
        metrics["epoch_time_s"] = time.perf_counter() - started
        return EpochOutcome(metrics, *(probes if probes is not None else (None, None)))

    def _epoch_metrics(self, losses: np.ndarray, distance: float, lr: float,
                       timings: dict) -> dict[str, float]:
        hard = not np.isnan(distance)
        total_loss, tuples, dist_sum, dist_count = collective.all_reduce(
            [float(losses.sum()), len(losses), distance * len(losses) if hard else 0.0,
             len(losses) if hard else 0],
            device=self.device if self.device.type == "cuda" else None)
        miner_wait = self.miner.wait_s if self.miner is not None else 0.0
        train_s, miner_wait, mining_s = collective.all_reduce(
            [timings["train_s"], miner_wait, timings["mining_s"]], op="max",
            device=self.device if self.device.type == "cuda" else None)
        return {"loss": total_loss / max(tuples, 1), "lr": lr, "tuples": tuples,
                "avg_neg_distance": dist_sum / dist_count if dist_count else float("nan"),
                "tuples_per_s": tuples / train_s if train_s > 0 else float("nan"),
                "train_time_s": train_s, "mining_time_s": mining_s, "miner_wait_s": miner_wait}
