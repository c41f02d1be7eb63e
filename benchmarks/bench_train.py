"""Training-step benchmark: tuples/s of our batched step vs the reference's one-image-at-a-time loop.

The reference (cirtorch/aml `train()`): every image of a tuple goes through the network alone (batch 1),
the tuple's loss is back-propagated at once, gradients accumulate over the batch, then one optimiser
step. Asymmetric training in aml sends only the anchor through the student (the rest are teacher
vectors); cirtorch's symmetric training sends all 7 images. Ours (`amldist.training.step`): sym embeds
the batch's distinct images, asym only the batch's anchors, batched as `StepSettings.for_device` says
(GPU: padded batches, bf16, channels-last; CPU: exact-shape batches, fp32, channels-last for sym); one
backward per step. Same student (MobileNetV2 + 1x1 to 512, from scratch, BatchNorm frozen), same tuples
(1 anchor + 1 positive + 5 negatives; images with the longest side at the training size and the aspect
ratios of landmark photos), same machine and process; rounds are interleaved and the best round of each
approach is kept.

    python benchmarks/bench_train.py [--quick] [--device cpu|cuda] [--image-size S] [--batch B] [--rounds R]
                                     [--modes sym,asym]

Defaults: on a GPU the paper's set-up (images <= 362 px, 10 tuples per batch); on a CPU images <= 256 px
and 5 tuples per batch, because the batched sym step holds the activations of all of a batch's images
at once (70 images of 362 px took over 10 GB of RAM here) where the reference holds one image's.
Prints a table and writes runs/bench/train.json (train-cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from amldist.losses import TupleBatch, build_loss
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

OUT = Path("runs/bench/train.json")
ASPECTS = (4 / 3, 3 / 4, 3 / 2, 2 / 3, 1.0, 16 / 9)  # width / height of typical landmark photos
NUM_POSITIVES, NUM_NEGATIVES, DIM = 1, 5, 512


def make_images(count: int, size: int, seed: int) -> list[torch.Tensor]:
    """Normalised (3, h, w) tensors, longest side = size, mixed aspect ratios."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(count):
        aspect = ASPECTS[i % len(ASPECTS)]
        w, h = (size, round(size / aspect)) if aspect >= 1 else (round(size * aspect), size)
        images.append(torch.randn(3, h, w, generator=gen))
    return images


def make_tuples(batch: int) -> StepTuples:
    """`batch` tuples over distinct images: anchors 0..B-1, then positives, then negatives."""
    ids = np.arange(batch * (1 + NUM_POSITIVES + NUM_NEGATIVES))
    anchors = ids[:batch]
    positives = ids[batch: batch * 2].reshape(batch, 1)
    negatives = ids[batch * 2:].reshape(batch, NUM_NEGATIVES)
    return StepTuples(anchors, positives, negatives)


def reference_step(net, loss_fn, tuples: StepTuples, images, teacher: VectorTable | None, device) -> None:
    """cirtorch/aml: per tuple, each student image alone; loss of the tuple; backward; accumulate."""
    for b in range(len(tuples)):
        def student(i):
            return net(images[int(i)][None].to(device))  # (1, D)
        anchor = student(tuples.anchors[b])
        if teacher is None:  # sym: all 7 images through the student
            positives = torch.cat([student(i) for i in tuples.positives[b]])[None]
            negatives = torch.cat([student(i) for i in tuples.negatives[b]])[None]
        else:  # aml asym: the anchor only; the rest are teacher vectors
            positives = teacher.rows(tuples.positives[b:b + 1])
            negatives = teacher.rows(tuples.negatives[b:b + 1])
        loss_fn(TupleBatch(anchors=anchor, positives=positives, negatives=negatives)).sum().backward()


def ours_step(net, loss_fn, family, tuples, images, teacher, settings) -> None:
    chosen = [images[int(i)] for i in family.student_image_ids(tuples)]
    loss_and_backward(TupleEmbedder(net), loss_fn, family, tuples, chosen, teacher, settings)


def approaches(mode: str, device: torch.device, cpu_bf16: bool) -> list[tuple[str, dict]]:
    """(label, options) of each approach of a mode. "ours" runs with `StepSettings.for_device`; the
    variants change one setting, to show why the device defaults are what they are."""
    out = [("reference", {"reference": True})]
    if mode == "asym":
        out.append(("reference, all 7 images", {"reference": True, "all_images": True}))
    out.append(("ours", {}))
    if device.type == "cuda":
        out.append(("ours, fp32 (no autocast)", {"settings": {"amp_dtype": None}}))
        out.append(("ours, contiguous (no channels-last)", {"settings": {"channels_last": False}}))
        out.append(("ours + cudnn.benchmark", {"cudnn_benchmark": True}))
        out.append(("ours, exact-shape batches",
                    {"settings": {"max_pad_frac": 0.0, "anchors_one_batch": False}}))
        out.append(("ours, one padded batch + cudnn.benchmark", {"settings": {"max_pad_frac": 0.99},
                                                                 "cudnn_benchmark": True}))
        return out
    out.append(("ours, padded batches", {"settings": {"anchors_one_batch": True, "max_pad_frac": 0.25}}))
    if cpu_bf16:
        out.append(("ours + bf16 autocast", {"settings": {"amp_dtype": torch.bfloat16}}))
    if mode == "sym":
        out.append(("ours, contiguous (no channels-last)", {"settings": {"channels_last": False}}))
    else:
        out.append(("ours + channels-last", {"settings": {"channels_last": True}}))
    return out


