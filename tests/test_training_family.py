"""Loss families: each loss of the paper gets the family that builds its tuples, embeds what it needs
and asks for its negatives where they come from, and its loss accepts the batch the family builds."""

import numpy as np
import pytest
import torch

from amldist.config import build_loss_from_config, config_from_dict
from amldist.losses import LABELLED, LOSSES, REGRESSION, RELATIONAL
from amldist.mining import RANDOM_CLUSTERS, RANDOM_EXAMPLES
from amldist.training.family import (
    NO_NEGATIVES,
    RANDOM_NEGATIVES,
    STUDENT_POOL,
    TEACHER_POOL,
    LabelledTuples,
    RegressionTuples,
    RelationalTuples,
    tuple_family,
)
from amldist.training.plan import StepTuples
from amldist.training.step import VectorTable

DIM = 8


def config_of(**sections):
    base = {"model": {"arch": "small_cnn", "pretrained": False, "teacher": "vgg16", "projection_dim": 512}}
    return config_from_dict({**base, **sections})


def family_of(**sections):
    return tuple_family(config_of(**sections))


def test_family_follows_the_loss():
    contr_asym = family_of(loss={"name": "contrastive", "asym": True})
    assert (contr_asym.name, contr_asym.asym, contr_asym.use_self, contr_asym.mining) == \
        (LABELLED, True, False, "hard")
    assert (contr_asym.num_positives, contr_asym.num_negatives) == (1, 5)
    assert not contr_asym.students_references
    plus = family_of(loss={"name": "contr+"})
    assert plus.use_self and plus.asym
    sym = family_of(loss={"name": "contrastive", "asym": False})
    assert sym.students_references and not sym.use_self
    reg = family_of(loss={"name": "regression"})
    assert (reg.name, reg.num_negatives, reg.use_self, reg.mining) == (REGRESSION, 0, True, "none")
    rkd = family_of(loss={"name": "rkd"})
    assert (rkd.name, rkd.num_negatives, rkd.mining) == (RELATIONAL, 6, "random")  # 1 + 6 = a 7-image tuple
    assert rkd.students_references and not rkd.uses_pairs
    selfpos = family_of(loss={"name": "contrastive", "use_self": True, "use_negatives": False},
                        mining={"kind": "none"})
    assert (selfpos.num_negatives, selfpos.mining, selfpos.use_self) == (0, "none", True)


def test_negatives_come_from_where_the_setting_says():
    assert family_of(loss={"name": "contrastive", "asym": True}).negatives == TEACHER_POOL
    assert family_of(loss={"name": "triplet", "asym": False}).negatives == STUDENT_POOL
    ts_rand = family_of(loss={"name": "contrastive", "asym": True}, mining={"kind": "random"})
    assert (ts_rand.negatives, ts_rand.random_rule) == (RANDOM_NEGATIVES, RANDOM_CLUSTERS)
    darkrank = family_of(loss={"name": "darkrank"})
    assert (darkrank.negatives, darkrank.random_rule) == (RANDOM_NEGATIVES, RANDOM_EXAMPLES)
    assert family_of(loss={"name": "regression"}).negatives == NO_NEGATIVES
    no_negatives = family_of(loss={"name": "contrastive", "use_self": True, "use_negatives": False},
                             mining={"kind": "none"})
    assert no_negatives.negatives == NO_NEGATIVES


# Each loss of the paper in its usual setting: (loss section, family class, anchors are pair queries).
SETTINGS = {
    "contrastive": ({"name": "contrastive", "asym": False}, LabelledTuples, True),
    "contrastive_plus": ({"name": "contrastive_plus"}, LabelledTuples, True),
    "triplet": ({"name": "triplet", "asym": True}, LabelledTuples, True),
    "multi_similarity": ({"name": "multi_similarity", "asym": True}, LabelledTuples, True),
    "regression": ({"name": "regression"}, RegressionTuples, False),
    "rkd": ({"name": "rkd"}, RelationalTuples, False),
    "darkrank": ({"name": "darkrank"}, RelationalTuples, False),
}


def test_every_loss_of_the_paper_has_a_setting_here():
    assert set(SETTINGS) == set(LOSSES)


@pytest.mark.parametrize("loss", sorted(SETTINGS))
def test_each_loss_gets_the_vectors_its_family_says_and_accepts_the_batch(loss):
    section, family_class, uses_pairs = SETTINGS[loss]
    config = config_of(loss=section, mining={"num_negatives": 3})
    family = tuple_family(config)
    assert type(family) is family_class and family.uses_pairs == uses_pairs
    batch = 2
    anchors = np.array([0, 1])
    positives = np.arange(2, 2 + batch * family.num_positives).reshape(batch, family.num_positives)
    negatives = (100 + np.arange(batch * family.num_negatives)).reshape(batch, family.num_negatives)
    step = StepTuples(anchors, positives, negatives)
    references = set(positives.ravel()) | set(negatives.ravel())

    student_ids = set(family.student_image_ids(step).tolist())
    teacher_ids = set(family.teacher_image_ids(step).tolist())
    assert student_ids == ({0, 1} | references if family.students_references else {0, 1})
    expected_teacher = ({0, 1} if family.use_self or family_class is RelationalTuples else set())
    if family.asym or family_class is RelationalTuples:
        expected_teacher |= references
    assert teacher_ids == expected_teacher

    gen = torch.Generator().manual_seed(0)
    student_leaf = torch.randn(len(student_ids), DIM, generator=gen).requires_grad_()
    student = VectorTable(np.array(sorted(student_ids)), torch.nn.functional.normalize(student_leaf, dim=1))
    teacher = None
    if teacher_ids:
        vectors = torch.nn.functional.normalize(torch.randn(len(teacher_ids), DIM, generator=gen), dim=1)
        teacher = VectorTable(np.array(sorted(teacher_ids)), vectors)
    losses = build_loss_from_config(config)(family.loss_batch(step, student, teacher))
    assert losses.shape == (batch,) and torch.isfinite(losses).all()
    losses.sum().backward()
    assert student_leaf.grad is not None and student_leaf.grad.abs().sum() > 0  # the student side learns
