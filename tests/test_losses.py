"""Every loss against a naive per-tuple implementation written from the paper's equation.

The naive versions loop over tuples (and over examples) in Python with 1-D vectors, so they
share nothing with the vectorised code but torch's elementary ops.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from amldist.config.resolve import DEFAULT_MINING, default_lr
from amldist.errors import UserError
from amldist.losses import (
    LABELLED,
    LOSSES,
    TupleBatch,
    allowed_mining,
    build_loss,
    contrastive_loss,
    darkrank_loss,
    loss_spec,
    multi_similarity_loss,
    needs_teacher,
    regression_loss,
    resolve_loss_name,
    rkd_loss,
    triplet_loss,
)
from amldist.similarity import group_distances, self_similarity, tuple_distances, tuple_similarity

SIZES = [(1, 1, 1), (3, 1, 5), (4, 2, 3), (10, 1, 5)]  # (B, P, N)
TOLERANCES = {torch.float64: {"rtol": 1e-6, "atol": 1e-9}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
EPS = 1e-6  # cirtorch's offset inside the distance


# ---------------------------------------------------------------- naive references, one tuple at a time

def cos(u, v):
    return (u @ v) / (u.norm() * v.norm())


def relu(x):
    return torch.clamp(x, min=0)


def huber(e):
    return 0.5 * e * e if abs(e.item()) < 1 else e.abs() - 0.5


def naive_contrastive(a, positives, negatives, self_refs, m):
    """(4), (10): sum_n [s(a,n) - m]_+ - sum_p s(a,p) - s(a, g(a))."""
    out = []
    for b in range(a.shape[0]):
        loss = a.new_zeros(())
        if negatives is not None:
            for n in negatives[b]:
                loss = loss + relu(cos(a[b], n) - m)
        if positives is not None:
            for p in positives[b]:
                loss = loss - cos(a[b], p)
        if self_refs is not None:
            loss = loss - cos(a[b], self_refs[b])
        out.append(loss)
    return torch.stack(out)


def naive_contrastive_cirtorch(a, positives, negatives, self_refs, m):
    """0.5 D^2 for positives (and self), 0.5 max(0, m - D)^2 for negatives, D = ||a - x + eps||."""
    def dist(u, v):
        return ((u - v + EPS) ** 2).sum().sqrt()
    out = []
    for b in range(a.shape[0]):
        loss = a.new_zeros(())
        attracted = list(positives[b]) if positives is not None else []
        attracted += [self_refs[b]] if self_refs is not None else []
        for x in attracted:
            loss = loss + 0.5 * dist(a[b], x) ** 2
        for n in (negatives[b] if negatives is not None else []):
            loss = loss + 0.5 * relu(m - dist(a[b], n)) ** 2
        out.append(loss)
    return torch.stack(out)


def naive_triplet(a, positives, negatives, m, squared_l2=False):
    """(5) over P(a) x N(a); aml: squared L2 distances instead of similarities."""
    out = []
    for b in range(a.shape[0]):
        loss = a.new_zeros(())
        for p in positives[b]:
            for n in negatives[b]:
                if squared_l2:
                    loss = loss + relu(((a[b] - p) ** 2).sum() - ((a[b] - n) ** 2).sum() + m)
                else:
                    loss = loss + relu(cos(a[b], n) - cos(a[b], p) + m)
        out.append(loss)
    return torch.stack(out)


def naive_multi_similarity(a, positives, negatives, m, alpha, beta):
    """(6)."""
    out = []
    for b in range(a.shape[0]):
        pos = sum(torch.exp(-alpha * (cos(a[b], p) - m)) for p in positives[b])
        neg = sum(torch.exp(beta * (cos(a[b], n) - m)) for n in negatives[b])
        out.append(torch.log(1 + pos) / alpha + torch.log(1 + neg) / beta)
    return torch.stack(out)


def naive_regression(a, t):
    """(7): -sim(f(a), g(a))."""
    return torch.stack([-cos(a[b], t[b]) for b in range(a.shape[0])])


def naive_rkd_paper(student, teacher, w_angle=2.0, w_dist=1.0):
    """(8) with psi = ||a - x|| (normalised by the mean over U(a)) and sim(x - a, y - a), Huber."""
    out = []
    for s, t in zip(student, teacher):
        others = range(1, s.shape[0])
        ds = [(s[0] - s[x]).norm() for x in others]
        dt = [(t[0] - t[x]).norm() for x in others]
        mean_s, mean_t = sum(ds) / len(ds), sum(dt) / len(dt)
        dist = sum(huber(ds[i] / mean_s - dt[i] / mean_t) for i in range(len(ds)))
        angle = sum(huber(cos(s[x] - s[0], s[y] - s[0]) - cos(t[x] - t[0], t[y] - t[0]))
                    for x in others for y in others)
        out.append(w_angle * angle + w_dist * dist)
    return torch.stack(out)


def naive_rkd_aml(student, teacher, w_angle=2.0, w_dist=1.0):
    """RKD's code: all K^2 pairs and K^3 triples of the group, Huber averaged."""
    def direction_cos(g, v, i, j):
        if i == v or j == v:
            return g.new_zeros(())
        return cos(g[i] - g[v], g[j] - g[v])

    out = []
    for s, t in zip(student, teacher):
        k = s.shape[0]
        pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
        mean_s = sum((s[i] - s[j]).norm() for i, j in pairs) / len(pairs)
        mean_t = sum((t[i] - t[j]).norm() for i, j in pairs) / len(pairs)
        dist = sum(huber((s[i] - s[j]).norm() / mean_s - (t[i] - t[j]).norm() / mean_t)
                   for i, j in pairs) / k ** 2
        angle = sum(huber(direction_cos(s, v, i, j) - direction_cos(t, v, i, j))
                    for v, i, j in itertools.product(range(k), repeat=3)) / k ** 3
        out.append(w_angle * angle + w_dist * dist)
    return torch.stack(out)


