"""A finished (or interrupted) search's results: the table of trials, the best configuration as a
ready-to-run preset, and the files that hold them (no Ray).

Per trial the table holds the searched values, the best value of the search's metric and the epoch it
came at (epochs counted from 0, as in metrics.jsonl), the epochs run, whether the scheduler stopped it
early, its wall time and its status. `write_results` writes `results.csv`, `results.json` (the table,
the best trial and every trial's metric per epoch) and `best.yaml` (the best trial's finalized config,
`amldist train --config best.yaml` trains it) atomically into the search folder.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from amldist.atomic import atomic_write_json, atomic_write_text, json_ready
from amldist.config import config_to_yaml
from amldist.tuning.plan import SearchPlan

RESULTS_CSV, RESULTS_JSON, BEST_PRESET, PLOT_FILE = "results.csv", "results.json", "best.yaml", "search.png"
FINISHED = "TERMINATED"  # Ray Tune's status of a trial that ended (by itself or stopped by the scheduler)
FAILED = "ERROR"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the search saw it."""

    trial_id: str
    params: dict[str, Any]           # the searched values it drew
    status: str                      # Ray Tune's: TERMINATED, ERROR, or PENDING/RUNNING/PAUSED if interrupted
    planned_epochs: int              # its run.epochs
    epochs: list[dict[str, Any]] = field(default_factory=list)  # its reported metrics, one per epoch
    wall_s: float | None = None      # Ray Tune's time_total_s: from the trial's start to its last report
    folder: str = ""                 # its run folder: trial_<id>/ in the search folder

    @property
    def epochs_run(self) -> int:
        return len(self.epochs)

    @property
    def stopped_early(self) -> bool:
        return self.status == FINISHED and self.epochs_run < self.planned_epochs

    @property
    def unfinished(self) -> bool:
        return self.status not in (FINISHED, FAILED)

    def curve(self, metric: str) -> list[tuple[int, float]]:
        """(epoch, value) of the epochs that report a finite `metric`."""
        points = []
        for record in self.epochs:
            value = record.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                points.append((int(record["epoch"]), float(value)))
        return points

    def best(self, metric: str, mode: str) -> tuple[float, int] | None:
        """(best value, its epoch), the earliest epoch on ties; None before any value."""
        points = self.curve(metric)
        if not points:
            return None
        pick = max if mode == "max" else min
        value = pick(value for _, value in points)
        return value, next(epoch for epoch, v in points if v == value)


def last_per_epoch(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Reported metrics with one row per epoch, in epoch order: an epoch trained again after a restart
    keeps its last report."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in rows:
        epoch = row.get("epoch")
        if isinstance(epoch, (int, float)) and math.isfinite(epoch):
            by_epoch[int(epoch)] = dict(row)
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


@dataclass(frozen=True)
class SearchResults:
    plan: SearchPlan
    name: str
    trials: list[TrialRecord]

    @property
    def interrupted(self) -> bool:
        return any(trial.unfinished for trial in self.trials) or len(self.trials) < self.expected_trials

    @property
    def expected_trials(self) -> int:
        grid = 1
        for dimension in self.plan.dimensions:
            grid *= len(dimension.args) if dimension.function == "grid" else 1
        return grid * self.plan.num_samples

    def ranked(self) -> list[TrialRecord]:
        """Best first; trials without a value last, in their order."""
        scored = [(trial.best(self.plan.metric, self.plan.mode), index, trial)
                  for index, trial in enumerate(self.trials)]
        sign = -1.0 if self.plan.mode == "max" else 1.0
        scored.sort(key=lambda item: (item[0] is None, sign * item[0][0] if item[0] else 0.0, item[1]))
        return [trial for _, _, trial in scored]

    def best_trial(self) -> TrialRecord | None:
        ranked = self.ranked()
        return ranked[0] if ranked and ranked[0].best(self.plan.metric, self.plan.mode) else None

    def rows(self) -> list[dict[str, Any]]:
        """The table, best trial first."""
        metric = self.plan.metric
        rows = []
        for trial in self.ranked():
            best = trial.best(metric, self.plan.mode)
            values = {d.key: trial.params.get(d.key) for d in self.plan.dimensions}
            rows.append({"trial": trial.trial_id, **values,
                         f"best_{metric}": best[0] if best else None, "best_epoch": best[1] if best else None,
                         "epochs_run": trial.epochs_run, "stopped_early": trial.stopped_early,
                         "wall_s": None if trial.wall_s is None else round(trial.wall_s, 1),
                         "status": trial.status})
        return rows


def best_preset_text(results: SearchResults) -> str | None:
    """The best trial's finalized config as a preset YAML (run.name `<search>-best`), with a header
    saying where it comes from; None when no trial reported the metric."""
    best = results.best_trial()
    if best is None:
        return None
    config = results.plan.trial_config(best.params)
    config = replace(config, run=replace(config.run, name=f"{results.name}-best"))
    score, epoch = best.best(results.plan.metric, results.plan.mode)
    values = ", ".join(f"{key}={_cell(value)}" for key, value in best.params.items())
    header = (f"# Best trial {best.trial_id} of the search {results.name!r}: {values}\n"
              f"# best {results.plan.metric} {score:.2f} at epoch {epoch} of {best.epochs_run} run; "
              f"its run: {Path(best.folder).name}/ in the search's folder\n"
              f"# Train it: amldist train --config THIS_FILE (run.name {config.run.name})\n")
    return header + config_to_yaml(config)


def write_results(results: SearchResults, folder: Path) -> dict[str, Path]:
    """results.csv, results.json and (when a trial reported the metric) best.yaml in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = results.rows()
    written = {"csv": folder / RESULTS_CSV, "json": folder / RESULTS_JSON}
    atomic_write_text(written["csv"], _csv_text(rows))
    best = results.best_trial()
    atomic_write_json(written["json"], json_ready({
        "search": results.name, "metric": results.plan.metric, "mode": results.plan.mode,
        "space": [d.expression for d in results.plan.dimensions], "scheduler": results.plan.scheduler,
        "interrupted": results.interrupted, "best_trial": best.trial_id if best else None,
        "trials": rows, "curves": {t.trial_id: t.curve(results.plan.metric) for t in results.trials}}))
    preset = best_preset_text(results)
    if preset is not None:
        written["best"] = folder / BEST_PRESET
        atomic_write_text(written["best"], preset)
    return written


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def format_table(results: SearchResults) -> str:
    """The table as aligned text."""
    rows = results.rows()
    if not rows:
        return "no trials"
    columns = list(rows[0])
    cells = [[_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