def time_approach(mode, options, tuples, images, teacher, device, steps) -> float:
    """Seconds per optimiser step (best of `steps`), fresh network per call so all start equal."""
    settings = StepSettings.for_device(device, all_images=mode == "sym", global_batch=len(tuples))
    for key, value in options.get("settings", {}).items():
        setattr(settings, key, value)
    torch.backends.cudnn.benchmark = bool(options.get("cudnn_benchmark"))  # per-shape algorithm search
    torch.manual_seed(0)
    net = create_net("mobilenet_v2", "gem", DIM, pretrained=False).to(device)
    if settings.channels_last and not options.get("reference"):
        net = net.to(memory_format=torch.channels_last)
    set_train_mode(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    asym = mode == "asym"
    family = LabelledTuples(asym=asym, num_positives=NUM_POSITIVES, num_negatives=NUM_NEGATIVES,
                            use_self=False, mining="hard")
    loss_fn = build_loss("contrastive")
    use_teacher = teacher if asym and not options.get("all_images") else None
    best = float("inf")
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if options.get("reference"):
            reference_step(net, loss_fn, tuples, images, use_teacher, device)
        else:
            ours_step(net, loss_fn, family, tuples, images, teacher if asym else None, settings)
        optimizer.step()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_bf16_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8))
        return True
    except RuntimeError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small images and batch, one round (a smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="longest image side (default 362 on GPU, 256 on CPU; quick 96)")
    parser.add_argument("--batch", type=int, default=None,
                        help="tuples per batch (default 10 on GPU, 5 on CPU; quick 4)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument("--steps", type=int, default=1, help="timed optimiser steps per approach and round")
    parser.add_argument("--modes", default="sym,asym", help="comma list of sym, asym (default both)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default runs/bench/train.json; train-cuda.json on a GPU)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    size = args.image_size or (96 if args.quick else 362 if gpu else 256)
    batch = args.batch or (4 if args.quick else 10 if gpu else 5)
    rounds = args.rounds or (1 if args.quick else 2)
    steps = args.steps
    tuples = make_tuples(batch)
    images = make_images(batch * (1 + NUM_POSITIVES + NUM_NEGATIVES), size, seed=0)
    gen = torch.Generator().manual_seed(1)
    teacher = VectorTable(np.arange(len(images)), torch.randn(len(images), DIM, generator=gen).to(device))
    cpu_bf16 = device.type == "cpu" and cpu_bf16_supported()
    results: dict[str, dict[str, float]] = {}
    rounds_seen: dict[str, dict[str, list[float]]] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip() in ("sym", "asym")]:
        plan = approaches(mode, device, cpu_bf16)
        for _, options in plan:  # warm-up: first calls pay for kernel selection and allocation
            time_approach(mode, options, tuples, images, teacher, device, 1)
        seen = rounds_seen[mode] = {label: [] for label, _ in plan}
        for round_index in range(rounds):
            for label, options in plan:
                seconds = time_approach(mode, options, tuples, images, teacher, device, steps)
                seen[label].append(batch / seconds)
                print(f"  round {round_index + 1}: {mode} {label}: {batch / seconds:.2f} tuples/s",
                      flush=True)
        results[mode] = {label: max(rates) for label, rates in seen.items()}  # best round
    report(results, device, size, batch, rounds * steps, args.quick, rounds_seen, args.out)


def report(results, device, size, batch, rounds, quick, rounds_seen, out: Path | None = None) -> None:
    print(f"device {device}, images <= {size} px, {batch} tuples per batch (1 + "
          f"{NUM_POSITIVES} + {NUM_NEGATIVES} images), MobileNetV2 -> {DIM}, "
          f"best of {rounds} timed steps in interleaved rounds")
    print(f"{'mode':5} {'approach':36} {'tuples/s':>10} {'vs reference':>13}")
    for mode, rates in results.items():
        for label, rate in rates.items():
            print(f"{mode:5} {label:36} {rate:10.2f} {rate / rates['reference']:12.2f}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak_mib:.0f} MiB")
    gpu = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if gpu else "cpu"
    gpu_peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None
    if gpu:
        print(f"{device_name}: peak GPU memory allocated {gpu_peak_mib:.0f} MiB")
    summary = {"device": str(device), "device_name": device_name, "gpu_peak_allocated_mib": gpu_peak_mib,
               "torch": torch.__version__, "image_size": size, "batch_tuples": batch, "rounds": rounds,
               "quick": quick, "threads": torch.get_num_threads(), "peak_rss_mib": peak_mib,
               "tuples_per_s": results, "tuples_per_s_each_round": rounds_seen,
               "speedup": {mode: {label: rate / rates["reference"] for label, rate in rates.items()}
                           for mode, rates in results.items()}}
    parts = ([] if set(results) == {"sym", "asym"} else list(results)) + (["cuda"] if gpu else [])
    out = out or OUT.with_name("-".join(["train", *parts]) + ".json")  # train.json, train-cuda.json, ...
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