def naive_darkrank(student, teacher, alpha=1.0, beta=3.0, list_length=None, distance=False):
    """(9): -sum_x ( s(a,x) - log sum_{y in V(a,x)} exp s(a,y) ), V from the teacher."""
    def score(g, x):
        if distance:
            return -alpha * (g[0] - g[x]).norm() ** beta
        return alpha * cos(g[0], g[x])

    out = []
    for s, t in zip(student, teacher):
        others = list(range(1, s.shape[0]))
        if list_length is not None:
            others = sorted(others, key=lambda x: -score(t, x).item())[:list_length]
        loss = s.new_zeros(())
        for x in others:
            below = [y for y in others if score(t, y) <= score(t, x)]
            loss = loss - (score(s, x) - torch.log(sum(torch.exp(score(s, y)) for y in below)))
        out.append(loss)
    return torch.stack(out)


# ---------------------------------------------------------------- helpers

def random_vectors(shape, dtype, generator):
    """Random directions with norms in [0.5, 2]: the paper forms must not care about the norm."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    scale = 0.5 + 1.5 * torch.rand(*shape[:-1], 1, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True) * scale).to(dtype).requires_grad_(True)


def unit_vectors(shape, dtype, generator):
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype).requires_grad_(True)


def assert_same_values_and_gradients(fast, naive, inputs, dtype):
    """Forward and the gradient of a randomly weighted sum (so each tuple's gradient counts)."""
    tol = TOLERANCES[dtype]
    out_fast, out_naive = fast(*inputs), naive(*inputs)
    assert out_fast.shape == out_naive.shape == (inputs[0].shape[0],)
    torch.testing.assert_close(out_fast, out_naive, **tol)
    weights = torch.linspace(0.5, 1.5, out_fast.shape[0], dtype=dtype)
    trainable = [x for x in inputs if x.requires_grad]
    grads_fast = torch.autograd.grad((weights * out_fast).sum(), trainable, allow_unused=True)
    grads_naive = torch.autograd.grad((weights * out_naive).sum(), trainable, allow_unused=True)
    for g_fast, g_naive in zip(grads_fast, grads_naive):
        if g_naive is None:  # an input a switched-off term does not read
            assert g_fast is None or torch.count_nonzero(g_fast) == 0
        else:
            torch.testing.assert_close(g_fast, g_naive, **tol)


# ---------------------------------------------------------------- labelled losses vs naive

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("switches", [(False, True, True), (True, True, True), (False, True, False),
                                      (True, True, False), (True, False, False), (False, False, True)])
def test_contrastive_paper_matches_naive(dtype, sizes, switches):
    use_self, use_pos, use_neg = switches
    b, p, n = sizes
    g = torch.Generator().manual_seed(hash((sizes, switches)) % 2**31)
    a, pos, neg, self_refs = (random_vectors(s, dtype, g) for s in [(b, 8), (b, p, 8), (b, n, 8), (b, 8)])
    # Margin 0 puts most negatives on the active side of the hinge.
    for margin in (0.7, 0.0):
        def fast(a, pos, neg, t, margin=margin):
            return contrastive_loss(a, pos if use_pos else None, neg if use_neg else None,
                                    t if use_self else None, margin=margin)

        def naive(a, pos, neg, t, margin=margin):
            return naive_contrastive(a, pos if use_pos else None, neg if use_neg else None,
                                     t if use_self else None, margin)
        assert_same_values_and_gradients(fast, naive, (a, pos, neg, self_refs), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("use_self", [False, True])
def test_contrastive_cirtorch_matches_naive(dtype, sizes, use_self):
    b, p, n = sizes
    g = torch.Generator().manual_seed(11 + b * 7 + n)
    a, pos, neg, self_refs = (unit_vectors(s, dtype, g) for s in [(b, 8), (b, p, 8), (b, n, 8), (b, 8)])
    # margin 1.5 > most unit-vector distances, so the negative hinge is active.
    for margin in (0.7, 1.5):
        def fast(a, pos, neg, t, margin=margin):
            return contrastive_loss(a, pos, neg, t if use_self else None, margin=margin, form="cirtorch")

        def naive(a, pos, neg, t, margin=margin):
            return naive_contrastive_cirtorch(a, pos, neg, t if use_self else None, margin)
        assert_same_values_and_gradients(fast, naive, (a, pos, neg, self_refs), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", SIZES)
def test_triplet_matches_naive(dtype, sizes):
    b, p, n = sizes
    g = torch.Generator().manual_seed(23 + b + 3 * n)
    a, pos, neg = (unit_vectors(s, dtype, g) for s in [(b, 6), (b, p, 6), (b, n, 6)])
    for margin in (0.1, 0.5):
        assert_same_values_and_gradients(
            lambda a, pos, neg, m=margin: triplet_loss(a, pos, neg, margin=m),
            lambda a, pos, neg, m=margin: naive_triplet(a, pos, neg, m), (a, pos, neg), dtype)
        assert_same_values_and_gradients(
            lambda a, pos, neg, m=margin: triplet_loss(a, pos, neg, margin=m, form="aml"),
            lambda a, pos, neg, m=margin: naive_triplet(a, pos, neg, m, squared_l2=True), (a, pos, neg),
            dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("params", [(0.6, 1.0, 1.0), (0.5, 2.0, 40.0)])
def test_multi_similarity_matches_naive(dtype, sizes, params):
    margin, alpha, beta = params
    b, p, n = sizes
    g = torch.Generator().manual_seed(5 + b + n)
    a, pos, neg = (random_vectors(s, dtype, g) for s in [(b, 6), (b, p, 6), (b, n, 6)])
    assert_same_values_and_gradients(
        lambda a, pos, neg: multi_similarity_loss(a, pos, neg, margin=margin, alpha=alpha, beta=beta),
        lambda a, pos, neg: naive_multi_similarity(a, pos, neg, margin, alpha, beta), (a, pos, neg), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 4, 10])
def test_regression_matches_naive(dtype, batch):
    g = torch.Generator().manual_seed(batch)
    a, t = random_vectors((batch, 8), dtype, g), random_vectors((batch, 8), dtype, g)
    assert_same_values_and_gradients(regression_loss, naive_regression, (a, t), dtype)


# ---------------------------------------------------------------- relational losses vs naive

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (5, 7)])  # (B, K)
def test_rkd_matches_naive(dtype, shape):
    g = torch.Generator().manual_seed(shape[0] * 10 + shape[1])
    student = random_vectors((*shape, 6), dtype, g)
    teacher = random_vectors((*shape, 5), dtype, g).detach()  # the spaces may differ in dimension
    assert_same_values_and_gradients(lambda s, t: rkd_loss(s, t), naive_rkd_paper, (student, teacher), dtype)
    assert_same_values_and_gradients(lambda s, t: rkd_loss(s, t, form="aml"), naive_rkd_aml,
                                     (student, teacher), dtype)
    assert_same_values_and_gradients(
        lambda s, t: rkd_loss(s, t, angle_weight=0.5, distance_weight=3.0),
        lambda s, t: naive_rkd_paper(s, t, 0.5, 3.0), (student, teacher), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (5, 7)])
