"""What a hyper-parameter search is, decided and checked before Ray starts (no Ray).

    plan = plan_search(preset_dict("tiny-student-contrplus-asym"), searches=["loss.margin=uniform(0.6,1.0)"],
                       settings=SearchSettings(num_samples=4))
    plan.trial_config({"loss.margin": 0.8})     # the finalized Config of one trial

A plan holds the unresolved config every trial starts from (so a searched `loss.name` does not inherit
the previous loss's options), the searched dimensions, and the scheduler's settings. It is stored as
`search.json` beside the search's results, so `--resume` continues exactly the search that was started.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from amldist.config import Config, apply_overrides, config_from_dict
from amldist.errors import UserError, require
from amldist.training.validation import higher_is_better, selection_metric
from amldist.tuning.space import (
    Dimension,
    default_space,
    dimensions_from_section,
    merge_dimensions,
    parse_dimension,
)

SCHEDULERS = ("asha", "fifo")
METRICS = ("val_map_asym", "val_map_sym", "loss")
DEFAULT_NUM_SAMPLES = 8
DEFAULT_REDUCTION_FACTOR = 2
GRACE_SHARE = 5  # ASHA's first rung by default after a fifth of the epochs (at least one)
# Keys a search does not vary: every trial gets the same resources and its own run folder.
UNSEARCHABLE = {"run.num_workers": "pass --num-workers: every trial gets the same workers",
                "run.use_gpu": "pass --use-gpu: every trial gets the same workers",
                "run.name": "each trial has its own run folder inside the search's",
                "run.out_dir": "pass --storage"}


@dataclass(frozen=True)
class SearchSettings:
    """A search's settings as given (flags, or a YAML `tune:` section); None = not given."""

    num_samples: int | None = None
    scheduler: str | None = None
    metric: str | None = None
    max_concurrent: int | None = None
    grace_period: int | None = None
    reduction_factor: int | None = None

    def over(self, other: SearchSettings) -> SearchSettings:
        """These settings where given, else `other`'s."""
        return SearchSettings(**{f.name: _first(getattr(self, f.name), getattr(other, f.name))
                                 for f in fields(self)})


