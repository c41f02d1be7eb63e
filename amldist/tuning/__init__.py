"""Hyper-parameter search without Ray: search spaces (`space`), the checked plan of a search (`plan`), its
results table and best preset (`results`) and its figure (`plots`). Ray Tune runs a plan in
`amldist.tune_search`; docs/TUNING.md describes the whole."""

from amldist.tuning.plan import SearchPlan, SearchSettings, plan_search
from amldist.tuning.results import SearchResults, TrialRecord, format_table
from amldist.tuning.space import Dimension, default_space, parse_dimension

__all__ = ["Dimension", "SearchPlan", "SearchResults", "SearchSettings", "TrialRecord", "default_space",
           "format_table", "parse_dimension", "plan_search"]
