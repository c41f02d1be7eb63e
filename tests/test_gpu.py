"""The GPU paths against their CPU references: the bf16 channels-last training step, the same step inside
DDP over NCCL, batched bf16 extraction, and the miner's torch-cuda search. Skipped without a CUDA device;
run with `AMLDIST_TEST_GPU=1 pytest -m gpu` (the suite hides GPUs otherwise, see conftest)."""

import os
import socket

import numpy as np
import pytest
import torch

from amldist import extract
from amldist.feature_store import write_feature_store
from amldist.losses import TupleBatch, build_loss
from amldist.miner_actor import Miner
from amldist.nets import create_net
from amldist.training.family import LabelledTuples
from amldist.training.optim import set_train_mode
from amldist.training.plan import StepTuples
from amldist.training.step import (
    StepSettings,
    TupleEmbedder,
    VectorTable,
    loss_and_backward,
)

pytestmark = pytest.mark.gpu

SIZES = [(96, 128), (128, 96), (112, 112)]
DIM = 256


def make_images(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, *SIZES[i % len(SIZES)], generator=gen) for i in range(count)]


def make_tuples():
    anchors = np.array([0, 1, 2, 3])
    positives = np.array([[4], [5], [6], [7]])
    negatives = np.array([[8, 9, 10], [11, 12, 13], [8, 14, 15], [9, 16, 17]])
    return StepTuples(anchors, positives, negatives)


def frozen_net():
    torch.manual_seed(0)
    return set_train_mode(create_net("small_cnn", "gem", DIM, pretrained=False))


def cpu_reference(net, loss_fn, tuples, images, teacher):
    """fp32 on the CPU, every image alone (cirtorch/aml); returns the tuple losses and the gradients."""
    net.zero_grad()
    losses = []
    for b in range(len(tuples)):
        def one(i):
            return net(images[int(i)][None])
        anchor = one(tuples.anchors[b])
        if teacher is None:
            positives = torch.cat([one(i) for i in tuples.positives[b]])[None]
            negatives = torch.cat([one(i) for i in tuples.negatives[b]])[None]
        else:
            positives, negatives = teacher[tuples.positives[b]][None], teacher[tuples.negatives[b]][None]
        loss = loss_fn(TupleBatch(anchors=anchor, positives=positives, negatives=negatives)).sum()
        loss.backward()
        losses.append(float(loss.detach()))
    return np.array(losses), [p.grad.detach().clone() for p in net.parameters()]


def gpu_step(model, net, loss_fn, spec, tuples, images, teacher, settings):
    net.zero_grad()
    chosen = [images[int(i)] for i in spec.student_image_ids(tuples)]
    table = None
    if teacher is not None:
        table = VectorTable(np.arange(len(teacher)), teacher.to(settings.device))
    losses = loss_and_backward(model, loss_fn, spec, tuples, chosen, table, settings)
    return losses.detach().float().cpu().numpy(), [p.grad.detach().float().cpu() for p in net.parameters()]


def relative_error(got, want):
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-12))


def cosine(got, want):
    return float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_padded_channels_last_step_on_the_gpu_matches_the_fp32_cpu_reference(asym):
    images, tuples = make_images(18), make_tuples()
    spec = LabelledTuples(asym=asym, num_positives=1, num_negatives=3, use_self=False, mining="hard")
    loss_fn = build_loss("contrastive", margin=0.7)
    teacher = torch.nn.functional.normalize(torch.randn(18, DIM, generator=torch.Generator().manual_seed(1)),
                                            dim=1)
    net = frozen_net()
    want_losses, want_grads = cpu_reference(net, loss_fn, tuples, images, teacher if asym else None)
    device = torch.device("cuda")
    settings = StepSettings.for_device(device, all_images=not asym, global_batch=len(tuples))
    assert settings.amp_dtype == torch.bfloat16 and settings.channels_last and settings.max_pad_frac > 0
    net = net.to(device, memory_format=torch.channels_last)
    # fp32 without TF32: padded channels-last batches must give the reference's numbers.
    settings.amp_dtype = None
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        losses, grads = gpu_step(TupleEmbedder(net), net, loss_fn, spec, tuples, images,
                                 teacher if asym else None, settings)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4, atol=1e-5)
    errors = [relative_error(got, want) for got, want in zip(grads, want_grads)]
    assert max(errors) < 1e-3, errors
    # bf16 autocast: the same losses to bf16 precision, gradients pointing the same way.
    settings.amp_dtype = torch.bfloat16
    losses, grads = gpu_step(TupleEmbedder(net), net, loss_fn, spec, tuples, images,
                             teacher if asym else None, settings)
    np.testing.assert_allclose(losses, want_losses, rtol=3e-2, atol=1e-2)
    cosines = [cosine(got, want) for got, want in zip(grads, want_grads)]
    assert min(cosines) > 0.98, cosines  # first-layer gradients deviate most (relative error about 0.1)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_the_training_step_never_waits_for_the_gpu(asym):
    """Forward, loss and backward of a padded bf16 step queue their work without one host-device
    synchronisation (a blocking copy or a read of a GPU value would stall the host: amldist.transfer)."""
    images, tuples = make_images(18), make_tuples()
    spec = LabelledTuples(asym=asym, num_positives=1, num_negatives=3, use_self=False, mining="hard")
    loss_fn = build_loss("contrastive", margin=0.7)
    device = torch.device("cuda")
    settings = StepSettings.for_device(device, all_images=not asym, global_batch=len(tuples))
    net = frozen_net().to(device, memory_format=torch.channels_last)
    teacher = VectorTable(np.arange(18),
                          torch.nn.functional.normalize(torch.randn(18, DIM, device=device), dim=1))
    chosen = [images[int(i)] for i in spec.student_image_ids(tuples)]
    # traces the sizes
    loss_and_backward(TupleEmbedder(net), loss_fn, spec, tuples, chosen, teacher, settings)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = loss_and_backward(TupleEmbedder(net), loss_fn, spec, tuples, chosen, teacher, settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses).all()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_step_inside_ddp_over_nccl_gives_the_plain_gradients(monkeypatch):
    import torch.distributed as dist

    images, tuples = make_images(18), make_tuples()
    spec = LabelledTuples(asym=False, num_positives=1, num_negatives=3, use_self=False, mining="hard")
    loss_fn = build_loss("contrastive", margin=0.7)
    device = torch.device("cuda")
    settings = StepSettings.for_device(device, all_images=True, global_batch=len(tuples))
    net = frozen_net().to(device, memory_format=torch.channels_last)
    _, plain = gpu_step(TupleEmbedder(net), net, loss_fn, spec, tuples, images, None, settings)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setitem(os.environ, key, value)
    dist.init_process_group("nccl")
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(TupleEmbedder(net), device_ids=[0])
        _, wrapped = gpu_step(ddp, net, loss_fn, spec, tuples, images, None, settings)
        total = torch.tensor([1.0, 2.0], device=device)
        dist.all_reduce(total)  # the loop's metric all-reduce on the NCCL group
        assert total.tolist() == [1.0, 2.0]
    finally:
        dist.destroy_process_group()
    for got, want in zip(wrapped, plain):
        assert relative_error(got, want) < 1e-3


