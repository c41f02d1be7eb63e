"""GLDv2 ingestion: CSV rows/s and memory, images/s checked and stored by the importer, and images/s sharded
by the one-machine writer (1 process, all CPUs) against N Ray workers.

    python benchmarks/bench_import.py [--quick] [--rows N] [--images M] [--ray-workers N] [--out FILE]

1. CSV: a GLDv2-style train.csv of N rows (16-hex ids, URLs, landmark ids; default 1M) parsed by
   `read_gldv2_csv` into two integer arrays, against the reference `list(csv.DictReader(f))` (one dict
   of three strings per row, what a short script does) and the floor of counting the file's lines; rows/s
   (best of 3 interleaved rounds) and the peak memory tracemalloc sees while parsing. The same ids as
   train_clean.csv too.
2. Import: M distinct ~640x480 JPEGs in GLDv2's a/b/c/<id>.jpg tree (default 600, 8 per landmark), imported
   by `import_gldv2` with 1 process and with all CPUs (read, digest, decode at 1/8, hard link), against the
   reference of reading and fully decoding each image in one process (PIL open + load) and the floor of
   reading and digesting each one (no check can use less).
3. Sharding the imported train and val splits at 362 px: `shard_dataset` with 1 process (the reference),
   all CPUs as local processes, and N Ray workers (Ray and its N worker processes started before the
   clock, as in a long run; that start-up is reported on its own). Every run writes the same bytes; the
   benchmark checks it.
Writes runs/bench/import.json (or --out).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_data import textured_image  # photo-like pixels, so decoding costs what it does on photos

from amldist.datasets.importing import ImportOptions, RunSettings, import_gldv2, read_gldv2_csv
from amldist.datasets.importing.checks import content_digest
from amldist.shards import shard_dataset

NAME = "gldv2-bench"
IMAGE_SIZE = 362
PER_LANDMARK = 8
CROP = (640, 480)


def write_csvs(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """train.csv (id,url,landmark_id) and train_clean.csv (landmark_id,images) of `rows` random images."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, 2**63, rows * 11 // 10, dtype=np.int64))[:rows]
    # GLDv2 has ~20 images per landmark on average, its largest landmark 0.25 % of the rows: landmark
    # floor(L u^2) for uniform u gives the same mean and a largest share of 1 / sqrt(L) (0.45 % at 1M rows).
    num_landmarks = max(1, rows // 20)
    landmarks = (num_landmarks * rng.random(len(ids)) ** 2).astype(np.int64)
    per_image, per_landmark = folder / "train.csv", folder / "train_clean.csv"
    with open(per_image, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", "url", "landmark_id"])
        for value, landmark in zip(ids.tolist(), landmarks.tolist()):
            writer.writerow([f"{value:016x}", f"https://example.org/photos/{value:016x}/original.jpg",
                             landmark])
    order = np.argsort(landmarks, kind="stable")
    with open(per_landmark, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["landmark_id", "images"])
        bounds = np.flatnonzero(np.r_[True, np.diff(landmarks[order]) != 0, True])
        for a, b in itertools.pairwise(bounds):
            writer.writerow([int(landmarks[order[a]]),
                             " ".join(f"{v:016x}" for v in ids[order[a:b]].tolist())])
    return per_image, per_landmark


def best_times(tasks: dict, rounds: int) -> dict[str, float]:
    """Best wall time of each task over `rounds` interleaved rounds (fair under background load)."""
    best = dict.fromkeys(tasks, float("inf"))
    for _ in range(rounds):
        for name, fn in tasks.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def reference_parse(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def csv_part(folder: Path, rows: int, rounds: int) -> dict:
    per_image, per_landmark = write_csvs(folder, rows)
    best = best_times({"ours": lambda: read_gldv2_csv(per_image),
                       "clean": lambda: read_gldv2_csv(per_landmark),
                       "reference": lambda: reference_parse(per_image),
                       "floor": lambda: count_lines(per_image)},
                      rounds)
    ours_s, clean_s, reference_s, floor_s = best["ours"], best["clean"], best["reference"], best["floor"]
    return {"rows": rows, "csv_mb": per_image.stat().st_size / 2**20, "rounds": rounds,
            "ours_rows_per_s": rows / ours_s, "ours_clean_rows_per_s": rows / clean_s,
            "reference_rows_per_s": rows / reference_s, "floor_rows_per_s": rows / floor_s,
            "speedup_vs_reference": reference_s / ours_s, "floor_over_ours": ours_s / floor_s,
            "ours_peak_mb": traced_peak(lambda: read_gldv2_csv(per_image)) / 2**20,
            "reference_peak_mb": traced_peak(lambda: reference_parse(per_image)) / 2**20}


def write_image_tree(folder: Path, count: int) -> Path:
    """`count` distinct JPEGs (crops of a few textured 1024x768 pictures) as GLDv2's tree and train.csv."""
    rng = np.random.default_rng(1)
    bases = [np.asarray(textured_image(rng, 1024, 768)) for _ in range(6)]
    rows = []
    for k in range(count):
        image_id = f"{int(rng.integers(0, 2**63)):016x}"
        base = bases[k % len(bases)]
        x, y = int(rng.integers(0, 1024 - CROP[0])), int(rng.integers(0, 768 - CROP[1]))
        crop = Image.fromarray(base[y:y + CROP[1], x:x + CROP[0]])
        path = folder / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, "JPEG", quality=90)
        rows.append(f"{image_id},,{k // PER_LANDMARK}\n")
    (folder / "train.csv").write_text("id,url,landmark_id\n" + "".join(rows))
    return folder


def one_process_rate(tree: Path, work) -> float:
    paths = sorted((tree / "train").rglob("*.jpg"))
    started = time.perf_counter()
    for path in paths:
        work(path.read_bytes())
    return len(paths) / (time.perf_counter() - started)


def full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def import_part(tree: Path, data: Path, cpus: int) -> dict:
    rates = {}
    for label, workers in (("1_process", 0), (f"{cpus}_processes", cpus)):
        started = time.perf_counter()
        record = import_gldv2(tree / "train.csv", tree / "train", data / label, NAME, ImportOptions(),
                              RunSettings(workers=workers))
        rates[label] = record["counts"]["listed"] / (time.perf_counter() - started)
    return {"images": record["counts"]["listed"], "kept": record["counts"]["kept"], "images_per_s": rates,
            "floor_read_digest_per_s": one_process_rate(tree, content_digest),
            "reference_read_full_decode_per_s": one_process_rate(tree, full_decode)}


def _warm_worker() -> int:
    """Start a Ray worker process and import the writer in it, as a long run's workers would have done."""
    import amldist.shards.write  # noqa: F401

    time.sleep(1.0)  # hold the CPU, so that the next warm-up task starts another worker
    return os.getpid()


def shard_part(data: Path, cpus: int, ray_workers: int) -> dict:
    root = data / "1_process"  # the set imported above
    runs = {"1_process": {"workers": 0}, f"{cpus}_processes": {"workers": cpus},
            f"{ray_workers}_ray_workers": {"ray_workers": ray_workers}}
    import ray

    from amldist.ray_session import ensure_ray

    started = time.perf_counter()
    ensure_ray(ray_workers)
    warm = ray.remote(num_cpus=1)(_warm_worker)
    ray.get([warm.remote() for _ in range(ray_workers)])
    ray_start_s = time.perf_counter() - started
    rates, digests = {}, {}
    try:
        for label, kwargs in runs.items():
            out = data / "shards" / label
            started = time.perf_counter()
            manifests = shard_dataset(root, NAME, out=out, image_size=IMAGE_SIZE, splits=["train", "val"],
                                      shard_count=64, **kwargs)
            images = sum(m["num_images"] for m in manifests.values())
            rates[label] = images / (time.perf_counter() - started)
            digests[label] = [s["sha256"] for m in manifests.values() for s in m["shards"]]
    finally:
        ray.shutdown()
    reference = rates["1_process"]
    return {"images": images, "image_size": IMAGE_SIZE, "ray_start_s": ray_start_s, "images_per_s": rates,
            "ratio_to_1_process": {label: rate / reference for label, rate in rates.items()},
            "same_bytes": len({tuple(d) for d in digests.values()}) == 1}


def print_table(result: dict) -> None:
    c = result["csv"]
    print(f"\nGLDv2 CSV, {c['rows']:,} rows ({c['csv_mb']:.0f} MB), best of {c['rounds']}")
    print(f"{'parser':<50}{'rows/s':>12}{'peak MB':>12}")
    print(f"{'floor: count the lines':<50}{c['floor_rows_per_s']:>12,.0f}{'':>12}")
    print(f"{'reference: list(csv.DictReader)':<50}{c['reference_rows_per_s']:>12,.0f}"
          f"{c['reference_peak_mb']:>12.1f}")
    print(f"{'ours: read_gldv2_csv (train.csv)':<50}{c['ours_rows_per_s']:>12,.0f}{c['ours_peak_mb']:>12.1f}")
    print(f"{'ours: read_gldv2_csv (train_clean.csv, images/s)':<50}{c['ours_clean_rows_per_s']:>12,.0f}")
    i = result["import"]
    print(f"\nimport of {i['images']} ~640x480 JPEGs (check + hard link): images/s")
    print(f"  floor: read + digest, 1 process: {i['floor_read_digest_per_s']:.0f}")
    print(f"  reference: read + full decode, 1 process: {i['reference_read_full_decode_per_s']:.0f}")
    for label, rate in i["images_per_s"].items():
        print(f"  {label}: {rate:.0f}")
    s = result["shards"]
    print(f"\nsharding {s['images']} images at {s['image_size']} px (same bytes: {s['same_bytes']}); "
          f"Ray start-up with worker warm-up {s['ray_start_s']:.1f} s not counted")
    for label, rate in s["images_per_s"].items():
        print(f"  {label:<18}{rate:8.1f} images/s  {s['ratio_to_1_process'][label]:5.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run that checks the benchmark works")
    parser.add_argument("--rows", type=int, default=None, help="CSV rows (default 1,000,000; quick 20,000)")
    parser.add_argument("--images", type=int, default=None,
                        help="images to import and shard (default 600; quick 48)")
    parser.add_argument("--ray-workers", type=int, default=None, help="Ray workers (default: all CPUs)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "import.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("AMLDIST_NO_PROGRESS", "1")
    cpus = len(os.sched_getaffinity(0))
    load_start = os.getloadavg()  # other jobs on the machine: the parallel rows mean little when it is high
    rows = args.rows or (20_000 if args.quick else 1_000_000)
    images = args.images or (48 if args.quick else 600)
    with tempfile.TemporaryDirectory(prefix="bench_import_") as tmp:
        tmp = Path(tmp)
        (tmp / "csv").mkdir()
        result = {"csv": csv_part(tmp / "csv", rows, 1 if args.quick else 3)}
        tree = write_image_tree(tmp / "gldv2", images)
        result["import"] = import_part(tree, tmp / "data", cpus)
        result["shards"] = shard_part(tmp / "data", cpus, args.ray_workers or cpus)
    result.update(quick=args.quick, cpus=cpus, python=platform.python_version(),
                  load_average_start=load_start, load_average_end=os.getloadavg(),
                  command="python benchmarks/bench_import.py" + (" --quick" if args.quick else ""))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
