"""How a node gets its samples when the shards live in an object store: each candidate's throughput
against reading local shards, in one run.

    python benchmarks/bench_storage.py [--quick] [--images N] [--threads T]

The store is a real S3-API server (moto's server mode, `python -m amldist.loopback_s3`) in its own
process on loopback, so the figures hold its per-request cost and no network: they rank the designs
and show where requests, not bytes, set the pace; a real store adds its latency to every request
(docs/SCALING.md). Every candidate reads the same stored JPEG bytes (decoding costs the same
everywhere: benchmarks/bench_data.py):

- local by index: `ShardReader.read_bytes` on local shards in random order (one pread each), 1 thread;
- local stream: `stream_samples(..., decode=False)` over the local shards, in order;
- store stream: the same WebDataset pipeline over s3:// (one streamed GET per whole shard);
- store cache: `node_cache.cached_copy` fills an empty cache (parallel GETs, sha256 checked), then
  reads are local by index; the fill is paid once per node;
- store ranged: `ShardReader` on s3:// (one ranged GET per sample) in random order, 1 thread and T
  threads (what T DataLoader workers would have in flight).

Writes runs/bench/storage.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_data import DATASET, IMAGE_SIZE, make_root

from amldist import node_cache, storage
from amldist.atomic import atomic_write_json
from amldist.datasets import layout
from amldist.loopback_s3 import TEST_CREDENTIALS, free_port
from amldist.shards import ShardReader, shard_dataset, stream_samples

BUCKET = "bench"


def start_store(port: int) -> subprocess.Popen:
    """The loopback S3 server in its own process (it must not share this process's GIL)."""
    command = [sys.executable, "-m", "amldist.loopback_s3", "--port", str(port), "--bucket", BUCKET]
    server = subprocess.Popen(command,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    server.stdout.readline()  # it prints its variables once the bucket exists
    return server


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    value = work()
    return time.perf_counter() - started, value


def read_by_index(reader: ShardReader, order: np.ndarray, threads: int = 1) -> int:
    if threads == 1:
        return sum(len(reader.read_bytes(int(i))) for i in order)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(lambda i: len(reader.read_bytes(int(i))), order))


def read_stream(split: str) -> int:
    return sum(len(data) for _, data, _ in stream_samples(split, split_by_node=False, split_by_worker=False,
                                                          decode=False))


def rate(n: int, nbytes: int, seconds: float) -> dict:
    return {"seconds": seconds, "samples_per_s": n / seconds, "mb_per_s": nbytes / seconds / 2**20}


def run(num_images: int, threads: int, shard_count: int, workdir: Path) -> dict:
    make_root(workdir / "root", num_images)
    shard_dataset(workdir / "root", DATASET, image_size=IMAGE_SIZE, splits=["train"], shard_count=shard_count)
    local = layout.shards_dir(workdir / "root", DATASET, IMAGE_SIZE) / "train"
    uri = f"s3://{BUCKET}/shards/train"
    upload_s, _ = timed(lambda: storage.upload_tree(local, uri))
    order = np.random.default_rng(0).permutation(ShardReader(local).indices)
    n = len(order)
    results: dict[str, dict] = {}

    reader = ShardReader(local)
    read_by_index(reader, order[:20])  # open the files, map the index
    read_stream(str(local))  # imports webdataset, warms the page cache as the by-index pass does
    seconds, nbytes = timed(lambda: read_by_index(reader, order))
    results["local_by_index"] = rate(n, nbytes, seconds)
    seconds, nbytes = timed(lambda: read_stream(str(local)))
    results["local_stream"] = rate(n, nbytes, seconds)
    seconds, nbytes = timed(lambda: read_stream(uri))
    results["store_stream"] = rate(n, nbytes, seconds)

    os.environ[node_cache.CACHE_VARIABLE] = str(workdir / "cache")
    fill_s, cached = timed(lambda: node_cache.cached_copy(uri))
    warm_s, _ = timed(lambda: node_cache.cached_copy(uri))  # a later use: one GET of the manifest
    cached_reader = ShardReader(cached)
    seconds, nbytes = timed(lambda: read_by_index(cached_reader, order))
    results["store_cache"] = {**rate(n, nbytes, seconds), "fill_s": fill_s, "revalidate_s": warm_s,
                              "fill_mb_per_s": ShardReader(cached).manifest["total_bytes"] / fill_s / 2**20}

    remote = ShardReader(uri)
    seconds, nbytes = timed(lambda: read_by_index(remote, order))
    results["store_ranged_1_thread"] = {**rate(n, nbytes, seconds), "ms_per_request": 1000 * seconds / n}
    remote = ShardReader(uri)
    seconds, nbytes = timed(lambda: read_by_index(remote, order, threads))
    results[f"store_ranged_{threads}_threads"] = rate(n, nbytes, seconds)

    base = results["local_by_index"]["samples_per_s"]
    for entry in results.values():
        entry["vs_local_by_index"] = entry["samples_per_s"] / base
    manifest = ShardReader(local).manifest
    return {"images": n, "image_size": IMAGE_SIZE, "shards": manifest["num_shards"],
            "shard_mb": manifest["total_bytes"] / 2**20, "mean_sample_kb": manifest["total_bytes"] / n / 1024,
            "threads": threads, "upload_s": upload_s, "candidates": results}


def print_table(result: dict) -> None:
    print(f"\n{result['images']} samples ({result['mean_sample_kb']:.0f} KB mean, {result['shards']} shards, "
          f"{result['shard_mb']:.1f} MB) from a loopback S3-API server vs local shards; stored bytes only")
    print(f"{'candidate':<28}{'samples/s':>11}{'MB/s':>9}{'x local':>9}")
    for name, entry in result["candidates"].items():
        print(f"{name:<28}{entry['samples_per_s']:>11.1f}{entry['mb_per_s']:>9.1f}{entry['vs_local_by_index']:>9.3f}")
    cache = result["candidates"]["store_cache"]
    print(f"cache fill: {cache['fill_s']:.2f} s ({cache['fill_mb_per_s']:.1f} MB/s, once per node); "
          f"re-validation of a filled cache: {cache['revalidate_s'] * 1000:.0f} ms; "
          f"ranged GET: {result['candidates']['store_ranged_1_thread']['ms_per_request']:.2f} ms each")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run that checks the benchmark works")
    parser.add_argument("--images", type=int, default=None, help="samples (default 600; quick 40)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent ranged reads (default 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "storage.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("AMLDIST_NO_PROGRESS", "1")
    num_images = args.images or (40 if args.quick else 600)
    port = free_port()
    os.environ.update({**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    server = start_store(port)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
            result = run(num_images, args.threads, max(10, num_images // 6), Path(tmp))
    finally:
        server.terminate()
        server.wait(timeout=30)
    result.update(quick=args.quick, python=platform.python_version(), cpus=os.cpu_count(),
                  command="python benchmarks/bench_storage.py" + (" --quick" if args.quick else ""))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
