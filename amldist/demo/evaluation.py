"""The demo's evaluation stage: `amldist eval`'s library (`amldist.evaluation`) for every trained network,
one descriptor cache shared.

Per network the testing modes of Table 3: the teacher alone; each student symmetrically (its own
queries and database) and, when it learned from the teacher, asymmetrically (student queries, teacher
database). Learned whitening on the training set's whitening pairs, in the database network's space,
as `amldist eval --whitening` does. Descriptors are computed once per (network, set) and shared across
modes; the results of each network go to `<report>/eval/<run>.json`, keyed by its checkpoint's sha256,
so a re-run evaluates again only networks that changed (or whose cached files are damaged: those
count as missing). The raw database descriptors of one test set
are kept beside them (`<run>.<set>-db.npy`, (N, D) float32) for the report's t-SNE figure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from amldist.atomic import atomic_path, atomic_write_json, json_ready
from amldist.datasets import formats, layout
from amldist.demo.settings import TEACHER_RUN, TEST_DATASETS, TRAIN_DATASET, DemoSettings
from amldist.demo.stages import BUILT, REUSED, DemoState, RunOutcome
from amldist.errors import UserError

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
DESCRIPTORS_DATASET = TEST_DATASETS[0]  # the set whose database vectors the t-SNE figure shows


def testing_modes(run: RunOutcome) -> list[str]:
    """Modes of `amldist eval` that fill this run's row: 'teacher' for the teacher, 'sym' for every
    student, and 'asym' for students that learned from the teacher."""
    if run.spec.key == TEACHER_RUN.key:
        return ["teacher"]
    return ["sym", "asym"] if run.config.model.teacher else ["sym"]


def _identity(settings: DemoSettings, run: RunOutcome, teacher: RunOutcome) -> dict[str, Any]:
    from amldist.feature_store import file_sha256

    return {"network_sha256": file_sha256(run.best_checkpoint),
            "teacher_sha256": file_sha256(teacher.best_checkpoint), "image_size": settings.test_image_size,
            "datasets": list(TEST_DATASETS), "whitening": TRAIN_DATASET, "scales": [1.0],
            "modes": testing_modes(run)}


def result_path(settings: DemoSettings, run: RunOutcome) -> Path:
    return settings.report_dir / EVAL_DIR / f"{run.name}.json"


def descriptors_path(settings: DemoSettings, run: RunOutcome) -> Path:
    return settings.report_dir / EVAL_DIR / f"{run.name}.{DESCRIPTORS_DATASET}-db.npy"


def load_descriptors(settings: DemoSettings, run: RunOutcome) -> np.ndarray:
    """The run's raw database descriptors (N, D) of DESCRIPTORS_DATASET, saved by the eval stage."""
    path = descriptors_path(settings, run)
    try:
        vectors = np.load(path)
    except (OSError, ValueError, EOFError) as err:  # truncated, garbled, or gone since the eval stage
        raise UserError(f"damaged eval cache {path} ({str(err).splitlines()[0][:120]}); "
                        f"run the demo again with --force eval") from None
    if vectors.ndim != 2:
        raise UserError(f"damaged eval cache {path}: expected (N, D) descriptors, "
                        f"found shape {vectors.shape}")
    return vectors


def _descriptors_readable(path: Path) -> bool:
    """Whether the saved descriptors are whole: memory-mapping reads only the header, yet a truncated
    file fails (its data would run past the end), so checking costs next to nothing."""
    try:
        return np.load(path, mmap_mode="r").ndim == 2
    except (OSError, ValueError, EOFError):
        return False


def _save_descriptors(path: Path, vectors: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.save would append ".npy"
        np.save(handle, np.asarray(vectors, np.float32))


def load_results(settings: DemoSettings, run: RunOutcome,
                 identity: dict[str, Any] | None = None) -> dict | None:
    """Stored results of a run; None when missing or (given `identity`) computed for something else."""
    if identity is not None and not _descriptors_readable(descriptors_path(settings, run)):
        return None  # a damaged cache counts as missing: the eval stage computes it again
    try:
        stored = json.loads(result_path(settings, run).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not isinstance(stored.get("results"), dict):
        return None
    if identity is not None and stored.get("identity") != identity:
        return None
    return stored


def eval_stage(state: DemoState) -> tuple[str, str]:
    from amldist.evaluation import (
        DescriptorCache,
        EvalSettings,
        evaluate_mode,
        load_net,
        whitening_cache_path,
    )

    s = state.settings
    teacher_run = state.runs[TEACHER_RUN.key]
    pending = []
    for run in state.runs.values():
        identity = _identity(s, run, teacher_run)
        if "eval" in state.force or load_results(s, run, identity) is None:
            pending.append((run, identity))
    if not pending:
        return REUSED, f"{len(state.runs)} networks"
    if "eval" in state.force:  # redo means redo: learn Lw again too. Otherwise a retrained network cannot
        # reuse an old Lw anyway, since `amldist eval` keys its Lw cache to the network file's sha256
        for run, _ in pending:
            whitening_cache_path(run.best_checkpoint, TRAIN_DATASET, s.test_image_size,
                                 False).unlink(missing_ok=True)
    cache = DescriptorCache(EvalSettings(s.data_root, TEST_DATASETS, s.test_image_size,
                                         whitening=TRAIN_DATASET, batch_size=16, workers=0))
    teacher = load_net("teacher", teacher_run.best_checkpoint, "cpu")
    for run, identity in pending:
        network = teacher if run is teacher_run else load_net(f"student {run.spec.key}",
                                                              run.best_checkpoint, "cpu")
        results = {mode: evaluate_mode(mode, network, teacher, cache) for mode in testing_modes(run)}
        truth = formats.read_gnd(layout.gnd_path(s.data_root, DESCRIPTORS_DATASET))
        _save_descriptors(descriptors_path(s, run),
                          cache.descriptors(network, DESCRIPTORS_DATASET, "db", len(truth.imlist)))
        atomic_write_json(result_path(s, run), json_ready({"identity": identity, "results": results}))
    return BUILT, f"{len(pending)} of {len(state.runs)} networks"
