"""Exploration harness (validation only): one `Trainer` in one process, no Ray (world size 1), as in
docs/measurements/i20-pretrained-provisional/ptrain.py, plus --init (start from a checkpoint's weights)
and --first-epoch (continue the epoch numbering, so the plan draws new tuples).

    PYTHONPATH=. python docs/measurements/avx512-cpu-2026-12-06/lite-demo/ptrain.py CONFIG NAME [--init CKPT] [--first-epoch K] \
        [KEY=VALUE ...]

Saves runs/p/NAME/epochNN.pt and prints one JSON line per epoch (val mAP, CPU seconds)."""
import argparse
import json
import resource
import time
from pathlib import Path

from amldist.checkpoints import load_network_file, save_checkpoint
from amldist.config import apply_overrides, config_from_dict, parse_set, preset_dict
from amldist.miner_actor import Miner
from amldist.training.epoch import Trainer
from amldist.training.paths import prepare_inputs
from amldist.training.state import Progress


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("name")
parser.add_argument("sets", nargs="*")
parser.add_argument("--init", default=None)
parser.add_argument("--first-epoch", type=int, default=0)
args = parser.parse_args()
config = config_from_dict(apply_overrides(preset_dict(args.config), [parse_set(s) for s in args.sets]))
out = Path("runs/p") / args.name
out.mkdir(parents=True, exist_ok=True)
c0, t0 = cpu(), time.time()
paths, labels = prepare_inputs(config)
miner = Miner(labels.clusters, paths.train_store, getattr(paths, "val_store", None), pool_size=config.mining.pool_size)
trainer = Trainer(config, paths, miner)
if args.init:
    trainer.net.load_state_dict(load_network_file(args.init).state_dict())
print(json.dumps({"setup_cpu": round(cpu() - c0, 1), "setup_wall": round(time.time() - t0, 1),
                  "sets": args.sets, "init": args.init}), flush=True)
progress = Progress()
for epoch in range(args.first_epoch, args.first_epoch + config.run.epochs):
    c0, t0 = cpu(), time.time()
    m = trainer.run_epoch(epoch, progress).metrics
    progress.epochs_done = epoch + 1
    save_checkpoint(out / f"epoch{epoch + 1:02d}.pt", trainer.net, epoch=epoch + 1)
    keep = ("loss", "val_map_sym", "val_map_asym", "train_time_s", "mining_time_s", "epoch_time_s")
    print(json.dumps({"epoch": epoch + 1, **{k: round(v, 2) for k, v in m.items() if k in keep},
                      "cpu_s": round(cpu() - c0, 1), "wall_s": round(time.time() - t0, 1)}), flush=True)
