"""The demo's build stages: synthetic data, shards, training runs and the teacher's feature store.

Each stage first checks for its complete output and reuses it (`reused`), else calls the library
function behind the matching command (`built`): `amldist data synth` (synth.json marked complete),
`amldist data shards` (every split's manifest, written last), `amldist train` (the run's final-epoch
checkpoint), `amldist features` (a store whose provenance matches the teacher file). `--force STAGE`
removes that stage's output first; a stage whose input was rebuilt in this run runs again.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from amldist.datasets import layout
from amldist.demo.settings import TEACHER_RUN, TEST_DATASETS, TRAIN_DATASET, DemoSettings, RunSpec
from amldist.errors import UserError

log = logging.getLogger(__name__)

BUILT, REUSED = "built", "reused"


@dataclass
class RunOutcome:
    spec: RunSpec
    name: str
    run_dir: Path
    config: object                 # amldist.config.Config of the run
    best_checkpoint: Path          # model_best.pth.tar: the model the demo evaluates

    @property
    def wandb_runs(self) -> list[Path]:
        return sorted((self.run_dir / "wandb").glob("offline-run-*"))


@dataclass
class DemoState:
    """What the stages hand on to each other."""

    settings: DemoSettings
    force: frozenset[str] = frozenset()
    rebuilt: set[str] = field(default_factory=set)      # stages that ran in this invocation
    runs: dict[str, RunOutcome] = field(default_factory=dict)
    store_dir: Path | None = None
    ray_started: bool = False

    def must_run(self, stage: str, inputs: Iterable[str] = ()) -> bool:
        return stage in self.force or any(name in self.rebuilt for name in inputs)


# ---------------------------------------------------------------- data


def _synth_complete(root: Path, preset: str, seed: int) -> int | None:
    """Image count of a finished synthetic root made with this preset and seed, else None."""
    try:
        record = json.loads((root / "synth.json").read_text())
    except (OSError, ValueError):
        return None
    same = record.get("complete") and record.get("preset") == preset and record.get("seed") == seed
    return int(record["counts"]["total_images"]["images"]) if same else None


def synth_stage(state: DemoState) -> tuple[str, str]:
    from amldist.synth import generate

    s = state.settings
    count = _synth_complete(s.data_root, s.synth_preset, s.seed)
    if count is not None and not state.must_run("synth"):
        return REUSED, f"{s.data_root}: {count} images"
    record = generate(s.data_root, s.synth_preset, s.seed, overwrite="synth" in state.force)
    return BUILT, f"{s.data_root}: {record['counts']['total_images']['images']} images"


def shard_targets(settings: DemoSettings) -> list[tuple[str, int, tuple[str, ...]]]:
    """(dataset, image size, splits): training splits at the training size, test sets and whitening
    pairs at the test size (evaluation reads shards at its own image size)."""
    targets = [(TRAIN_DATASET, settings.train_image_size, layout.TRAIN_SPLITS)]
    if settings.test_image_size != settings.train_image_size:
        targets.append((TRAIN_DATASET, settings.test_image_size, ("whiten",)))
    return targets + [(name, settings.test_image_size, layout.TEST_SPLITS) for name in TEST_DATASETS]


def shards_stage(state: DemoState) -> tuple[str, str]:
    from amldist.shards import shard_dataset

    s = state.settings
    targets = shard_targets(s)
    folders = [layout.shards_dir(s.data_root, name, size) / split for name, size, splits in targets
               for split in splits]
    if not state.must_run("shards", ["synth"]) and all((f / "manifest.json").is_file() for f in folders):
        return REUSED, f"{len(folders)} splits"
    if "shards" in state.force:
        for name, size, _ in targets:
            shutil.rmtree(layout.shards_dir(s.data_root, name, size), ignore_errors=True)
    for name, size, splits in targets:
        shard_dataset(s.data_root, name, image_size=size, splits=list(splits))
    return BUILT, f"{len(folders)} splits"


# ---------------------------------------------------------------- training


def run_config(settings: DemoSettings, run: RunSpec, extra: Iterable[str] = ()):
    """The finalized Config of a run: its preset with this demo's `--set` overrides, as `amldist train
    --config PRESET --set ... --name ... --num-workers ...` would build it."""
    from amldist.config import load_config

    sets = [f"data.root={settings.data_root}", f"data.image_size={settings.train_image_size}",
            *settings.overrides, *extra]
    return load_config(run.preset, sets, {"run.name": settings.run_name(run),
                                          "run.num_workers": settings.num_workers})


def _final_checkpoint(run_dir: Path, epochs: int) -> Path:
    from amldist.training.state import CHECKPOINT_FILE

    return run_dir / f"checkpoint_epoch{epochs:04d}" / CHECKPOINT_FILE


def _ensure_ray(state: DemoState) -> None:
    """One local Ray for every run of the demo (started quietly, as `amldist train --local` does)."""
    if not state.ray_started:
        from amldist.driver import start_ray

        start_ray(True)
        state.ray_started = True


def train_stage(state: DemoState, run: RunSpec, inputs: Iterable[str],
                extra: Iterable[str] = ()) -> tuple[str, str]:
    """Train one run unless its final checkpoint is there; an interrupted run is continued."""
    from amldist.runs import check_resume, local_run_dir
    from amldist.training.state import BEST_FILE

    s = state.settings
    config = run_config(s, run, extra)
    name = config.run.name
    run_dir = local_run_dir(config.run.out_dir, s.runs_dir, name)
    outcome = RunOutcome(run, name, run_dir, config, run_dir / BEST_FILE)
    state.runs[run.key] = outcome
    finished = _final_checkpoint(run_dir, config.run.epochs).is_file() and outcome.best_checkpoint.is_file()
    if finished and not state.must_run(run.key, inputs):
        return REUSED, f"{run_dir} ({config.run.epochs} epochs)"
    if state.must_run(run.key, inputs) and run_dir.exists():
        shutil.rmtree(run_dir)
    resume = "" if any(run_dir.glob("checkpoint_*")) else None
    check_resume(str(s.runs_dir), name, resume, config.run.epochs)
    _ensure_ray(state)
    import ray

    from amldist.driver import run_training
    from amldist.wandb_log import resolve_mode

    retries = {} if s.max_failures is None else {"max_failures": s.max_failures}
    try:
        result = run_training(config, storage=str(s.runs_dir), name=name, wandb=resolve_mode(s.wandb, False),
                              image_every=1, **retries)
    except ray.train.TrainingFailedError as err:
        raise UserError(f"training {name} failed: {str(err).strip().splitlines()[-1][:300]}") from None
    best = result.return_value or {}
    if not outcome.best_checkpoint.is_file():
        raise UserError(f"training {name} finished without {outcome.best_checkpoint}")
    score = best.get("best_score")
    detail = (f"best {best.get('best_metric')} {score:.1f} at epoch {best.get('best_epoch', 0) + 1}"
              if score else "")
    return BUILT, f"{run_dir} ({config.run.epochs} epochs{', ' + detail if detail else ''})"


def teacher_overrides(state: DemoState) -> list[str]:
    """--set values pointing a student at this demo's teacher checkpoint."""
    return [f"model.teacher={state.runs[TEACHER_RUN.key].best_checkpoint}"]


def features_stage(state: DemoState, student: RunSpec) -> tuple[str, str]:
    """The teacher's features of the train and val splits, where the students' runs look for them."""
    from amldist.feature_store import FeatureStore
    from amldist.teacher_features import compute_features
    from amldist.training.paths import default_store_dir, shard_root, val_store_dir

    config = run_config(state.settings, student, teacher_overrides(state))
    teacher = state.runs[TEACHER_RUN.key].best_checkpoint
    store_dir = default_store_dir(config)
    state.store_dir = store_dir
    force = state.must_run("features", [TEACHER_RUN.key])
    before = _manifest_times([store_dir, val_store_dir(store_dir)])
    for split, out in (("train", store_dir), ("val", val_store_dir(store_dir))):
        compute_features(teacher, shard_root(config) / split, out, image_size=state.settings.train_image_size,
                         force=force)
    store = FeatureStore.open(store_dir)
    status = REUSED if before and before == _manifest_times([store_dir, val_store_dir(store_dir)]) else BUILT
    return status, f"{store_dir}: {len(store)} x {store.dim}"


def _manifest_times(folders: list[Path]) -> list[int] | None:
    paths = [folder / "manifest.json" for folder in folders]
    return [p.stat().st_mtime_ns for p in paths] if all(p.is_file() for p in paths) else None