def write_jpegs(folder, count, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = [(160, 120), (120, 160), (150, 100), (128, 128)]
    paths = []
    for i in range(count):
        w, h = shapes[i % len(shapes)]
        small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        path = folder / f"im{i:02d}.jpg"
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path, quality=95)
        paths.append(path)
    return paths


def test_batched_bf16_extraction_on_the_gpu_matches_one_image_at_a_time_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    net = create_net("small_cnn", "gem", DIM, pretrained=False).eval()
    source = extract.FileSource(write_jpegs(tmp_path, 12))
    want = extract.embed(net, source, image_size=160, batch_size=1, device="cpu")
    fp32 = extract.embed(net, source, image_size=160, batch_size=8, device="cuda", autocast=False,
                         max_pad_frac=0.5)
    bf16 = extract.embed(net, source, image_size=160, batch_size=8, device="cuda", max_pad_frac=0.5)
    # Cosine similarity of each GPU descriptor with its CPU reference (all are L2-normalised).
    assert np.min(np.sum(fp32 * want, axis=1)) > 0.9999  # TF32 convolutions
    assert np.min(np.sum(bf16 * want, axis=1)) > 0.995


def test_the_miner_on_gpu_backends_gives_the_cpu_answers(tmp_path):
    from amldist.search import faiss_gpu_available

    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 40, 2000)
    centres = rng.standard_normal((40, 64)).astype(np.float32)
    vectors = centres[clusters] + 0.8 * rng.standard_normal((2000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_feature_store(tmp_path / "store", vectors, network="synthetic", network_sha256="0" * 64,
                        architecture="synthetic", image_size=128, scales=[1.0], dataset="synthetic",
                        split="train")
    anchors = rng.choice(2000, 100, replace=False)
    anchor_vecs = vectors[anchors] + 0.1 * rng.standard_normal((100, 64)).astype(np.float32)
    answers = {}
    gpu_backends = ["torch-cuda"] + (["faiss-gpu"] if faiss_gpu_available() else [])
    for backend in ["faiss-cpu", *gpu_backends]:
        miner = Miner(clusters, str(tmp_path / "store"), pool_size=1500, backend=backend)
        miner.new_epoch(3, seed=7)
        answers[backend] = miner.hard_negatives(anchors, anchor_vecs, 5)
    for backend in gpu_backends:
        np.testing.assert_array_equal(answers[backend][0], answers["faiss-cpu"][0])
        assert answers[backend][1] == pytest.approx(answers["faiss-cpu"][1], rel=1e-4)


def test_the_faiss_gpu_index_answers_like_faiss_on_the_cpu():
    """The faiss-gpu back-end (a flat index on the GPU, the CPU beyond its k limit) against faiss-cpu.
    Skipped where faiss has no GPU support, unless AMLDIST_REQUIRE_FAISS_GPU=1 (scripts/gpu_check.sh sets
    it when it installed faiss-gpu): then its absence fails."""
    from amldist import search

    if not search.faiss_gpu_available():
        if os.environ.get("AMLDIST_REQUIRE_FAISS_GPU") == "1":
            pytest.fail("AMLDIST_REQUIRE_FAISS_GPU=1, yet faiss has no GPU support or sees no GPU here")
        pytest.skip("faiss has no GPU support here: the faiss-gpu path is NOT tested")
    assert search.choose_backend("auto") == "faiss-gpu"
    rng = np.random.default_rng(1)
    db = rng.integers(-8, 9, (search.GPU_MAX_K + 500, 32)).astype(np.float32)  # integers: exact scores
    queries = rng.integers(-8, 9, (50, 32)).astype(np.float32)
    on_gpu, on_cpu = search.searcher(db, "faiss-gpu"), search.searcher(db, "faiss-cpu")
    for k in (10, search.GPU_MAX_K + 100):  # beyond faiss's GPU limit the CPU answers
        gpu_scores, gpu_ids = on_gpu(queries, k)
        np.testing.assert_array_equal(gpu_scores, on_cpu(queries, k)[0])
        assert all(len(set(row)) == k for row in gpu_ids.tolist())
        # ties may come in another order: each id's score is what it should be
        np.testing.assert_array_equal(np.take_along_axis(queries @ db.T, gpu_ids, axis=1), gpu_scores)
