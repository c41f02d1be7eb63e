"""The training step: gradients equal the reference's one-image-at-a-time sum (also split over ranks as DDP
averages them, and inside DDP over gloo in two processes), asym sends only anchors through the student,
BatchNorm statistics stay frozen."""

import numpy as np
import pytest
import torch

from amldist.config import OptimConfig
from amldist.losses import TupleBatch, build_loss
from amldist.nets import create_net
from amldist.training.family import LabelledTuples, RelationalTuples
from amldist.training.optim import batchnorm_stats, calibrate_batchnorm, make_optimizer, set_train_mode
from amldist.training.plan import StepTuples
from amldist.training.step import StepSettings, TupleEmbedder, VectorTable, loss_and_backward

SIZES = [(32, 40), (40, 32), (36, 36)]
NUM_IMAGES, DIM = 14, 128


@pytest.fixture()
def images():
    gen = torch.Generator().manual_seed(0)
    return {i: torch.randn(3, *SIZES[i % len(SIZES)], generator=gen) for i in range(NUM_IMAGES)}


@pytest.fixture()
def tuples():
    anchors = np.array([0, 1, 2, 3])
    positives = np.array([[4], [5], [6], [7]])
    negatives = np.array([[8, 9], [10, 11], [12, 8], [9, 13]])  # 8 and 9 are negatives twice
    return StepTuples(anchors, positives, negatives)


def frozen_net(seed=0):
    torch.manual_seed(seed)
    return set_train_mode(create_net("small_cnn", "gem", None, pretrained=False))


def grads(net):
    return [p.grad.detach().clone() for p in net.parameters()]


def images_of(family, step, images):
    return [images[int(i)] for i in family.student_image_ids(step)]


def reference_gradients(net, loss_fn, step: StepTuples, images):
    """cirtorch/aml: every image of a tuple alone through the net, loss per tuple, backward at once."""
    net.zero_grad()
    for b in range(len(step)):
        def one(i):
            return net(images[int(i)][None])  # (1, D)
        anchor = one(step.anchors[b])
        positives = torch.cat([one(i) for i in step.positives[b]])[None]  # (1, P, D)
        negatives = torch.cat([one(i) for i in step.negatives[b]])[None]  # (1, N, D)
        loss_fn(TupleBatch(anchors=anchor, positives=positives, negatives=negatives)).sum().backward()
    return grads(net)


def take(step: StepTuples, rows) -> StepTuples:
    return StepTuples(step.anchors[rows], step.positives[rows], step.negatives[rows])


