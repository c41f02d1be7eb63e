"""`run_demo`: every stage in order, one printed line per stage with its timing, then the report.

    synth -> shards -> teacher -> features -> contrplus, reg, sym -> eval -> report

One process; Ray is started once, by the first training run that needs it, and shut down at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from amldist.atomic import atomic_write_json
from amldist.demo import assemble
from amldist.demo.claims import format_claims
from amldist.demo.evaluation import eval_stage
from amldist.demo.report import StageTiming, write_report
from amldist.demo.settings import STUDENT_RUNS, TEACHER_RUN, DemoSettings
from amldist.demo.stages import (
    BUILT,
    DemoState,
    features_stage,
    run_config,
    shards_stage,
    synth_stage,
    teacher_overrides,
    train_stage,
)
from amldist.errors import UserError

log = logging.getLogger(__name__)

DATA_STAGES = ("synth", "shards")
STAGE_TIMES = "{name}-demo-stage-times.json"  # in the runs folder: seconds each stage took when last built
STAGES = ("synth", "shards", TEACHER_RUN.key, "features", *(r.key for r in STUDENT_RUNS), "eval", "report")
FORCE_GROUPS = {"students": tuple(r.key for r in STUDENT_RUNS), "all": STAGES}


@dataclass
class DemoResult:
    table_text: str
    report_dir: str
    stages: list[StageTiming]


def force_set(names: Iterable[str]) -> frozenset[str]:
    chosen: set[str] = set()
    for name in names:
        if name in FORCE_GROUPS:
            chosen.update(FORCE_GROUPS[name])
        elif name in STAGES:
            chosen.add(name)
        else:
            raise UserError(f"--force: unknown stage {name!r}; choose from "
                            f"{', '.join(STAGES + tuple(FORCE_GROUPS))}")
    return frozenset(chosen)


class StagePrinter:
    """Runs stages in order and prints `[i/n] name ... status (detail) in S s` for each. Build times
    are kept in `history` (a JSON file) so that a stage reused later still reports what it took."""

    def __init__(self, echo: Callable[[str], None] = print, history: Path | None = None):
        self.echo = echo
        self.timings: list[StageTiming] = []
        self.history = history
        self.built_seconds: dict[str, float] = _read_history(history)

    def run(self, name: str, action: Callable[[], tuple[str, str]], state: DemoState) -> None:
        position = STAGES.index(name) + 1
        self.echo(f"[{position}/{len(STAGES)}] {name} ...")
        started = time.perf_counter()
        status, detail = action()
        seconds = time.perf_counter() - started
        if status == BUILT:
            state.rebuilt.add(name)
            self.built_seconds[name] = seconds
            if self.history is not None:
                atomic_write_json(self.history, self.built_seconds)
        self.timings.append(StageTiming(name, status, seconds, detail, self.built_seconds.get(name)))
        self.echo(f"[{position}/{len(STAGES)}] {name}: {status} in {seconds:.1f} s -- {detail}")


def _read_history(path: Path | None) -> dict[str, float]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}  # unreadable: the build times are only informative
    return ({str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}
            if isinstance(data, dict) else {})


def run_demo(settings: DemoSettings, force: Iterable[str] = (), command: str = "amldist demo",
             echo: Callable[[str], None] = print) -> DemoResult:
    state = DemoState(settings, force_set(force))
    printer = StagePrinter(echo, settings.runs_dir / STAGE_TIMES.format(name=settings.name))
    data_inputs = list(DATA_STAGES)
    try:
        printer.run("synth", lambda: synth_stage(state), state)
        printer.run("shards", lambda: shards_stage(state), state)
        printer.run(TEACHER_RUN.key, lambda: train_stage(state, settings.teacher_run, data_inputs), state)
        printer.run("features", lambda: features_stage(state, settings.student_runs[0]), state)
        for run in settings.student_runs:
            printer.run(run.key, lambda run=run: _train_student(state, run, data_inputs), state)
    finally:
        if state.ray_started:
            import ray

            ray.shutdown()
    printer.run("eval", lambda: eval_stage(state), state)
    outcome: dict = {}  # what the report stage made, for the final report and the printout
    printer.run("report", lambda: _report(state, printer.timings, command, outcome), state)
    write_report(settings.report_dir, assemble.report_content(  # again, with the report stage's own time
        state, outcome["rows"], outcome["raw_rows"], outcome["claims"], outcome["figures"], printer.timings,
        command, outcome["random_ranking"]))
    echo("")
    echo(outcome["table_text"])
    echo("")
    echo(assemble.random_ranking_note(outcome["random_ranking"]))
    echo("")
    echo("The paper's claims, read from this table:")
    for line in format_claims(outcome["claims"]):
        echo(f"  {line}")
    echo(f"report: {settings.report_dir / 'report.md'}")
    return DemoResult(outcome["table_text"], str(settings.report_dir), printer.timings)


def _train_student(state: DemoState, run, data_inputs: list[str]) -> tuple[str, str]:
    if run_config(state.settings, run).model.teacher is None:  # the baseline learns alone
        return train_stage(state, run, data_inputs)
    return train_stage(state, run, data_inputs + [TEACHER_RUN.key, "features"], teacher_overrides(state))


def _report(state: DemoState, timings: list[StageTiming], command: str, outcome: dict) -> tuple[str, str]:
    folder = state.settings.report_dir
    folder.mkdir(parents=True, exist_ok=True)
    rows = assemble.table_rows(state)
    raw_rows = assemble.table_rows(state, "raw")
    random_ranking = assemble.random_ranking_scores(assemble.read_truths(state.settings))
    claims = assemble.paper_claims(state, rows, raw_rows, random_ranking)
    assemble.write_table_json(folder, rows, raw_rows, random_ranking, claims)
    figures = assemble.build_figures(state, folder)
    content = assemble.report_content(state, rows, raw_rows, claims, figures, timings, command,
                                      random_ranking)
    write_report(folder, content)
    outcome.update(rows=rows, raw_rows=raw_rows, claims=claims, figures=figures,
                   table_text=content.table_text, random_ranking=random_ranking)
    return BUILT, f"{folder / 'report.md'}, {len(figures)} figures"
