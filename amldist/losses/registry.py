"""One place for every loss of the paper: its family, its options and their defaults, and `build_loss`.

`build_loss(name, **options)` returns a callable taking a `TupleBatch` and returning the per-tuple
losses (B,); the training step reduces them (`loss.reduction`, one of REDUCTIONS). Training policy (the
default mining and learning rate of §4.1) lives in the config's resolution, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from amldist.errors import UserError
from amldist.losses.labelled import contrastive_loss, multi_similarity_loss, regression_loss, triplet_loss
from amldist.losses.relational import darkrank_loss, rkd_loss

MINING_KINDS = ("hard", "random", "none")
# Per-tuple losses (B,) -> the scalar to back-propagate. "sum" is the default: the error function (1)
# sums over anchors, and cirtorch/aml back-propagate every tuple's loss and accumulate the gradients,
# i.e. sum over a batch; the learning rates of §4.1 were tuned for that scale ("mean" divides every
# step by the batch size). Applied by `amldist.training.step.StepSettings.loss_scale`.
REDUCTIONS = ("sum", "mean")
# Loss families (what a tuple holds; `amldist.training.family`).
LABELLED, REGRESSION, RELATIONAL = "labelled", "regression", "relational"
PAPER_FORM = "paper"
CODE_FORM_ALIAS = "code"  # accepted everywhere for "this loss's budnikm/aml code variant"


@dataclass
class TupleBatch:
    """The tensors of a batch of B tuples; a loss reads only the fields it needs.

    anchors (B, D)          f(a), the student's anchors
    positives (B, P, D)     f(p) in sym mode, g(p) in asym mode
    negatives (B, N, D)     f(n) in sym mode, g(n) in asym mode
    anchor_teacher (B, D)   g(a), for SELF / Contr+ (10) and regression (7)
    student (B, K, D)       relational losses: f of each group, anchor first, then U(a)
    teacher (B, K, D)       relational losses: g of the same group
    """

    anchors: torch.Tensor | None = None
    positives: torch.Tensor | None = None
    negatives: torch.Tensor | None = None
    anchor_teacher: torch.Tensor | None = None
    student: torch.Tensor | None = None
    teacher: torch.Tensor | None = None

    def need(self, name: str, loss: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the {loss} loss needs TupleBatch.{name}, which is None")
        return value


@dataclass(frozen=True)
class LossSpec:
    """A loss of the paper and its defaults.

    family: LABELLED (pairs, positives and negatives), REGRESSION (the anchor against g(a)) or
      RELATIONAL (groups of random examples compared across the two spaces).
    forms: option defaults per form ("paper" first, then the code variant); the keys of a
      form are exactly the options it accepts besides `form`.
    similarity: "either" (sym or asym, the labelled losses), "asym" (regression is -s^asym),
      "none" (relational losses compare the two spaces themselves).
    """

    name: str
    equation: str
    family: str
    needs_teacher: bool
    similarity: str
    forms: Mapping[str, Mapping[str, Any]]
    compute: Callable[[TupleBatch, Mapping[str, Any]], torch.Tensor]
    margin_range: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def code_form(self) -> str:
        return next(form for form in self.forms if form != PAPER_FORM)


def _contrastive(batch: TupleBatch, opts: Mapping[str, Any]) -> torch.Tensor:
    name = "contrastive"
    return contrastive_loss(
        batch.need("anchors", name),
        batch.need("positives", name) if opts["use_positives"] else None,
        batch.need("negatives", name) if opts["use_negatives"] else None,
        batch.need("anchor_teacher", name) if opts["use_self"] else None,
        margin=opts["margin"], form=opts["form"])


def _triplet(batch: TupleBatch, opts: Mapping[str, Any]) -> torch.Tensor:
    return triplet_loss(batch.need("anchors", "triplet"), batch.need("positives", "triplet"),
                        batch.need("negatives", "triplet"), margin=opts["margin"], form=opts["form"])


def _multi_similarity(batch: TupleBatch, opts: Mapping[str, Any]) -> torch.Tensor:
    name = "multi_similarity"
    return multi_similarity_loss(batch.need("anchors", name), batch.need("positives", name),
                                 batch.need("negatives", name), margin=opts["margin"],
                                 alpha=opts["alpha"], beta=opts["beta"])


def _regression(batch: TupleBatch, opts: Mapping[str, Any]) -> torch.Tensor:
    return regression_loss(batch.need("anchors", "regression"),
                           batch.need("anchor_teacher", "regression"), form=opts["form"])


def _rkd(batch: TupleBatch, opts: Mapping[str, Any]) -> torch.Tensor:
    return rkd_loss(batch.need("student", "rkd"), batch.need("teacher", "rkd"),
                    angle_weight=opts["angle_weight"], distance_weight=opts["distance_weight"],
                    form=opts["form"])


def _darkrank(batch: TupleBatch, opts: Mapping[str, Any]) -> torch.Tensor:
    return darkrank_loss(batch.need("student", "darkrank"), batch.need("teacher", "darkrank"),
                         alpha=opts["alpha"], beta=opts.get("beta", 1.0),
                         list_length=opts["list_length"], form=opts["form"])


def _contrastive_forms(use_self: bool) -> dict[str, dict[str, Any]]:
    switches = {"use_self": use_self, "use_positives": True, "use_negatives": True}
    return {"paper": {"margin": 0.7, **switches}, "cirtorch": {"margin": 0.7, **switches}}


_CONTRASTIVE_MARGINS = {"paper": (-1.0, 1.0), "cirtorch": (0.0, 2.0)}  # similarity / distance
_LABELLED = {"family": LABELLED, "similarity": "either"}
_TEACHER_ONLY = {"needs_teacher": True}

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("contrastive", "(4)", needs_teacher=False, forms=_contrastive_forms(False),
             compute=_contrastive, margin_range=_CONTRASTIVE_MARGINS, **_LABELLED),
    LossSpec("contrastive_plus", "(10)", needs_teacher=True, forms=_contrastive_forms(True),
             compute=_contrastive, margin_range=_CONTRASTIVE_MARGINS, **_LABELLED),
    LossSpec("triplet", "(5)", needs_teacher=False, compute=_triplet,
             forms={"paper": {"margin": 0.1}, "aml": {"margin": 0.1}},
             margin_range={"paper": (0.0, 2.0), "aml": (0.0, 4.0)}, **_LABELLED),
    LossSpec("multi_similarity", "(6)", needs_teacher=False, compute=_multi_similarity,
             forms={"paper": {"margin": 0.6, "alpha": 1.0, "beta": 1.0},
                    "aml": {"margin": 0.5, "alpha": 2.0, "beta": 40.0}},
             margin_range={"paper": (-1.0, 1.0), "aml": (-1.0, 1.0)}, **_LABELLED),
    LossSpec("regression", "(7)", family=REGRESSION, similarity="asym",
             forms={"paper": {}, "cirtorch": {}}, compute=_regression, **_TEACHER_ONLY),
    LossSpec("rkd", "(8)", family=RELATIONAL, similarity="none",
             forms={"paper": {"angle_weight": 2.0, "distance_weight": 1.0},
                    "aml": {"angle_weight": 2.0, "distance_weight": 1.0}},
             compute=_rkd, **_TEACHER_ONLY),
    LossSpec("darkrank", "(9)", family=RELATIONAL, similarity="none",
             forms={"paper": {"alpha": 1.0, "list_length": None},
                    "aml": {"alpha": 3.0, "beta": 3.0, "list_length": 4}},
             compute=_darkrank, **_TEACHER_ONLY),
)}

# Other spellings: the paper's short names, preset-file names and budnikm/aml's --loss choices.
ALIASES = {
    "contr": "contrastive", "contr+": "contrastive_plus", "contrplus": "contrastive_plus",
    "contr_plus": "contrastive_plus", "contrastive+": "contrastive_plus", "triplet_loss": "triplet",
    "ms": "multi_similarity", "multi": "multi_similarity", "multisimilarity": "multi_similarity",
    "reg": "regression", "rkd_da": "rkd", "rkdad": "rkd", "dr": "darkrank", "dark": "darkrank",
}
# budnikm/aml --loss choices that are not losses of the paper.
NOT_IN_PAPER = ("contrastive_dist", "cross_entropy", "cross_entropy_dist")


def resolve_loss_name(name: str) -> str:
    """Canonical registry name for any accepted spelling; UserError naming `loss.name` otherwise."""
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in LOSSES:
        return key
    if key in NOT_IN_PAPER:
        raise UserError(f"loss.name: aml's {name!r} is not one of the paper's losses; "
                        f"choose from {', '.join(LOSSES)}")
    raise UserError(f"loss.name: unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def loss_spec(name: str) -> LossSpec:
    return LOSSES[resolve_loss_name(name)]


def resolve_form(spec: LossSpec, form: str | None) -> str:
    if form in (None, PAPER_FORM):
        return PAPER_FORM
    if form == CODE_FORM_ALIAS:
        return spec.code_form
    if form not in spec.forms:
        raise UserError(f"loss.form: the {spec.name} loss has no form {form!r}; "
                        f"choose from {', '.join(spec.forms)} (or 'code')")
    return form


def resolve_loss_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The complete options of a loss: the form's defaults updated with the given values.

    Options set to None take the default. An option the loss (in that form) does not take, or
    a value out of range, raises a UserError naming `loss.<option>`.
    """
    spec = loss_spec(name)
    given = {key: value for key, value in (options or {}).items() if value is not None}
    form = resolve_form(spec, given.pop("form", None))
    accepted = spec.forms[form]
    for key in given:
        if key not in accepted:
            takes = ", ".join(["form", *accepted])
            raise UserError(f"loss.{key}: the {spec.name} loss ({form} form) takes no such option; "
                            f"it takes {takes}")
    resolved = {**accepted, **given, "form": form}
    _check_option_values(spec, resolved)
    return resolved