def _first(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


@dataclass(frozen=True)
class SearchPlan:
    base: dict[str, Any]              # unresolved nested config dict every trial starts from
    dimensions: tuple[Dimension, ...]
    num_samples: int                  # samples of the space (each grid point that many times)
    scheduler: str                    # asha or fifo
    metric: str                       # what picks the best trial (and what ASHA compares)
    max_epochs: int                   # the longest trial's run.epochs (ASHA's max_t)
    grace_period: int                 # ASHA: epochs before a trial can be stopped
    reduction_factor: int             # ASHA: 1/rf of the trials at a rung go on
    max_concurrent: int | None        # trials at once; None = as many as the cluster holds

    @property
    def mode(self) -> str:
        return "max" if higher_is_better(self.metric) else "min"

    def base_config(self) -> Config:
        return config_from_dict(self.base)

    def trial_config(self, params: Mapping[str, Any]) -> Config:
        """The finalized config of the trial that drew `params` ({dotted key: value})."""
        overrides = [(key, _plain(value)) for key, value in params.items()]
        return config_from_dict(apply_overrides(self.base, overrides))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dimensions"] = [dimension.to_dict() for dimension in self.dimensions]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchPlan:
        values = dict(data)
        values["dimensions"] = tuple(Dimension.from_dict(d) for d in values["dimensions"])
        return cls(**values)


def _plain(value: Any) -> Any:
    """A numpy scalar (Ray Tune draws them) as the Python number the config's type checks expect."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def settings_from_section(section: Any, source: str) -> tuple[SearchSettings, list[Dimension]]:
    """A YAML `tune:` section: `search:` (KEY: FUNCTION(ARGS) or a list) and the settings' names."""
    if section is None:
        return SearchSettings(), []
    if not isinstance(section, Mapping):
        raise UserError(f"{source}: the tune section must be a mapping (search, num_samples, scheduler, ...)")
    names = {f.name for f in fields(SearchSettings)}
    unknown = sorted(set(section) - names - {"search"})
    require(not unknown, f"{source}: unknown tune setting {', '.join(map(str, unknown))}; "
                         f"use search, {', '.join(sorted(names))}")
    settings = SearchSettings(**{name: section[name] for name in names if section.get(name) is not None})
    return settings, dimensions_from_section(section.get("search"), source)


def plan_search(base: Mapping[str, Any], *, searches: Iterable[str] = (), section: Any = None,
                settings: SearchSettings = SearchSettings(), source: str = "config") -> SearchPlan:
    """The checked plan of a search. `base`: the unresolved config (preset with --set applied); `searches`:
    KEY=FUNCTION(ARGS) texts; `section`: the preset's `tune:` section; `settings`: the command's flags,
    which win over the section's. Without any dimension, the loss's default space (tuning.space)."""
    base = dict(base)
    base_config = config_from_dict(base)
    from_section, section_dimensions = settings_from_section(section, source)
    given = settings.over(from_section)
    dimensions = merge_dimensions(section_dimensions, [parse_dimension(text) for text in searches])
    dimensions = dimensions or default_space(base_config)
    epochs = [base_config.run.epochs]
    for dimension in dimensions:
        epochs += check_dimension(base, dimension)
    metric = _metric(given.metric, base_config)
    max_epochs = max(epochs)
    grace = _count("grace_period", _first(given.grace_period, max(1, max_epochs // GRACE_SHARE)), 1)
    require(grace <= max_epochs, f"--grace-period {grace} is above the trials' {max_epochs} epochs")
    scheduler = _first(given.scheduler, "asha")
    require(scheduler in SCHEDULERS,
            f"--scheduler: unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    max_concurrent = given.max_concurrent
    if max_concurrent is not None:
        _count("max_concurrent", max_concurrent, 1)
    num_samples = _count("num_samples", _first(given.num_samples, DEFAULT_NUM_SAMPLES), 1)
    reduction = _count("reduction_factor", _first(given.reduction_factor, DEFAULT_REDUCTION_FACTOR), 2)
    return SearchPlan(base, tuple(dimensions), num_samples, scheduler, metric, max_epochs, grace, reduction,
                      max_concurrent)


def check_dimension(base: Mapping[str, Any], dimension: Dimension) -> list[int]:
    """Every extreme value of the dimension must give a valid config; returns their run.epochs."""
    if dimension.key in UNSEARCHABLE:
        raise UserError(f"--search {dimension.key}: not searchable; {UNSEARCHABLE[dimension.key]}")
    epochs = []
    for value in dimension.extremes():
        try:
            config = config_from_dict(apply_overrides(base, [(dimension.key, value)]))
        except UserError as err:
            raise UserError(f"--search {dimension.expression}: with {dimension.key}={value}: {err}") from None
        epochs.append(config.run.epochs)
    return epochs


def _metric(requested: str | None, config: Config) -> str:
    """The requested metric if the trials report it; default: what each run picks its best model by."""
    has_teacher = config.model.teacher is not None  # the val teacher store exists exactly then
    default = selection_metric(config, has_teacher_store=has_teacher)
    if requested is None:
        return default
    require(requested in METRICS, f"--metric: unknown metric {requested!r}; choose from {', '.join(METRICS)}")
    if requested != "loss":
        require(bool(config.run.val_freq), f"--metric {requested}: the runs never validate "
                                           "(run.val_freq: 0); use --metric loss or set run.val_freq")
        require(requested != "val_map_asym" or has_teacher,
                "--metric val_map_asym: the runs have no teacher (model.teacher), so no asymmetric val mAP")
    return requested


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--{name.replace('_', '-')}: must be an integer >= {minimum}, got {value!r}")
    return value
