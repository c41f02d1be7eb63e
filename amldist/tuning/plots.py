"""The search's figure (no Ray): one panel per searched key, the trials' best metric against the value
they drew (log axis for log-scale dimensions; a cross marks a trial the scheduler stopped early, a star
the best), and a last panel with every trial's metric per epoch."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from amldist.demo.plots import save_figure
from amldist.tuning.results import SearchResults

METRIC_TITLES = {"val_map_asym": "val mAP, asym (%)", "val_map_sym": "val mAP, sym (%)",
                 "loss": "training loss"}


def plot_search(results: SearchResults, path: str | Path) -> Path:
    plan, metric = results.plan, results.plan.metric
    label = METRIC_TITLES.get(metric, metric)
    panels = len(plan.dimensions) + 1
    fig = Figure(figsize=(3.8 * panels, 3.5))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    colours = {trial.trial_id: f"C{i % 10}" for i, trial in enumerate(results.trials)}
    best = results.best_trial()
    for ax, dimension in zip(axes, plan.dimensions):
        for trial in results.trials:
            score, value = trial.best(metric, plan.mode), trial.params.get(dimension.key)
            if score is None or not isinstance(value, (int, float)):
                continue
            marker = "*" if trial is best else ("x" if trial.stopped_early else "o")
            ax.scatter([value], [score[0]], marker=marker, s=90 if trial is best else 40,
                       color=colours[trial.trial_id])
        if dimension.log_scale:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
        if dimension.function not in ("choice", "grid"):  # show the whole range
            ax.set_xlim(*_padded(dimension.args[0], dimension.args[1], dimension.log_scale))
        ax.set_xlabel(dimension.key)
        ax.set_ylabel(f"best {label}")
        ax.set_title(f"{dimension.function}{dimension.args}", fontsize=9)
        ax.grid(alpha=0.3)
    curves = axes[-1]
    for trial in results.trials:
        points = trial.curve(metric)
        if points:
            style = ":" if trial.stopped_early else "-"
            curves.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=3,
                        color=colours[trial.trial_id], label=trial.trial_id)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_xlabel("epoch (from 0, as metrics.jsonl)")
    curves.set_ylabel(label)
    curves.set_title("per trial (dotted: stopped early)", fontsize=9)
    curves.grid(alpha=0.3)
    if len(results.trials) <= 12:
        curves.legend(fontsize=7, frameon=False)
    fig.suptitle(f"search {results.name}: {len(results.trials)} trials, {plan.scheduler}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _padded(low: float, high: float, log: bool) -> tuple[float, float]:
    """The range with 4% room at each end (in log space for a log axis)."""
    if log:
        span = math.log10(high / low) * 0.04
        return low / 10 ** span, high * 10 ** span
    span = (high - low) * 0.04
    return low - span, high + span