def test_darkrank_matches_naive(dtype, shape):
    g = torch.Generator().manual_seed(100 + shape[0] * 10 + shape[1])
    student, teacher = random_vectors((*shape, 6), dtype, g), random_vectors((*shape, 6), dtype, g).detach()
    assert_same_values_and_gradients(lambda s, t: darkrank_loss(s, t), naive_darkrank, (student, teacher),
                                     dtype)
    # Unit vectors for the distance scores (as the nets output): the naive exp would underflow
    # in float32 at the distances of the scaled vectors.
    unit_student, unit_teacher = unit_vectors((*shape, 6), dtype, g), unit_vectors((*shape, 6), dtype, g)
    assert_same_values_and_gradients(
        lambda s, t: darkrank_loss(s, t, alpha=3.0, beta=3.0, list_length=4, form="aml"),
        lambda s, t: naive_darkrank(s, t, 3.0, 3.0, 4, distance=True), (unit_student, unit_teacher.detach()),
        dtype)
    assert_same_values_and_gradients(
        lambda s, t: darkrank_loss(s, t, alpha=2.0, list_length=2),
        lambda s, t: naive_darkrank(s, t, 2.0, list_length=2), (student, teacher), dtype)


def test_darkrank_ties_in_the_teacher_share_their_lists():
    """V(a, x) holds every y with S(a,y) <= S(a,x): tied examples are in each other's sets."""
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]]], dtype=torch.float64)
    student = torch.randn(1, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(darkrank_loss(student, teacher), naive_darkrank(student, teacher))


def test_gradcheck_against_finite_differences():
    g = torch.Generator().manual_seed(0)
    a, pos, neg, t = (random_vectors(s, torch.float64, g) for s in [(2, 5), (2, 1, 5), (2, 3, 5), (2, 5)])
    assert torch.autograd.gradcheck(lambda *x: contrastive_loss(*x, margin=0.0), (a, pos, neg, t))
    assert torch.autograd.gradcheck(lambda *x: contrastive_loss(*x, margin=1.5, form="cirtorch"),
                                    (a, pos, neg, t))
    assert torch.autograd.gradcheck(lambda *x: multi_similarity_loss(*x, alpha=2.0, beta=5.0), (a, pos, neg))
    s = random_vectors((2, 4, 5), torch.float64, g)
    teacher = random_vectors((2, 4, 5), torch.float64, g).detach()
    assert torch.autograd.gradcheck(lambda x: rkd_loss(x, teacher), (s,))
    assert torch.autograd.gradcheck(lambda x: rkd_loss(x, teacher, form="aml"), (s,))
    assert torch.autograd.gradcheck(lambda x: darkrank_loss(x, teacher), (s,))


# ---------------------------------------------------------------- identities of the paper

def asym_batch(dtype=torch.float64, b=4, p=2, n=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TupleBatch(anchors=random_vectors((b, d), dtype, g),
                      positives=random_vectors((b, p, d), dtype, g).detach(),
                      negatives=random_vectors((b, n, d), dtype, g).detach(),
                      anchor_teacher=random_vectors((b, d), dtype, g).detach())


@pytest.mark.parametrize("form", ["paper", "cirtorch"])
def test_regression_is_contrastive_with_only_the_self_positive(form):
    batch = asym_batch()
    only_self = build_loss("contrastive", form=form, use_self=True, use_positives=False, use_negatives=False)
    regression = build_loss("regression", form=form)
    value_c, value_r = only_self(batch), regression(batch)
    torch.testing.assert_close(value_c, value_r, rtol=1e-12, atol=1e-12)
    grad_c, = torch.autograd.grad(value_c.sum(), batch.anchors)
    grad_r, = torch.autograd.grad(value_r.sum(), batch.anchors)
    torch.testing.assert_close(grad_c, grad_r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["paper", "cirtorch"])
def test_contr_plus_is_contrastive_plus_the_self_term(form):
    batch = asym_batch(seed=1)
    plus = build_loss("contr+", form=form)(batch)
    contr = build_loss("contrastive", form=form)(batch)
    if form == "paper":
        self_term = -self_similarity(batch.anchors, batch.anchor_teacher)
    else:
        self_term = 0.5 * ((batch.anchors - batch.anchor_teacher + EPS) ** 2).sum(dim=1)
    torch.testing.assert_close(plus, contr + self_term, rtol=1e-12, atol=1e-12)
    assert torch.all(plus != contr)


def test_table2_switches_pick_their_terms():
    batch = asym_batch(seed=2)
    a, p, n, t = batch.anchors, batch.positives, batch.negatives, batch.anchor_teacher
    pos_only = build_loss("contrastive", use_negatives=False)(batch)
    torch.testing.assert_close(pos_only, -tuple_similarity(a, p).sum(dim=1))
    self_pos = build_loss("contrastive", use_self=True, use_negatives=False)(batch)
    torch.testing.assert_close(self_pos, pos_only - self_similarity(a, t))
    neg_only = build_loss("contrastive", use_positives=False, margin=-1.0)(batch)
    torch.testing.assert_close(neg_only, (tuple_similarity(a, n) + 1.0).sum(dim=1))


# ---------------------------------------------------------------- sym vs asym

class TwoLinearModels:
    """A student W and a fixed teacher V acting on the same inputs: f(x) = x W, g(x) = x V."""

    def __init__(self, seed=0, in_dim=6, dim=4):
        g = torch.Generator().manual_seed(seed)
        self.student = torch.randn(in_dim, dim, generator=g, dtype=torch.float64, requires_grad=True)
        self.teacher = torch.randn(in_dim, dim, generator=g, dtype=torch.float64)
        self.x_anchor = torch.randn(3, in_dim, generator=g, dtype=torch.float64)
        self.x_pos = torch.randn(3, 1, in_dim, generator=g, dtype=torch.float64)
        self.x_neg = torch.randn(3, 5, in_dim, generator=g, dtype=torch.float64)

    def batch(self, asym: bool) -> TupleBatch:
        refs_model = self.teacher if asym else self.student
        return TupleBatch(anchors=self.x_anchor @ self.student, positives=self.x_pos @ refs_model,
                          negatives=self.x_neg @ refs_model, anchor_teacher=self.x_anchor @ self.teacher)


@pytest.mark.parametrize("name", ["contrastive", "contrastive_plus", "triplet", "multi_similarity"])
def test_asym_gradient_flows_through_anchors_only_sym_through_references_too(name):
    models = TwoLinearModels()
    loss = build_loss(name, margin=0.0) if name != "multi_similarity" else build_loss(name)
    grads = {}
    for asym in (False, True):
        batch = models.batch(asym)
        batch.anchors.retain_grad()
        grads[asym], = torch.autograd.grad(loss(batch).sum(), models.student, retain_graph=True)
        # The part of dJ/dW that reaches W through the anchors: x_a^T dJ/da.
        d_anchor, = torch.autograd.grad(loss(batch).sum(), batch.anchors)
        through_anchors = models.x_anchor.T @ d_anchor
        if asym:
            torch.testing.assert_close(grads[asym], through_anchors)
        else:
            assert not torch.allclose(grads[asym], through_anchors)
    assert not torch.allclose(grads[False], grads[True])


@pytest.mark.parametrize("name", ["rkd", "darkrank"])
def test_relational_losses_never_send_gradient_into_the_teacher(name):
    g = torch.Generator().manual_seed(4)
    student = random_vectors((3, 5, 6), torch.float64, g)
    teacher = random_vectors((3, 5, 6), torch.float64, g)  # requires grad, on purpose
    build_loss(name)(TupleBatch(student=student, teacher=teacher)).sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.count_nonzero(student.grad) > 0


# ---------------------------------------------------------------- code variants on hand-computed examples

A = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
P = torch.tensor([[[0.6, 0.8]]], dtype=torch.float64)   # cos 0.6, |a-p|^2 = 0.8
N = torch.tensor([[[0.8, 0.6]]], dtype=torch.float64)   # cos 0.8, |a-n|^2 = 0.4


def test_cirtorch_contrastive_hand_example():
    pos = 0.5 * ((0.4 + EPS) ** 2 + (-0.8 + EPS) ** 2)
    dist_neg = math.sqrt((0.2 + EPS) ** 2 + (-0.6 + EPS) ** 2)
    neg = 0.5 * (0.7 - dist_neg) ** 2
    got = contrastive_loss(A, P, N, margin=0.7, form="cirtorch")
    assert got.item() == pytest.approx(pos + neg, rel=1e-12)
    assert got.item() == pytest.approx(0.4022807, abs=1e-6)
    # The paper form on the same tuple: [0.8 - 0.7]_+ - 0.6 = -0.5.
    assert contrastive_loss(A, P, N, margin=0.7).item() == pytest.approx(-0.5, rel=1e-12)


def test_aml_multi_similarity_hand_example():
    loss = build_loss("ms", form="aml")  # lambda 0.5, alpha 2, beta 40
    got = loss(TupleBatch(anchors=A, positives=P, negatives=N)).item()
    expected = 0.5 * math.log(1 + math.exp(-2 * 0.1)) + math.log(1 + math.exp(40 * 0.3)) / 40
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(0.5990696, abs=1e-6)


def test_aml_triplet_hand_example():
    got = build_loss("triplet", form="aml")(TupleBatch(anchors=A, positives=P, negatives=N)).item()
    assert got == pytest.approx(0.8 - 0.4 + 0.1, rel=1e-12)
    # Paper form: [0.8 - 0.6 + 0.1]_+ = 0.3.
    assert build_loss("triplet")(TupleBatch(anchors=A, positives=P, negatives=N)).item() == pytest.approx(0.3)


def test_cirtorch_regression_hand_example():
    t = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    got = build_loss("reg", form="cirtorch")(TupleBatch(anchors=A, anchor_teacher=t)).item()
    assert got == pytest.approx(0.5 * ((0.4 + EPS) ** 2 + (-0.8 + EPS) ** 2), rel=1e-12)
    assert build_loss("reg")(TupleBatch(anchors=A, anchor_teacher=t)).item() == pytest.approx(-0.6)


def test_aml_darkrank_hand_example():
    # 1-D embeddings: anchor at 0; student distances 0.5, 1.0; scores -3 d^3 = -0.375, -3.
    student = torch.tensor([[[0.0], [0.5], [1.0]]], dtype=torch.float64)
    loss = build_loss("dr", form="aml")
    teacher_same_order = torch.tensor([[[0.0], [1.0], [2.0]]], dtype=torch.float64)
    got = loss(TupleBatch(student=student, teacher=teacher_same_order)).item()
    assert got == pytest.approx(math.log(1 + math.exp(-3 + 0.375)), rel=1e-12)  # 0.0699
    teacher_reversed = torch.tensor([[[0.0], [2.0], [1.0]]], dtype=torch.float64)
    got = loss(TupleBatch(student=student, teacher=teacher_reversed)).item()
    assert got == pytest.approx(math.log(1 + math.exp(3 - 0.375)), rel=1e-12)  # 2.6949
    # Permutation length 4: a fifth example the teacher ranks last changes nothing.
    student5 = torch.tensor([[[0.0], [0.5], [1.0], [0.2], [0.7], [0.1]]], dtype=torch.float64)
    teacher5 = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [4.0], [9.0]]], dtype=torch.float64)
    torch.testing.assert_close(loss(TupleBatch(student=student5, teacher=teacher5)),
                               loss(TupleBatch(student=student5[:, :5], teacher=teacher5[:, :5])))