@pytest.mark.parametrize("padded", [True, False], ids=["padded-buckets", "exact-shape-buckets"])
def test_batched_step_and_its_ddp_split_equal_the_reference_sum(images, tuples, padded):
    spec = LabelledTuples(asym=False, num_positives=1, num_negatives=2, use_self=False, mining="hard")
    loss_fn = build_loss("contrastive", margin=0.5)
    net = frozen_net()
    want = reference_gradients(net, loss_fn, tuples, images)

    def settings_for(world_size):
        if padded:
            return StepSettings(device=torch.device("cpu"), world_size=world_size, global_batch=len(tuples))
        return StepSettings.for_device(torch.device("cpu"), world_size=world_size, global_batch=len(tuples))

    net.zero_grad()
    settings = settings_for(1)
    losses = loss_and_backward(TupleEmbedder(net), loss_fn, spec, tuples, images_of(spec, tuples, images),
                               None, settings)
    single = grads(net)
    assert losses.shape == (4,)

    # Two ranks, two tuples each; DDP averages their gradients.
    per_rank = []
    for rows in ([0, 1], [2, 3]):
        net.zero_grad()
        part = take(tuples, rows)
        loss_and_backward(TupleEmbedder(net), loss_fn, spec, part, images_of(spec, part, images), None,
                          settings_for(2))
        per_rank.append(grads(net))
    ddp = [(a + b) / 2 for a, b in zip(*per_rank)]
    scale = max(float(g.abs().max()) for g in want)
    assert scale > 0
    for w, s, d in zip(want, single, ddp):
        torch.testing.assert_close(s, w, atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(d, w, atol=1e-5 * scale, rtol=1e-4)


def ddp_rank(rank, port, part, images, folder):
    """One of two processes: the step on this rank's tuples inside DistributedDataParallel over gloo."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        spec = LabelledTuples(asym=False, num_positives=1, num_negatives=2, use_self=False, mining="hard")
        net = frozen_net()
        model = torch.nn.parallel.DistributedDataParallel(TupleEmbedder(net))
        settings = StepSettings.for_device(torch.device("cpu"), world_size=2, global_batch=2 * len(part))
        losses = loss_and_backward(model, build_loss("contrastive", margin=0.5), spec, part,
                                   images_of(spec, part, images), None, settings)
        torch.save({"grads": grads(net), "losses": losses}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_step_inside_ddp_over_gloo_with_two_processes_averages_to_the_reference(images, tuples, tmp_path):
    """Two real processes, two tuples each: DDP's all-reduce gives both the one-process reference's
    gradients."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    want = reference_gradients(frozen_net(), build_loss("contrastive", margin=0.5), tuples, images)
    parts = [take(tuples, [0, 1]), take(tuples, [2, 3])]
    spawn = mp.get_context("spawn")
    processes = [spawn.Process(target=ddp_rank, args=(rank, port, parts[rank], images, str(tmp_path)))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert [len(r["losses"]) for r in ranks] == [2, 2]
    scale = max(float(g.abs().max()) for g in want)
    for w, g0, g1 in zip(want, ranks[0]["grads"], ranks[1]["grads"]):
        torch.testing.assert_close(g0, g1, atol=0, rtol=0)  # every rank holds the same averaged gradient
        torch.testing.assert_close(g0, w, atol=1e-5 * scale, rtol=1e-4)
    # Without the all-reduce rank 0 would hold twice its own tuples' gradient (loss scale: the world size).
    own = reference_gradients(frozen_net(), build_loss("contrastive", margin=0.5), parts[0], images)
    assert any(not torch.allclose(g, 2 * o, atol=1e-5 * scale, rtol=1e-4)
               for g, o in zip(ranks[0]["grads"], own))


def test_mean_reduction_divides_by_the_global_batch():
    assert StepSettings(device=torch.device("cpu"), world_size=4, global_batch=10).loss_scale == 4
    assert StepSettings(device=torch.device("cpu"), world_size=4, global_batch=10,
                        reduction="mean").loss_scale == 0.4


def test_asym_step_embeds_only_the_anchors(images, tuples):
    spec = LabelledTuples(asym=True, num_positives=1, num_negatives=2, use_self=True, mining="hard")
    assert spec.student_image_ids(tuples).tolist() == [0, 1, 2, 3]
    teacher_ids = spec.teacher_image_ids(tuples)
    assert set(teacher_ids.tolist()) == set(range(NUM_IMAGES))  # positives, negatives and g(a)
    net = frozen_net()
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    teacher = VectorTable(teacher_ids, torch.randn(len(teacher_ids), DIM))
    settings = StepSettings(device=torch.device("cpu"), global_batch=len(tuples))
    losses = loss_and_backward(TupleEmbedder(net), build_loss("contrastive_plus"), spec, tuples,
                               images_of(spec, tuples, images), teacher, settings)
    assert seen == [4]  # one padded batch holding the four anchors, nothing else
    seen.clear()
    cpu = StepSettings.for_device(torch.device("cpu"), global_batch=len(tuples))
    loss_and_backward(TupleEmbedder(net), build_loss("contrastive_plus"), spec, tuples,
                      images_of(spec, tuples, images), teacher, cpu)
    assert sorted(seen) == [1, 1, 2]  # CPU: only equal shapes share a batch (anchors 0 and 3 are 32x40)
    assert torch.isfinite(losses).all()
    with pytest.raises(ValueError, match="expected 4 images"):
        loss_and_backward(TupleEmbedder(net), build_loss("contrastive_plus"), spec, tuples,
                          [images[i] for i in range(8)], teacher, settings)


def test_relational_groups_go_through_the_student_with_teacher_groups():
    spec = RelationalTuples(asym=False, num_positives=0, num_negatives=3, use_self=False, mining="random")
    step = StepTuples(np.array([0, 5]), np.zeros((2, 0), np.int64), np.array([[1, 2, 3], [6, 7, 1]]))
    assert spec.student_image_ids(step).tolist() == [0, 1, 2, 3, 5, 6, 7]
    ids = np.arange(8)
    student = VectorTable(ids, torch.arange(8.0)[:, None].repeat(1, 4))
    teacher = VectorTable(ids, -torch.arange(8.0)[:, None].repeat(1, 4))
    batch = spec.loss_batch(step, student, teacher)
    assert batch.student.shape == (2, 4, 4) and batch.teacher.shape == (2, 4, 4)
    assert batch.student[1, :, 0].tolist() == [5, 6, 7, 1]  # anchor first, then its examples
    assert batch.teacher[1, :, 0].tolist() == [-5, -6, -7, -1]


def test_vector_table_gathers_in_any_shape_and_refuses_unknown_ids():
    table = VectorTable(np.array([7, 3, 5]), torch.tensor([[7.0], [3.0], [5.0]]))
    assert table.rows(np.array([[5, 7], [3, 3]]))[..., 0].tolist() == [[5, 7], [3, 3]]
    with pytest.raises(KeyError):
        table.rows(np.array([4]))


def test_batchnorm_statistics_stay_frozen_while_weights_learn(images, tuples):
    spec = LabelledTuples(asym=False, num_positives=1, num_negatives=2, use_self=False, mining="hard")
    net = frozen_net()
    before = batchnorm_stats(net)
    bn_weight = net.features[1].weight.detach().clone()
    optimizer = make_optimizer(net, OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-6))
    for _ in range(3):
        optimizer.zero_grad()
        loss_and_backward(TupleEmbedder(net), build_loss("contrastive"), spec, tuples,
                          images_of(spec, tuples, images), None,
                          StepSettings(device=torch.device("cpu"), global_batch=len(tuples)))
        optimizer.step()
    for old, new in zip(before, batchnorm_stats(net)):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert not torch.equal(net.features[1].weight, bn_weight)  # the affine part still trains
    net.train()  # the control: un-frozen BatchNorm would have moved
    net(torch.stack([images[0], images[0]]))
    assert any(not torch.equal(old, new) for old, new in zip(before, batchnorm_stats(net)))


def test_batchnorm_calibration_uses_the_images_statistics(images):
    net = frozen_net()
    first_conv, first_norm = net.features[0], net.features[1]
    chosen = [images[i] for i in range(6)]
    with torch.no_grad():
        outputs = [first_conv(image[None]) for image in chosen]  # (1, C, h, w) each
    # Cumulative average of per-image batch statistics (biased mean, unbiased variance per image).
    want_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs]).mean(dim=0)
    want_var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outputs]).mean(dim=0)
    assert calibrate_batchnorm(net, iter(chosen)) == 6
    torch.testing.assert_close(first_norm.running_mean, want_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_norm.running_var, want_var, rtol=1e-4, atol=1e-5)
    assert net.training and not first_norm.training and first_norm.momentum == 0.1  # frozen again afterwards


def test_batchnorm_of_a_from_scratch_network_trains_when_not_frozen(images):
    torch.manual_seed(0)
    net = set_train_mode(create_net("small_cnn", "gem", None, pretrained=False), freeze=False)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.training for m in norms)
    before = batchnorm_stats(net)
    net(torch.stack([images[0], images[0]]))
    assert all(not torch.equal(old, new) for old, new in zip(before, batchnorm_stats(net)))


def test_trainable_batchnorm_gets_no_padded_batches_on_any_device():
    # Padding would enter the batch statistics; frozen statistics make a padded batch exact.
    gpu = StepSettings.for_device(torch.device("cuda"))
    exact = StepSettings.for_device(torch.device("cuda"), exact_shapes=True)
    assert gpu.anchors_one_batch and gpu.max_pad_frac > 0
    assert not exact.anchors_one_batch and exact.max_pad_frac == 0.0 and exact.amp_dtype == torch.bfloat16
