"""The search endpoint under load: p50/p99 latency and throughput per query network, against the same
queries answered in-process (the floor an HTTP endpoint adds to).

    python benchmarks/bench_serve.py [--quick] [--duration 10] [--concurrency 1 8] [--out FILE.json]

Builds its own data: a gallery of `--gallery` textured photos (the shapes of Oxford/Paris photos, at
`--photo-side` px), a random small_cnn teacher (d=128) that indexes it (flat, at `--image-size`), a random
mini_cnn student that records that teacher, exported to ONNX and TorchScript. For each query network
(ONNX, TorchScript, the checkpoint), it first times `AsymmetricSearch.search` in this process over the
query set (the floor: preprocessing + network + faiss), then starts `amldist serve`'s app on a loopback
port in a background thread and runs `amldist.retrieval.loadtest.run_load_test` at each concurrency for
`--duration` seconds (every reply checked against the in-process answer; malformed uploads must get a
4xx). Random weights: the latency of a network does not depend on what it learned. Writes
runs/bench/serve.json (and --out, when given).
"""

from __future__ import annotations

import argparse
import io
import json
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

from amldist.atomic import atomic_write_json
from amldist.checkpoints import save_checkpoint
from amldist.feature_store import file_sha256
from amldist.nets import create_net
from amldist.nets.meta import TEACHER_KEY
from amldist.retrieval.export import export_query_network
from amldist.retrieval.gallery import folder_gallery
from amldist.retrieval.index import GalleryIndex, IndexSettings, build_index
from amldist.retrieval.loadtest import LoadQuery, run_load_test
from amldist.retrieval.query import AsymmetricSearch
from amldist.retrieval.query_net import load_query_network
from amldist.retrieval.server import start_in_thread

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_extract import make_images  # the textured photos of the extraction benchmark


def networks(folder: Path, image_size: int) -> tuple[Path, Path]:
    torch.manual_seed(1)
    teacher_net = create_net("small_cnn", "gem", None, pretrained=False)
    teacher = save_checkpoint(folder / "teacher.pt", teacher_net, epoch=1)
    torch.manual_seed(2)
    student = create_net("mini_cnn", "gem", 128, pretrained=False)
    student.meta.extra[TEACHER_KEY] = {"network_sha256": file_sha256(teacher), "architecture": "small_cnn",
                                       "dim": 128, "network": str(teacher)}
    config = {"data": {"image_size": image_size}}
    return teacher, save_checkpoint(folder / "student.pt", student, epoch=1, config=config)


def load_queries(paths: list[Path], searcher: AsymmetricSearch, k: int) -> list[LoadQuery]:
    queries = []
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        bbx = None if i % 2 else (w * 0.2, h * 0.15, w * 0.8, h * 0.9)  # half whole, half cropped queries
        expected = tuple(hit.name for hit in searcher.search(image, bbx, k))
        queries.append(LoadQuery(path.read_bytes(), bbx, k, expected))
    return queries


def in_process_seconds(searcher: AsymmetricSearch, queries: list[LoadQuery]) -> list[float]:
    times = []
    for query in queries:
        image = Image.open(io.BytesIO(query.body)).convert("RGB")  # decoding is part of what the server does
        started = time.perf_counter()
        searcher.search(image, query.bbx, query.k)
        times.append(time.perf_counter() - started)
    return times


def run_network(kind: str, path: Path, index: GalleryIndex, query_paths: list[Path], args) -> dict:
    searcher = AsymmetricSearch(index, load_query_network(path))
    queries = load_queries(query_paths, searcher, args.k)
    in_process_seconds(searcher, queries[:2])  # warm-up (TorchScript specialises on its first calls)
    floor = in_process_seconds(searcher, queries)
    result = {"kind": kind, "in_process_p50_ms": float(np.percentile(floor, 50) * 1000),
              "in_process_p99_ms": float(np.percentile(floor, 99) * 1000),
              "in_process_per_s": len(floor) / sum(floor), "load": []}
    with start_in_thread(searcher, threads=args.threads) as server:
        for concurrency in args.concurrency:
            report = run_load_test(server.url, queries, concurrency=concurrency, duration_s=args.duration,
                                   max_requests=args.max_requests)
            summary = report.summary()
            summary["passed"] = report.passed
            result["load"].append(summary)
            refused = all(m["ok"] for m in summary["malformed"])
            print(f"{kind:12s} c={concurrency:2d}: {summary['requests']:5d} queries, p50 "
                  f"{summary['p50_ms']:7.1f} ms, p99 {summary['p99_ms']:7.1f} ms, "
                  f"{summary['throughput_per_s']:6.1f}/s, failed "
                  f"{summary['failed']}, mismatched {summary['mismatched']}, malformed refused {refused}"
                  f" (in process p50 {result['in_process_p50_ms']:.1f} ms)", flush=True)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small gallery, 2 s per load")
    parser.add_argument("--gallery", type=int, default=300)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--photo-side", type=int, default=640, help="longest side of the photos")
    parser.add_argument("--image-size", type=int, default=128, help="the demo's image size")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2, help="the server's query threads")
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.gallery, args.queries, args.duration = 40, 6, 2.0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("gallery", "queries", "check"):
            (folder / name).mkdir()
        make_images(folder / "gallery", args.gallery, args.photo_side, seed=0)
        query_paths = make_images(folder / "queries", args.queries, args.photo_side, seed=1)
        teacher, student = networks(folder, args.image_size)
        build_index(teacher, folder_gallery(folder / "gallery"), folder / "index",
                    IndexSettings(image_size=args.image_size, workers=0))
        index = GalleryIndex.open(folder / "index")
        check = make_images(folder / "check", 2, args.photo_side, seed=2)
        files = {"onnx": export_query_network(student, folder / "s.onnx", "onnx", check_images=check).path,
                 "torchscript": export_query_network(student, folder / "s.pt", "torchscript",
                                                     check_images=check).path,
                 "checkpoint": student}
        results = [run_network(kind, path, index, query_paths, args) for kind, path in files.items()]
    out = {"benchmark": "serve", "machine": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "gallery": args.gallery, "queries": args.queries,
           "photo_side": args.photo_side, "image_size": args.image_size, "duration_s": args.duration,
           "server_threads": args.threads, "k": args.k, "networks": results,
           "passed": all(load["passed"] for r in results for load in r["load"])}
    for path in [ROOT / "runs" / "bench" / "serve.json", *([args.out] if args.out else [])]:
        atomic_write_json(path, out)
    print(json.dumps({"passed": out["passed"]}))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
