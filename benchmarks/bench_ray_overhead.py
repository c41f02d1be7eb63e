"""Fixed cost of a training run under Ray: imports, `ray.init`, and a Ray Train fit that does nothing.

Every `amldist train` (and every demo stage, and every Tune trial) pays this before its first epoch and
after its last, whatever the run's size. The imports are timed in fresh interpreters (a Ray Train
worker is one); the fit runs `TorchTrainer` with a train function that only imports `amldist.worker`,
as our workers do, so its time is Ray Train's own start and stop plus that import; the train function's
start and end times split it into the time until it starts, the import, and the time after it.

    python benchmarks/bench_ray_overhead.py [--quick] [--num-workers N] [--fits K]

Prints a table and writes runs/bench/ray_overhead.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path("runs/bench/ray_overhead.json")
MODULES = ("torch", "ray.train.torch", "amldist.worker")


def import_seconds(module: str) -> float:
    """Wall time of `import module` in a new interpreter (bytecode already cached by earlier runs)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def noop_loop(_config: dict) -> dict[str, float]:
    entered = time.time()  # wall clock: the driver compares it with its own (one machine)
    import amldist.worker  # noqa: F401  (what every training worker imports first)
    return {"entered": entered, "left": time.time()}


def fit_phases(num_workers: int, storage: str, index: int) -> dict[str, float]:
    """Seconds of one no-op fit: in all, until rank 0's train function starts (controller, worker group,
    process group), inside it (the import), and after it returns until `fit` does."""
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(noop_loop, scaling_config=ScalingConfig(num_workers=num_workers),
                           run_config=RunConfig(name=f"noop-{index}", storage_path=storage,
                                                logging_config=LoggingConfig(log_level="WARNING")))
    started = time.time()
    marks = trainer.fit().return_value
    ended = time.time()
    return {"fit_s": ended - started, "to_train_fn_s": marks["entered"] - started,
            "import_in_worker_s": marks["left"] - marks["entered"], "after_train_fn_s": ended - marks["left"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one fit, torch's import only (a smoke run)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--fits", type=int, default=None, help="no-op fits in a row (default 3; quick 1)")
    args = parser.parse_args()
    fits = args.fits or (1 if args.quick else 3)
    imports = {module: import_seconds(module) for module in (MODULES[:1] if args.quick else MODULES)}

    from amldist.atomic import atomic_write_json
    from amldist.driver import start_ray

    started = time.perf_counter()
    start_ray(True)
    init_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as storage:
        phases = [fit_phases(args.num_workers, storage, index) for index in range(fits)]
    fit_s = [phase["fit_s"] for phase in phases]
    results = {"num_workers": args.num_workers, "import_s": imports, "ray_init_s": init_s,
               "noop_fit_s": fit_s, "noop_fit_phases": phases}
    for module, seconds in imports.items():
        print(f"import {module:<28} {seconds:6.1f} s")
    print(f"ray.init (local)                   {init_s:6.1f} s")
    print(f"no-op TorchTrainer.fit, {args.num_workers} workers   "
          + ", ".join(f"{s:.1f}" for s in fit_s) + " s")
    for name, label in (("to_train_fn_s", "  until the train function starts"),
                        ("import_in_worker_s", "  import amldist.worker in it"),
                        ("after_train_fn_s", "  after it returns")):
        print(f"{label:<35}" + ", ".join(f"{phase[name]:.1f}" for phase in phases) + " s")
    atomic_write_json(OUT, results)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
