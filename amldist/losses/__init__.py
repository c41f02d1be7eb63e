"""Every loss of the paper on batches of tuples, and the registry of their defaults.

Pure functions return per-tuple losses (B,); the training step reduces them (REDUCTIONS). `build_loss`
configures one from the registry (`LOSSES`). Formulas, defaults and paper-vs-code differences:
docs/LOSSES.md.
"""

from amldist.losses.labelled import contrastive_loss, multi_similarity_loss, regression_loss, triplet_loss
from amldist.losses.registry import (
    ALIASES,
    LABELLED,
    LOSSES,
    MINING_KINDS,
    REDUCTIONS,
    REGRESSION,
    RELATIONAL,
    LossSpec,
    TupleBatch,
    TupleLoss,
    allowed_mining,
    build_loss,
    loss_spec,
    needs_teacher,
    resolve_loss_name,
    resolve_loss_options,
)
from amldist.losses.relational import darkrank_loss, huber, rkd_loss

__all__ = [
    "ALIASES", "LABELLED", "LOSSES", "MINING_KINDS", "REDUCTIONS", "REGRESSION", "RELATIONAL", "LossSpec",
    "TupleBatch", "TupleLoss", "allowed_mining", "build_loss", "contrastive_loss", "darkrank_loss", "huber",
    "loss_spec", "multi_similarity_loss", "needs_teacher", "regression_loss", "resolve_loss_name",
    "resolve_loss_options", "rkd_loss", "triplet_loss",
]