def test_rkd_hand_example():
    student = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    # aml/RKD code: distances {1, 1, sqrt2} in both spaces but on different pairs; 4 of the 9
    # normalised entries differ by e = 3 (sqrt2 - 1) / (2 + sqrt2); angles: 4 of the 27 entries
    # differ by 1/sqrt2 (right angle at a different vertex), Huber 0.25 each.
    e = 3 * (math.sqrt(2) - 1) / (2 + math.sqrt(2))
    expected_aml = 2 * (4 * 0.25 / 27) + 4 * 0.5 * e ** 2 / 9
    got = rkd_loss(student, teacher, form="aml").item()
    assert got == pytest.approx(expected_aml, rel=1e-12)
    assert got == pytest.approx(0.103511, abs=1e-6)
    # Paper form, at the anchor: distances (1, 1) vs (1, sqrt2), each / its mean; the angle at
    # the anchor is 90 degrees for the student, 45 for the teacher (2 ordered pairs).
    d = 1 - 2 / (1 + math.sqrt(2))
    expected_paper = 2 * (2 * 0.5 * (1 / math.sqrt(2)) ** 2) + 2 * 0.5 * d ** 2
    assert rkd_loss(student, teacher).item() == pytest.approx(expected_paper, rel=1e-12)
    # A scaled copy of the student has the same relations: zero loss in both forms.
    assert rkd_loss(student, 3 * student).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_loss(student, 3 * student, form="aml").item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- robustness, reduction, seam

