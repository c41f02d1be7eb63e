"""Search spaces over config keys: `KEY=FUNCTION(ARGS)` expressions, a YAML `tune:` section, and the
default space of each loss (no Ray).

    parse_dimension("optim.lr=loguniform(1e-4, 1e-2)")   # Dimension("optim.lr", "loguniform", (1e-4, 1e-2))
    dimensions_from_section({"optim.lr": "loguniform(1e-4,1e-2)", "mining.num_negatives": [3, 5, 10]})
    default_space(config)                                 # lr and margin around the paper's §4.1 values

Expressions are parsed with a regular expression and plain number/YAML-scalar reading, never evaluated
as code. The functions are Ray Tune's sampling functions of the same name (`FUNCTIONS`); `grid` is
`tune.grid_search`. Every value a dimension can produce is checked against the config schema and its
ranges by `check_dimension` (`amldist.tuning.plan`), so a bad space is one line before Ray starts.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from amldist.config import Config
from amldist.config.resolve import default_lr
from amldist.config.schema import SECTIONS
from amldist.config.values import field_types, parse_scalar, split_key
from amldist.errors import UserError
from amldist.losses import LOSSES

# Function -> number of arguments (None: one or more values). Bounds are (low, high) with low < high;
# randint/lograndint draw low <= n < high, as Ray Tune's do; q* functions round to multiples of q.
FUNCTIONS: dict[str, int | None] = {
    "uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3, "randint": 2, "lograndint": 2,
    "choice": None, "grid": None,
}
LOG_FUNCTIONS = ("loguniform", "qloguniform", "lograndint")
INTEGER_FUNCTIONS = ("randint", "lograndint")
EXAMPLE = "optim.lr=loguniform(1e-5,1e-2)"
_EXPRESSION = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.]*)\s*=\s*(?P<function>[A-Za-z_]\w*)\s*"
                         r"\((?P<args>.*)\)\s*$", re.DOTALL)
# Default space: one decade either side of the paper's learning rate, margins +-0.2 within the loss's range.
LR_SPREAD, MARGIN_SPREAD = 10.0, 0.2


@dataclass(frozen=True)
class Dimension:
    """One searched config key: `function(*args)` in Ray Tune's terms."""

    key: str
    function: str
    args: tuple

    @property
    def log_scale(self) -> bool:
        return self.function in LOG_FUNCTIONS

    @property
    def expression(self) -> str:
        return f"{self.key}={self.function}({', '.join(_text(value) for value in self.args)})"

    def extremes(self) -> list[Any]:
        """The values to check against the config: the bounds of a range (the largest integer a
        randint can draw), every value of a choice or grid."""
        if FUNCTIONS[self.function] is None:
            return list(self.args)
        low, high = self.args[0], self.args[1]
        return [low, high - 1] if self.function in INTEGER_FUNCTIONS else [low, high]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "function": self.function, "args": list(self.args)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dimension:
        return cls(str(data["key"]), str(data["function"]), tuple(data["args"]))


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def parse_dimension(text: str, source: str = "--search") -> Dimension:
    """'KEY=FUNCTION(ARGS)' -> Dimension; UserError naming `source` and the expression otherwise."""
    match = _EXPRESSION.match(str(text))
    if not match:
        raise UserError(f"{source} {text!r}: expected KEY=FUNCTION(ARGS), e.g. {EXAMPLE}")
    where = f"{source} {text!r}"
    return make_dimension(match["key"], match["function"], _split_args(match["args"], where), where)


def make_dimension(key: str, function: str, raw_args: list[Any], where: str) -> Dimension:
    """A checked Dimension from a key, a function name and its raw arguments (texts or YAML values)."""
    try:
        split_key(key)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    if function not in FUNCTIONS:
        raise UserError(f"{where}: unknown function {function!r}; use {', '.join(FUNCTIONS)}")
    wanted = FUNCTIONS[function]
    if wanted is None:
        if not raw_args:
            raise UserError(f"{where}: {function} needs at least one value")
        return Dimension(key, function, tuple(_value(arg) for arg in raw_args))
    if len(raw_args) != wanted:
        raise UserError(f"{where}: {function} takes {wanted} numbers, got {len(raw_args)}")
    numbers = tuple(_number(arg, where) for arg in raw_args)
    _check_bounds(function, numbers, where)
    _check_field_type(key, function, numbers, where)
    return Dimension(key, function, numbers)


