"""Data path: samples/s of producing the normalised training tensor (longest side 362) from shards by
index vs the reference's way of decoding each original JPEG and resizing it per sample.

    python benchmarks/bench_data.py [--quick]

Both paths run on the same images in the same process, one thread each (a DataLoader worker's view):
- reference (cirtorch): PIL open -> convert RGB -> thumbnail(362, LANCZOS) -> ToTensor -> Normalize
- shards: ShardReader.read_bytes (one pread) -> JPEG decode of the stored 362 px image -> normalise
The originals are textured ~1024 px JPEGs drawn here (several octaves of noise, blocks, edges, grain),
so their decode cost is like a photo's. Also reports the time to write the shards (all CPUs) and the
mean absolute difference between the two tensors. Writes runs/bench/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amldist.datasets import formats, layout
from amldist.shards import ShardReader, load_tensor, shard_dataset

DATASET = "retrieval-SfM-120k"
IMAGE_SIZE = 362
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ORIGINAL_SIZES = [(1024, 768), (768, 1024), (1024, 683), (1024, 576), (683, 1024), (1024, 1024)]


def textured_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Photo-like detail at every scale, so JPEG decoding costs what it costs on real pictures."""
    canvas = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 90.0), (16, 50.0), (64, 30.0), (256, 15.0)):
        coarse = rng.uniform(-1, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        layer = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize((width, height),
                                                                               Image.Resampling.BICUBIC)
        canvas += weight * (np.asarray(layer, np.float32) / 127.5 - 1)
    canvas += 128 + rng.normal(0, 6, canvas.shape).astype(np.float32)  # sensor-like grain
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(20, 60))):  # facades, windows, edges
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(8, width // 3)), y0 + int(rng.integers(8, height // 3))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle(box, outline=colour, width=int(rng.integers(1, 5)),
                       fill=colour if rng.random() < 0.3 else None)
    return image


def make_root(root: Path, num_images: int) -> list[Path]:
    """A training-set layout whose train split holds the benchmark images (val/whiten: one image)."""
    rng = np.random.default_rng(0)
    cids = [f"bench{i:06d}xyz" for i in range(num_images)]
    ims = layout.train_images_dir(root, DATASET)
    paths = []
    for i, cid in enumerate(cids):
        path = layout.cid2filename(cid, ims)
        path.parent.mkdir(parents=True, exist_ok=True)
        textured_image(rng, *ORIGINAL_SIZES[i % len(ORIGINAL_SIZES)]).save(path, "JPEG", quality=90)
        paths.append(path)
    none = np.zeros(0, np.int64)
    train = formats.SfmSplit(cids, np.arange(num_images) // 10, none, none)
    val = formats.SfmSplit(cids[:1], np.zeros(1, np.int64), none, none)
    formats.write_sfm_db(layout.train_db_path(root, DATASET), {"train": train, "val": val})
    formats.write_whiten_db(layout.whiten_db_path(root, DATASET), formats.WhitenDb(cids[:1], none, none))
    return paths


def reference_tensor(path: Path, transform) -> torch.Tensor:
    """cirtorch: pil_loader (open + convert RGB), imresize (thumbnail, ANTIALIAS), ToTensor + Normalize."""
    with open(path, "rb") as handle:
        image = Image.open(handle).convert("RGB")
    image.thumbnail((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return transform(image)


def time_pass(produce, items) -> tuple[float, list[torch.Tensor]]:
    started = time.perf_counter()
    tensors = [produce(item) for item in items]
    return time.perf_counter() - started, tensors


def run(num_images: int, rounds: int, workdir: Path) -> dict:
    paths = make_root(workdir, num_images)
    started = time.perf_counter()
    shard_dataset(workdir, DATASET, image_size=IMAGE_SIZE, splits=["train"])
    write_s = time.perf_counter() - started
    reader = ShardReader(layout.shards_dir(workdir, DATASET, IMAGE_SIZE) / "train")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=MEAN, std=STD)])
    torch.set_num_threads(1)  # one DataLoader worker's view: per-sample work on one core
    best_ref = best_ours = float("inf")
    for _ in range(rounds):  # interleaved rounds, best of each: fair under background load
        ref_s, ref_tensors = time_pass(lambda p: reference_tensor(p, transform), paths)
        ours_s, our_tensors = time_pass(lambda i: load_tensor(reader, i, MEAN, STD), range(num_images))
        best_ref, best_ours = min(best_ref, ref_s), min(best_ours, ours_s)
    shapes_match = all(a.shape == b.shape for a, b in zip(ref_tensors, our_tensors))
    if not shapes_match:
        raise SystemExit("shards and reference produced different tensor shapes")
    diff = float(np.mean([(a - b).abs().mean().item() for a, b in zip(ref_tensors, our_tensors)]))
    source_mb = sum(p.stat().st_size for p in paths) / 2**20
    return {"images": num_images, "rounds": rounds, "image_size": IMAGE_SIZE, "original_max_side": 1024,
            "source_mb": source_mb, "shard_mb": reader.manifest["total_bytes"] / 2**20,
            "reference_samples_per_s": num_images / best_ref, "shards_samples_per_s": num_images / best_ours,
            "speedup": best_ref / best_ours, "same_shapes": shapes_match, "mean_abs_diff_normalised": diff,
            "write_images_per_s": num_images / write_s, "write_workers": len(os.sched_getaffinity(0))}


def print_table(result: dict) -> None:
    print(f"\nNormalised training tensor (longest side {result['image_size']}) from {result['images']} "
          f"~1024 px JPEGs ({result['source_mb']:.1f} MB; shards {result['shard_mb']:.1f} MB), "
          f"best of {result['rounds']}, 1 thread")
    print(f"{'approach':<58}{'samples/s':>12}")
    print(f"{'reference: decode original + thumbnail + ToTensor/Normalize':<58}"
          f"{result['reference_samples_per_s']:>12.1f}")
    print(f"{'shards: read by index + decode 362 px + normalise':<58}{result['shards_samples_per_s']:>12.1f}")
    print(f"{'speedup (shards / reference)':<58}{result['speedup']:>11.1f}x")
    print(f"same output shapes: {result['same_shapes']}; mean |difference| of normalised tensors: "
          f"{result['mean_abs_diff_normalised']:.4f}")
    print(f"writing the shards: {result['write_images_per_s']:.1f} images/s with {result['write_workers']} "
          "worker processes (one-off cost)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run that checks the benchmark works")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 240; quick 24)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds, best kept (default 3; quick 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "data.json",
                        help="result file (default runs/bench/data.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AMLDIST_NO_PROGRESS", "1")
    num_images = args.images or (24 if args.quick else 240)
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        result = run(num_images, rounds, Path(tmp))
    result.update(quick=args.quick, python=platform.python_version(), torch=torch.__version__,
                  cpus=os.cpu_count(),
                  command="python benchmarks/bench_data.py" + (" --quick" if args.quick else ""))
    print_table(result)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
