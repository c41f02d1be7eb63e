"""Extraction: images/s of `extract.embed` with aspect-ratio buckets vs one image at a time.

    python benchmarks/bench_extract.py [--quick] [--archs resnet18,mobilenet_v2] [--image-size 1024] \
        [--device cpu]

The reference (cirtorch/aml) forwards test images one at a time (batch size 1) because they keep
their aspect ratio. Both passes here run `extract.embed` on the same images with the same network in
the same process, with the same DataLoader decoding workers; only the batching differs:
- reference: batch_size=1 (one forward per image and scale);
- ours: batch_size=B, images grouped into aspect-ratio buckets, zero-padded, pooled over their
  valid region.
Images are textured JPEGs with the shapes of Oxford/Paris photos (1024x768, 768x1024, ...). Reports
images/s of each, the ratio, and the largest difference between the two sets of descriptors.
Writes runs/bench/extract.json.
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
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amldist import extract
from amldist.batching import bucket_by_shape
from amldist.nets import STUDENTS as STUDENT_ARCHS
from amldist.nets import create_net

# Shapes of the revisited Oxford/Paris photos (most are 1024x768 or 768x1024), scaled to the test size.
PHOTO_SHAPES = [(1024, 768), (768, 1024), (1024, 768), (1024, 683), (1024, 768), (768, 1024), (1024, 576),
                (683, 1024)]


def make_images(folder: Path, count: int, max_side: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = PHOTO_SHAPES[i % len(PHOTO_SHAPES)]
        w, h = max(1, w * max_side // 1024), max(1, h * max_side // 1024)
        coarse = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 8, (h, w, 3))
        pixels = np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def timed_embed(net, source, options: dict, batch_size: int) -> tuple[float, np.ndarray]:
    if options["device"].startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    vectors = extract.embed(net, source, batch_size=batch_size, **options)
    if options["device"].startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, vectors


def run_arch(args: argparse.Namespace, source, arch: str) -> dict:
    torch.manual_seed(0)
    projection_dim = args.projection_dim if arch in STUDENT_ARCHS else None
    net = create_net(arch, pooling="gem", projection_dim=projection_dim, pretrained=False).eval()
    options = {"image_size": args.image_size, "scales": args.scales, "device": args.device,
               "num_workers": args.workers, "autocast": None}
    timed_embed(net, extract.SubsetSource(source, range(min(2, len(source)))), options, 2)  # warm-up
    best_single = best_batched = float("inf")
    for _ in range(args.rounds):  # interleaved rounds, best of each: fair under background load
        single_s, single = timed_embed(net, source, options, batch_size=1)
        batched_s, batched = timed_embed(net, source, options, batch_size=args.batch_size)
        best_single, best_batched = min(best_single, single_s), min(best_batched, batched_s)
    shapes = [extract.input_size(source, i, args.image_size) for i in range(len(source))]
    buckets = bucket_by_shape(shapes, args.batch_size, extract.DEFAULT_MAX_PAD_FRAC)
    return {"arch": arch, "projection_dim": projection_dim, "buckets": len(buckets),
            "one_at_a_time_images_per_s": len(source) / best_single,
            "batched_images_per_s": len(source) / best_batched, "speedup": best_single / best_batched,
            "max_abs_diff": float(np.abs(single - batched).max())}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    source = extract.FileSource(make_images(workdir, args.images, args.image_size))
    runs = [run_arch(args, source, arch) for arch in args.archs]
    return {"images": args.images, "image_size": args.image_size, "scales": args.scales,
            "batch_size": args.batch_size, "device": args.device, "decode_workers": args.workers,
            "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "runs": runs}


def print_table(r: dict) -> None:
    print(f"\n{r['images']} photo-shaped images at max side {r['image_size']}, scales {r['scales']}, "
          f"{r['device']} ({r['torch_threads']} threads), {r['decode_workers']} decode workers, "
          f"best of {r['rounds']}; images/s")
    bucketed = f"buckets (B={r['batch_size']})"
    print(f"{'network':<26}{'one at a time':>14}{bucketed:>17}{'speedup':>9}{'max |diff|':>12}")
    for run in r["runs"]:
        name = run["arch"] + (f" +1x1->{run['projection_dim']}" if run["projection_dim"] else "")
        print(f"{name:<26}{run['one_at_a_time_images_per_s']:>14.2f}{run['batched_images_per_s']:>17.2f}"
              f"{run['speedup']:>8.2f}x{run['max_abs_diff']:>12.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run that checks the benchmark works")
    parser.add_argument("--archs", default=None,
                        help="comma-separated networks (default resnet18,mobilenet_v2; quick small_cnn)")
    parser.add_argument("--projection-dim", type=int, default=512,
                        help="students' 1x1 projection (default 512)")
    parser.add_argument("--image-size", type=int, default=None, help="max side (default 1024; quick 256)")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 16; quick 12)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size of the bucketed pass (default: embed's default, 16 on CUDA, "
                             "4 on CPU)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="extraction scales")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds, best kept (default 2; quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader decode workers (both passes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "extract.json",
                        help="result file (default runs/bench/extract.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AMLDIST_NO_PROGRESS", "1")
    args.archs = (args.archs or ("small_cnn" if args.quick else "resnet18,mobilenet_v2")).split(",")
    args.image_size = args.image_size or (256 if args.quick else 1024)
    args.images = args.images or (12 if args.quick else 16)
    args.rounds = args.rounds or (1 if args.quick else 2)
    device_type = torch.device(args.device).type
    args.batch_size = args.batch_size or extract.DEFAULT_BATCH_SIZE.get(device_type,
                                                                        extract.DEFAULT_BATCH_SIZE["cpu"])
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        result = run(args, Path(tmp))
    result.update(quick=args.quick, python=platform.python_version(), torch=torch.__version__,
                  cpus=os.cpu_count(),
                  command="python benchmarks/bench_extract.py" + (" --quick" if args.quick else ""))
    print_table(result)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