def test_paper_forms_ignore_the_scale_of_the_vectors():
    batch = asym_batch(seed=5)
    scaled = TupleBatch(anchors=3 * batch.anchors, positives=0.2 * batch.positives,
                        negatives=7 * batch.negatives, anchor_teacher=0.5 * batch.anchor_teacher)
    for name in ("contrastive", "contrastive_plus", "triplet", "multi_similarity", "regression"):
        torch.testing.assert_close(build_loss(name)(batch), build_loss(name)(scaled))


def test_large_beta_does_not_overflow():
    a = torch.tensor([[1.0, 0.0]])
    near = torch.tensor([[[1.0, 1e-3]] * 5])
    value = multi_similarity_loss(a, near, near, margin=-1.0, alpha=2.0, beta=400.0)
    assert torch.isfinite(value).all()
    # s = cos ~ 1 against m = -1: positives 0.5 log(1 + 5 e^-4), negatives ~ (800 + log 5) / 400.
    expected = 0.5 * math.log(1 + 5 * math.exp(-4)) + (800 + math.log(5)) / 400
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_coincident_points_give_finite_gradients():
    group = torch.zeros(2, 4, 3, dtype=torch.float64, requires_grad=True)
    group_distances(group).sum().backward()
    assert torch.isfinite(group.grad).all()
    student = torch.zeros(1, 3, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    for form in ("paper", "aml"):
        rkd_loss(student, teacher, form=form).sum().backward()
        assert torch.isfinite(student.grad).all()
    anchors = torch.zeros(1, 3, requires_grad=True)
    contrastive_loss(anchors, torch.zeros(1, 1, 3), torch.zeros(1, 2, 3), form="cirtorch").sum().backward()
    assert torch.isfinite(anchors.grad).all()


def test_tuple_similarity_and_distances_are_per_tuple():
    g = torch.Generator().manual_seed(9)
    a, refs = torch.randn(3, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    sims, dists = tuple_similarity(a, refs), tuple_distances(a, refs)
    for b in range(3):
        for k in range(5):
            assert sims[b, k].item() == pytest.approx(cos(a[b], refs[b, k]).item(), rel=1e-5)
            assert dists[b, k].item() == pytest.approx((a[b] - refs[b, k]).norm().item(), rel=1e-5)
    with pytest.raises(ValueError):
        tuple_similarity(a, refs[:2])


def test_reduction_defaults_to_sum():
    """The step applies the reduction (test_training_step: sum = world_size, mean / global batch)."""
    from amldist.config import config_from_dict

    assert config_from_dict({}).loss.reduction == "sum"
    assert config_from_dict({"loss": {"reduction": "mean"}}).loss.reduction == "mean"
    with pytest.raises(UserError, match="loss.reduction"):
        config_from_dict({"loss": {"reduction": "max"}})


def test_missing_batch_field_is_a_clear_error():
    with pytest.raises(ValueError, match="negatives"):
        build_loss("triplet")(TupleBatch(anchors=A, positives=P))
    with pytest.raises(ValueError, match="anchor_teacher"):
        build_loss("contrastive_plus")(TupleBatch(anchors=A, positives=P, negatives=N))


# ---------------------------------------------------------------- registry

def test_registry_paper_defaults():
    assert build_loss("contrastive").options["margin"] == 0.7
    assert build_loss("triplet").options["margin"] == 0.1
    ms = build_loss("multi_similarity").options
    assert (ms["margin"], ms["alpha"], ms["beta"]) == (0.6, 1.0, 1.0)
    aml = build_loss("multi", form="code").options
    assert (aml["margin"], aml["alpha"], aml["beta"], aml["form"]) == (0.5, 2.0, 40.0, "aml")
    dark = build_loss("darkrank", form="aml").options
    assert (dark["alpha"], dark["beta"], dark["list_length"]) == (3.0, 3.0, 4)
    rkd = build_loss("rkd").options
    assert (rkd["angle_weight"], rkd["distance_weight"]) == (2.0, 1.0)
    assert build_loss("contrastive", form="code").options["form"] == "cirtorch"
    assert build_loss("contrplus").options["use_self"] is True
    assert build_loss("contr").options["use_self"] is False


def test_registry_learning_rates_mining_and_labels():
    assert default_lr("contrastive", asym=False) == 1e-5
    assert default_lr("contrastive", asym=True) == 1e-3
    assert default_lr("contrastive_plus", asym=True) == 1e-3
    assert default_lr("triplet", asym=True) == 1e-8
    assert default_lr("multi_similarity", asym=True) == 1e-8
    assert default_lr("regression", asym=True) == 1e-3
    assert default_lr("rkd", asym=False) == 1e-2
    assert default_lr("darkrank", asym=False, teacher="vgg16", student="mobilenet_v2") == 1e-6
    assert default_lr("darkrank", asym=False, teacher="vgg16", student="efficientnet_b3") == 1e-6
    assert default_lr("darkrank", asym=False, teacher="resnet101", student="mobilenet_v2") == 1e-5
    assert default_lr("darkrank", asym=False, teacher="resnet101", student="efficientnet_b3") == 1e-7
    labelled = {name for name, spec in LOSSES.items() if spec.family == LABELLED}
    assert labelled == {"contrastive", "contrastive_plus", "triplet", "multi_similarity"}
    assert {name: DEFAULT_MINING[spec.family] for name, spec in LOSSES.items()} == {
        "contrastive": "hard", "contrastive_plus": "hard", "triplet": "hard", "multi_similarity": "hard",
        "regression": "none", "rkd": "random", "darkrank": "random"}
    assert "none" in allowed_mining("contrastive", {"use_negatives": False})
    assert "none" not in allowed_mining("contrastive")
    assert needs_teacher("contrastive", {"use_self": True}) and not needs_teacher("contrastive")
    assert all(needs_teacher(name) for name in ("contrastive_plus", "regression", "rkd", "darkrank"))


def test_loss_names_and_bad_options_are_user_errors_naming_the_key():
    assert resolve_loss_name("Contr+") == "contrastive_plus"
    assert resolve_loss_name("multi") == "multi_similarity"
    assert loss_spec("dr").equation == "(9)"
    with pytest.raises(UserError, match="loss.name"):
        build_loss("arcface")
    with pytest.raises(UserError, match="loss.name.*not one of the paper"):
        build_loss("cross_entropy")
    with pytest.raises(UserError, match="loss.alpha"):
        build_loss("contrastive", alpha=2.0)
    with pytest.raises(UserError, match="loss.beta"):
        build_loss("darkrank", beta=2.0)  # beta is an option of the aml form only
    with pytest.raises(UserError, match="loss.margin"):
        build_loss("contrastive", margin=1.5)
    assert build_loss("contrastive", form="cirtorch", margin=1.5).options["margin"] == 1.5
    with pytest.raises(UserError, match="loss.margin"):
        build_loss("triplet", margin=-0.1)
    with pytest.raises(UserError, match="loss.margin"):
        build_loss("triplet", margin="big")
    with pytest.raises(UserError, match="loss.form"):
        build_loss("triplet", form="cirtorch")
    with pytest.raises(UserError, match="loss.use_self"):
        build_loss("contrastive", use_positives=False, use_negatives=False)
    with pytest.raises(UserError, match="loss.list_length"):
        build_loss("darkrank", list_length=0)
    with pytest.raises(UserError, match="loss.alpha"):
        build_loss("multi_similarity", alpha=0.0)