def _split_args(text: str, where: str) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        return []
    if any(not part for part in parts):
        raise UserError(f"{where}: an empty argument")
    return parts


def _value(raw: Any) -> Any:
    """A choice/grid value: a number, true/false/null, or a string (quotes optional)."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return parse_scalar(text)  # true/false/null as YAML reads them; anything else stays a string


def _number(raw: Any, where: str) -> int | float:
    value = _value(raw)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {raw!r} is not a finite number")
    return value


def _check_bounds(function: str, numbers: tuple, where: str) -> None:
    low, high = numbers[0], numbers[1]
    if low == high:
        raise UserError(f"{where}: empty range ({low} to {high}); use --set KEY=VALUE for one value")
    if low > high:
        raise UserError(f"{where}: inverted range: low {low} is above high {high}")
    if function in LOG_FUNCTIONS and low <= 0:
        raise UserError(f"{where}: {function} needs 0 < low, got {low}")
    if function in INTEGER_FUNCTIONS and not all(isinstance(n, int) for n in numbers):
        raise UserError(f"{where}: {function} takes integer bounds, got {low} and {high}")
    if len(numbers) == 3 and numbers[2] <= 0:
        raise UserError(f"{where}: the step q must be > 0, got {numbers[2]}")


def _check_field_type(key: str, function: str, numbers: tuple, where: str) -> None:
    """An integer field takes only integer draws; a switch or a name only choice/grid."""
    section, name = split_key(key)
    annotation = field_types(SECTIONS[section])[name] if section else str
    kinds = set(typing.get_args(annotation)) or {annotation}
    if int in kinds:
        integral = function in INTEGER_FUNCTIONS or (len(numbers) == 3 and float(numbers[2]).is_integer())
        if not integral:
            raise UserError(f"{where}: {key} is an integer; use randint(low, high), a q-function with an "
                            f"integer step, or choice(...)")
    elif float not in kinds:
        raise UserError(f"{where}: {key} is not a number; use choice(...) or grid(...)")


def dimensions_from_section(search: Any, source: str) -> list[Dimension]:
    """The `search:` mapping of a YAML `tune:` section: KEY: 'FUNCTION(ARGS)' or KEY: [values] (a choice)."""
    if search is None:
        return []
    if not isinstance(search, Mapping):
        example = EXAMPLE.replace("=", ": ")
        raise UserError(f"{source}: tune.search must map config keys to expressions, e.g. {example}")
    dimensions = []
    for key, spec in search.items():
        where = f"{source}: tune.search.{key}"
        if isinstance(spec, list):
            dimensions.append(make_dimension(str(key), "choice", spec, where))
        elif isinstance(spec, str):
            dimensions.append(parse_dimension(f"{key}={spec}", f"{source}: tune.search"))
        else:
            raise UserError(f"{where}: expected FUNCTION(ARGS) or a list of values, got {spec!r}")
    return dimensions


def merge_dimensions(*groups: Iterable[Dimension]) -> list[Dimension]:
    """Later groups replace earlier dimensions of the same key (command line over the YAML section);
    a key twice within one group is an error."""
    merged: dict[str, Dimension] = {}
    for group in groups:
        seen = set()
        for dimension in group:
            if dimension.key in seen:
                raise UserError(f"--search: {dimension.key} is searched twice")
            seen.add(dimension.key)
            merged[dimension.key] = dimension
    return list(merged.values())


def default_space(config: Config) -> list[Dimension]:
    """The space searched without --search: the initial learning rate one decade either side of the
    paper's §4.1 value for this loss and setting, and the margin (losses that have one) +-0.2 around the
    registry's default for the configured form, within the margin's valid range."""
    loss = config.loss
    lr = default_lr(loss.name, asym=bool(loss.asym), teacher=config.model.teacher, student=config.model.arch)
    dimensions = [Dimension("optim.lr", "loguniform", (lr / LR_SPREAD, lr * LR_SPREAD))]
    spec = LOSSES[loss.name]
    form_defaults = spec.forms[loss.form]
    if "margin" in form_defaults:
        low, high = spec.margin_range[loss.form]
        centre = form_defaults["margin"]
        bounds = (round(max(low, centre - MARGIN_SPREAD), 6), round(min(high, centre + MARGIN_SPREAD), 6))
        dimensions.append(Dimension("loss.margin", "uniform", bounds))
    return dimensions
