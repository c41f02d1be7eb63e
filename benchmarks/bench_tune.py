"""Cost of a hyper-parameter search: `amldist tune` against the same configurations trained by sequential
`amldist train` commands (the reference a user would run), in one run of this script.

Four configurations of the demo's Contr+ student (presets/tiny-student-contrplus-asym.yaml: lr x margin
on a 2 x 2 grid) on the tiny synthetic set at 64 px with a random small_cnn teacher (built once under
runs/bench/tune-data), each trained for --epochs epochs with --num-workers workers:
- sequential: 4 `amldist train --local` commands, one after the other (each imports, starts Ray, trains,
  stops Ray);
- search: one `amldist tune --local --scheduler fifo` over the same grid (FIFO, so every trial trains all
  its epochs, as the commands do), once with trials one at a time and once two at a time.
Every command runs as a subprocess and is timed from outside. The floor is the training work itself: the
sum of the epochs' `epoch_time_s` of the sequential runs. The miner part times starting a run's miner
actor (what each trial pays for its own miner) and reads its memory, and averages the trials' time
blocked on miner calls per epoch.

    python benchmarks/bench_tune.py [--quick] [--epochs E] [--num-workers W] [--out FILE]

Prints a table and writes runs/bench/tune.json (or --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/bench/tune.json")
WORK = Path("runs/bench/tune")
DATA = Path("runs/bench/tune-data")
PRESET = "presets/tiny-student-contrplus-asym.yaml"
IMAGE_SIZE = 64
GRID = {"optim.lr": (3e-4, 1e-3), "loss.margin": (0.8, 0.9)}


def build_data(root: Path) -> None:
    """The tiny synthetic set, its shards at 64 px, a random small_cnn teacher and its feature stores."""
    import torch

    from amldist.checkpoints import export_network_file
    from amldist.config import load_config
    from amldist.nets import create_net
    from amldist.shards import shard_dataset
    from amldist.synth.writer import generate
    from amldist.teacher_features import compute_features
    from amldist.training.paths import default_store_dir, prepare_inputs, shard_root

    if (root / "ready").is_file():
        return
    generate(root, "tiny", seed=0)
    shard_dataset(root, "retrieval-SfM-120k", image_size=IMAGE_SIZE, splits=["train", "val"])
    torch.manual_seed(0)
    export_network_file(root / "teacher.pth", create_net("small_cnn", "gem", None, pretrained=False))
    config = load_config(PRESET, base_sets(root, 1))
    compute_features(root / "teacher.pth", shard_root(config) / "train", default_store_dir(config))
    prepare_inputs(config)  # the val store
    (root / "ready").write_text("")


def base_sets(root: Path, epochs: int) -> list[str]:
    return [f"data.root={root}", f"model.teacher={root / 'teacher.pth'}", f"data.image_size={IMAGE_SIZE}",
            f"run.epochs={epochs}", "run.wandb=false"]


def amldist(args: list[str], log: Path) -> float:
    """Wall seconds of one `amldist ...` command in a new interpreter (as a user runs it)."""
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "amldist.cli.main", *args], stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"`amldist {' '.join(args)}` failed (exit {done.returncode}); see {log}")
    return seconds


def epoch_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def sequential(root: Path, configs: list[dict], args) -> dict:
    storage, seconds, work = WORK / "sequential", [], []
    for index, values in enumerate(configs):
        sets = [*base_sets(root, args.epochs), *(f"{k}={v}" for k, v in values.items())]
        name = f"run{index}"
        command = ["train", "--config", PRESET, "--local", "--num-workers", str(args.num_workers),
                   "--storage", str(storage), "--name", name, "--wandb", "off",
                   *itertools.chain.from_iterable(("--set", s) for s in sets)]
        seconds.append(amldist(command, WORK / f"{name}.log"))
        work.append(sum(r["epoch_time_s"] for r in epoch_records(storage / name)))
        print(f"amldist train {values}: {seconds[-1]:.1f} s (epochs {work[-1]:.1f} s)", flush=True)
    return {"runs_s": seconds, "total_s": sum(seconds), "epochs_s": work, "epochs_total_s": sum(work)}


def search(root: Path, args, concurrent: int) -> dict:
    name = f"search-k{concurrent}"
    storage = WORK / "search"
    searches = [f"{key}=grid({', '.join(map(str, values))})" for key, values in GRID.items()]
    seconds = amldist(["tune", "--config", PRESET, "--local", "--num-workers", str(args.num_workers),
                       "--storage", str(storage), "--name", name, "--wandb", "off", "--scheduler", "fifo",
                       "--num-samples", "1", "--max-concurrent", str(concurrent),
                       *itertools.chain.from_iterable(("--search", s) for s in searches),
                       *itertools.chain.from_iterable(("--set", s) for s in base_sets(root, args.epochs))],
                      WORK / f"{name}.log")
    trials = json.loads((storage / name / "results.json").read_text())["trials"]
    records = [r for t in trials for r in epoch_records(storage / name / f"trial_{t['trial']}")]
    print(f"amldist tune, {concurrent} trial(s) at once: {seconds:.1f} s", flush=True)
    return {"wall_s": seconds, "trials": len(trials),
            "epochs_total_s": sum(r["epoch_time_s"] for r in records),
            "miner_wait_s_per_epoch": sum(r["miner_wait_s"] for r in records) / max(len(records), 1),
            "mining_s_per_epoch": sum(r["mining_time_s"] for r in records) / max(len(records), 1)}


def miner_costs(root: Path, starts: int) -> dict:
    """Seconds to start a run's miner actor until it answers (what each trial pays for its own), and the
    resident memory of one miner process."""
    import ray

    from amldist.config import load_config
    from amldist.driver import start_ray
    from amldist.miner_actor import start_miner
    from amldist.training.paths import prepare_inputs

    config = load_config(PRESET, base_sets(root, 1))
    start_ray(True)
    try:
        paths, labels = prepare_inputs(config)
        seconds, rss = [], []
        for index in range(starts):
            started = time.perf_counter()
            miner = start_miner(labels.clusters, paths.train_store, paths.val_store,
                                name=f"bench-miner-{index}", pool_size=config.mining.pool_size)
            pid = ray.get(miner.stats.remote())["pid"]
            seconds.append(time.perf_counter() - started)
            rss.append(resident_mb(pid))
            ray.kill(miner)
    finally:
        ray.shutdown()
    return {"start_s": seconds, "rss_mb": rss}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resident_mb(pid: int) -> float:
    """Resident memory of a process (Linux: /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 configurations, 1 epoch, one search (a smoke run)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1
        GRID["loss.margin"] = GRID["loss.margin"][:1]
    configs = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    build_data(DATA.resolve())
    root = DATA.resolve()
    load_before = os.getloadavg()
    miner = miner_costs(root, 1 if args.quick else 3)
    seq = sequential(root, configs, args)
    searches = {str(k): search(root, args, k) for k in ((2,) if args.quick else (1, 2))}
    results = {"machine": cpu_model(), "cpus": os.cpu_count(),
               "load_before": load_before, "load_after": os.getloadavg(), "configs": configs,
               "epochs": args.epochs, "num_workers": args.num_workers, "sequential": seq, "search": searches,
               "search_over_sequential": {k: s["wall_s"] / seq["total_s"] for k, s in searches.items()},
               "miner": miner}
    rows = [(f"{len(configs)} x amldist train (sequential)", seq["total_s"])]
    rows += [(f"amldist tune, {k} trial(s) at once", s["wall_s"]) for k, s in searches.items()]
    rows += [("floor: the sequential runs' epochs", seq["epochs_total_s"])]
    print(f"\n{'':<42}{'seconds':>9}{'ratio':>8}")
    for label, seconds in rows:
        print(f"{label:<42}{seconds:9.1f}{seconds / seq['total_s']:8.2f}")
    print(f"miner start {', '.join(f'{s:.1f}' for s in miner['start_s'])} s, "
          f"{', '.join(f'{m:.0f}' for m in miner['rss_mb'])} MB resident; load average before "
          f"{load_before[0]:.1f}, after {results['load_after'][0]:.1f} on {results['cpus']} CPUs")
    from amldist.atomic import atomic_write_json

    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
