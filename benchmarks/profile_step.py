"""Where the time of one batched training step goes: torch.profiler over `bench_train`'s "ours" step.

    python benchmarks/profile_step.py [--mode sym|asym] [--device cuda|cpu] [--image-size S] [--batch B]

Same tuples, images and network as benchmarks/bench_train.py (defaults: the GPU set-up, 362 px, 10
tuples). Prints the step time, the profiled host and device time, and the operators that take the most
host time and the most device time. A device total far below the wall time means the step waits on the
host (kernel launches, copies), not on the GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="sym", choices=("sym", "asym"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=362)
    parser.add_argument("--batch", type=int, default=10, help="tuples per step")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per table")
    args = parser.parse_args()
    device = torch.device(args.device)
    tuples = bench_train.make_tuples(args.batch)
    images = bench_train.make_images(
        len(tuples) * (1 + bench_train.NUM_POSITIVES + bench_train.NUM_NEGATIVES), args.image_size, seed=0)
    teacher = bench_train.VectorTable(np.arange(len(images)),
                                      torch.randn(len(images), bench_train.DIM).to(device))
    for _ in range(2):  # warm-up: kernel selection, allocator
        bench_train.time_approach(args.mode, {}, tuples, images, teacher, device, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = bench_train.time_approach(args.mode, {}, tuples, images, teacher, device, 2)
    events = prof.key_averages()
    device_us = sum(event.self_device_time_total for event in events) if device.type == "cuda" else 0
    print(f"{args.mode} step on {device}: {seconds * 1000:.1f} ms (best of 2); "
          "profiled region (network set-up and 2 steps): host "
          f"{sum(e.self_cpu_time_total for e in events) / 1000:.1f} ms, device {device_us / 1000:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