def _check_option_values(spec: LossSpec, opts: Mapping[str, Any]) -> None:
    for key in ("margin", "alpha", "beta", "angle_weight", "distance_weight"):
        if key in opts:
            _require_number(key, opts[key])
    if "margin" in opts:
        low, high = spec.margin_range[opts["form"]]
        if not low <= opts["margin"] <= high:
            raise UserError(f"loss.margin: {opts['margin']} is out of range for the {spec.name} loss "
                            f"({opts['form']} form): expected {low} <= margin <= {high}")
    for key in ("alpha", "beta"):
        if key in opts and opts[key] <= 0:
            raise UserError(f"loss.{key}: must be > 0, got {opts[key]}")
    for key in ("angle_weight", "distance_weight"):
        if key in opts and opts[key] < 0:
            raise UserError(f"loss.{key}: must be >= 0, got {opts[key]}")
    length = opts.get("list_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise UserError(f"loss.list_length: must be a positive integer, got {length!r}")
    _check_switches(opts)


def _check_switches(opts: Mapping[str, Any]) -> None:
    switches = [key for key in ("use_self", "use_positives", "use_negatives") if key in opts]
    for key in switches:
        if not isinstance(opts[key], bool):
            raise UserError(f"loss.{key}: must be true or false, got {opts[key]!r}")
    if switches and not any(opts[key] for key in switches):
        raise UserError("loss.use_self: at least one of use_self, use_positives, use_negatives must be true")


def _require_number(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"loss.{key}: expected a number, got {value!r}")


@dataclass(frozen=True)
class TupleLoss:
    """A configured loss: `loss(batch) -> (B,)` per-tuple losses."""

    spec: LossSpec
    options: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, batch: TupleBatch) -> torch.Tensor:
        return self.spec.compute(batch, self.options)

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"TupleLoss({self.name}: {shown})"


def build_loss(name: str, **options: Any) -> TupleLoss:
    """The loss `name` (any accepted spelling) with its paper defaults, overridden by `options`."""
    spec = loss_spec(name)
    return TupleLoss(spec, resolve_loss_options(spec.name, options))


def needs_teacher(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether the loss reads the teacher even in sym mode (SELF term, regression, relational)."""
    spec = loss_spec(name)
    return spec.needs_teacher or bool((options or {}).get("use_self"))


_FAMILY_MINING = {LABELLED: ("hard", "random"), REGRESSION: ("none",), RELATIONAL: ("random",)}


def allowed_mining(name: str, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Mining kinds that make sense for the loss: labels allow hard negatives, the unlabelled relational
    losses draw random examples, regression has no negatives; a labelled loss without negatives needs none."""
    family = loss_spec(name).family
    if family == LABELLED and (options or {}).get("use_negatives") is False:
        return (*_FAMILY_MINING[family], "none")
    return _FAMILY_MINING[family]
