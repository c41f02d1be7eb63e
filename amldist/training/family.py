"""Loss families: what a training tuple holds, who embeds what, and where its negatives come from (no Ray).

The one place that tells the families of the paper's losses apart; the plan, the step and the epoch
ask a family object instead of branching on the loss. `tuple_family(config)` builds it from the
loss's family in the registry (`amldist.losses.LOSSES[name].family`):

- labelled (contrastive (4), Contr+ (10), triplet (5), multi-similarity (6)): an anchor is a query of
  the split's (qidxs, pidxs) pairs, with positive(s) from the pairs and negatives mined hard or drawn at
  random. Asymmetric (3): only the anchors go through the student, references are teacher vectors;
  symmetric (2): every image goes through the student. Contr+ / SELF also read the anchor's g(a);
- regression (7): the anchor alone, against its own teacher vector. Anchors are random training images,
  as aml's `reg` mode draws them (it needs no pairs);
- relational (RKD (8), DarkRank (9)): the anchor and `num_positives + num_negatives` random examples (the
  size of a labelled tuple, §4.1), all through the student and all with their teacher vectors; being
  unlabelled, their anchors are random training images too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from amldist.losses import LABELLED, LOSSES, REGRESSION, RELATIONAL, TupleBatch
from amldist.mining import RANDOM_CLUSTERS, RANDOM_EXAMPLES
from amldist.training.plan import StepTuples

if TYPE_CHECKING:
    from amldist.training.step import VectorTable

# Where a tuple's negatives come from (`TupleFamily.negatives`).
NO_NEGATIVES = "none"
RANDOM_NEGATIVES = "random"        # the miner draws them from the epoch's pool (seed, epoch)
TEACHER_POOL = "teacher pool"      # asymmetric hard mining: the miner searches the teacher's pool vectors
STUDENT_POOL = "student pool"      # symmetric hard mining: the ranks search the student's pool vectors


@dataclass(frozen=True)
class TupleFamily:
    """What one training tuple holds; subclasses say what that means for each family."""

    asym: bool              # references are teacher vectors (3), else student ones (2)
    num_positives: int      # positives per tuple (0 when the loss does not use them)
    num_negatives: int      # negatives per tuple; relational: random examples besides the anchor
    use_self: bool          # the anchor's own teacher vector g(a) takes part (Contr+, SELF, regression)
    mining: str             # hard, random or none

    name: ClassVar[str]
    uses_pairs: ClassVar[bool] = False    # anchors are pair queries, else random training images
    random_rule: ClassVar[str] = RANDOM_CLUSTERS  # how random negatives are drawn (mining.RANDOM_RULES)

    @property
    def students_references(self) -> bool:
        """Positives, negatives and examples go through the student as well as the anchors."""
        return False

    @property
    def negatives(self) -> str:
        """Where this tuple's negatives come from: NO_NEGATIVES, RANDOM_NEGATIVES, TEACHER_POOL,
        STUDENT_POOL."""
        if self.mining == "none" or self.num_negatives == 0:
            return NO_NEGATIVES
        if self.mining == "random":
            return RANDOM_NEGATIVES
        return TEACHER_POOL if self.asym else STUDENT_POOL

    def student_image_ids(self, tuples: StepTuples) -> np.ndarray:
        """The distinct images the student embeds in this step, sorted: (U,). An image that appears in
        several tuples is embedded once; its gradient contributions add up as if embedded each time."""
        parts = [tuples.anchors]
        if self.students_references:
            parts += [tuples.positives.ravel(), tuples.negatives.ravel()]
        return np.unique(np.concatenate(parts))

    def teacher_image_ids(self, tuples: StepTuples) -> np.ndarray:
        """The distinct images whose teacher vectors the step reads, sorted: (T,), possibly empty."""
        parts = [tuples.anchors] if self.use_self else []
        if self.asym:
            parts += [tuples.positives.ravel(), tuples.negatives.ravel()]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def loss_batch(self, tuples: StepTuples, student: VectorTable, teacher: VectorTable | None) -> TupleBatch:
        """The loss's view of the step, from the student's and the teacher's vectors by image id."""
        raise NotImplementedError


@dataclass(frozen=True)
class LabelledTuples(TupleFamily):
    name: ClassVar[str] = LABELLED
    uses_pairs: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config) -> LabelledTuples:
        loss, mining = config.loss, config.mining
        positives = mining.num_positives if loss.use_positives is not False else 0
        negatives = mining.num_negatives if loss.use_negatives is not False else 0
        return cls(bool(loss.asym), positives, negatives, bool(loss.use_self),
                   mining.kind if negatives else "none")

    @property
    def students_references(self) -> bool:
        return not self.asym

    def loss_batch(self, tuples: StepTuples, student: VectorTable, teacher: VectorTable | None) -> TupleBatch:
        references = teacher if self.asym else student
        positives = references.rows(tuples.positives) if tuples.positives.shape[1] else None
        negatives = references.rows(tuples.negatives) if tuples.negatives.shape[1] else None
        return TupleBatch(anchors=student.rows(tuples.anchors), positives=positives, negatives=negatives,
                          anchor_teacher=teacher.rows(tuples.anchors) if self.use_self else None)


@dataclass(frozen=True)
class RegressionTuples(TupleFamily):
    name: ClassVar[str] = REGRESSION

    @classmethod
    def from_config(cls, config) -> RegressionTuples:
        return cls(asym=True, num_positives=0, num_negatives=0, use_self=True, mining="none")

    def loss_batch(self, tuples: StepTuples, student: VectorTable, teacher: VectorTable | None) -> TupleBatch:
        return TupleBatch(anchors=student.rows(tuples.anchors), anchor_teacher=teacher.rows(tuples.anchors))


@dataclass(frozen=True)
class RelationalTuples(TupleFamily):
    name: ClassVar[str] = RELATIONAL
    random_rule: ClassVar[str] = RANDOM_EXAMPLES

    @classmethod
    def from_config(cls, config) -> RelationalTuples:
        examples = config.mining.num_positives + config.mining.num_negatives
        return cls(asym=False, num_positives=0, num_negatives=examples, use_self=False, mining="random")

    @property
    def students_references(self) -> bool:
        return True

    def teacher_image_ids(self, tuples: StepTuples) -> np.ndarray:
        return np.unique(np.concatenate([tuples.anchors, tuples.positives.ravel(), tuples.negatives.ravel()]))

    def loss_batch(self, tuples: StepTuples, student: VectorTable, teacher: VectorTable | None) -> TupleBatch:
        group = np.concatenate([tuples.anchors[:, None], tuples.negatives], axis=1)  # (b, K): anchor first
        return TupleBatch(student=student.rows(group), teacher=teacher.rows(group))


FAMILIES: dict[str, type[TupleFamily]] = {family.name: family
                                          for family in (LabelledTuples, RegressionTuples, RelationalTuples)}


def tuple_family(config) -> TupleFamily:
    """The family object of a finalized amldist.config.Config."""
    return FAMILIES[LOSSES[config.loss.name].family].from_config(config)
