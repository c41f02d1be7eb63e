"""The testing modes of the paper's Table 3 for a student (and its teacher) on the revisited test sets.

`sym`: student queries against the student's database; `teacher`: the teacher alone; `asym`: student
queries against the teacher's database (the paper's asymmetric testing). Each mode reports mAP / mP@k
per test set on raw descriptors and, when whitening is asked for, on whitened ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amldist import evaluate, whiten
from amldist.datasets import formats, layout
from amldist.errors import require
from amldist.evaluation.descriptors import DescriptorCache, EvalSettings, LoadedNet, load_net
from amldist.evaluation.whitening import whitening_for

MODES = ("sym", "teacher", "asym")


def testing_modes(has_teacher: bool, asym: bool) -> list[str]:
    """sym always; with a teacher also the teacher alone; with `asym` also asymmetric testing."""
    require(not asym or has_teacher, "--asym needs --teacher (the database network)")
    return ["sym"] + (["teacher"] if has_teacher else []) + (["asym"] if asym else [])


def _networks_of(mode: str, student: LoadedNet, teacher: LoadedNet | None) -> tuple[LoadedNet, LoadedNet]:
    """(query network, database network) of a testing mode."""
    return {"sym": (student, student), "teacher": (teacher, teacher), "asym": (student, teacher)}[mode]


def evaluate_mode(mode: str, student: LoadedNet, teacher: LoadedNet | None,
                  cache: DescriptorCache) -> dict[str, dict[str, Any]]:
    """{test set (+distractors): {"raw": metrics, "whiten": metrics}} of one testing mode."""
    settings = cache.settings
    query_net, db_net = _networks_of(mode, student, teacher)
    lw = whitening_for(db_net, settings.whitening, cache) if settings.whitening else None
    out = {}
    for dataset in settings.datasets:
        truth = formats.read_gnd(layout.gnd_path(settings.data_root, dataset))
        db = cache.descriptors(db_net, dataset, "db", len(truth.imlist))
        queries = cache.descriptors(query_net, dataset, "query", len(truth.qimlist))
        distractors = None
        if settings.distractors:
            count = len(formats.list_images(settings.data_root, settings.distractors)["db"])
            distractors = cache.descriptors(db_net, settings.distractors, "db", count, distributed=True)
        key = dataset + (f"+{settings.distractors}" if settings.distractors else "")
        out[key] = {"raw": evaluate.evaluate_descriptors(db, queries, truth.gnd, distractors)}
        if lw is not None:
            white = [None if x is None else whiten.apply_whitening(x, lw) for x in (db, queries, distractors)]
            out[key]["whiten"] = evaluate.evaluate_descriptors(white[0], white[1], truth.gnd, white[2])
    return out


def check_inputs(settings: EvalSettings) -> None:
    """Every ground truth and whitening pair file is there: one line before any extraction."""
    for name in settings.datasets:
        path = layout.gnd_path(settings.data_root, name)
        require(path.is_file(), f"no ground truth for {name}: {path} is missing")
    if settings.whitening:
        path = layout.whiten_db_path(settings.data_root, settings.whitening)
        require(path.is_file(), f"no whitening pairs for {settings.whitening}: {path} is missing")


def evaluate_networks(student_path: str | Path, teacher_path: str | Path | None, modes: list[str],
                      settings: EvalSettings) -> dict[str, dict[str, dict[str, Any]]]:
    """{mode: evaluate_mode(...)} for a student network file and, for `teacher` / `asym`, its teacher."""
    check_inputs(settings)
    student = load_net("student", student_path, settings.device)
    teacher = load_net("teacher", teacher_path, settings.device) if teacher_path else None
    if "asym" in modes:
        require(teacher is not None and student.dim == teacher.dim,
                f"asymmetric testing needs equal dimensions: student {student.dim}, "
                f"teacher {None if teacher is None else teacher.dim}")
    cache = DescriptorCache(settings)
    return {mode: evaluate_mode(mode, student, teacher, cache) for mode in modes}
