"""Exploration only (not committed): the training loop in one process, no Ray (world size 1).
Usage: ptrain.py CONFIG NAME [KEY=VALUE ...]; saves runs/p/NAME/epochNN.pt, prints per-epoch metrics + CPU s."""
import json, sys, time, os, resource
from pathlib import Path
from amldist.config import preset_dict, apply_overrides, parse_set, config_from_dict
from amldist.training.paths import prepare_inputs
from amldist.training.epoch import Trainer
from amldist.training.state import Progress
from amldist.miner_actor import Miner
from amldist.checkpoints import save_checkpoint

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime

cfg_path, name, *sets = sys.argv[1:]
config = config_from_dict(apply_overrides(preset_dict(cfg_path), [parse_set(s) for s in sets]))
out = Path("runs/p") / name; out.mkdir(parents=True, exist_ok=True)
c0, t0 = cpu(), time.time()
paths, labels = prepare_inputs(config)
miner = Miner(labels.clusters, paths.train_store, pool_size=config.mining.pool_size)
trainer = Trainer(config, paths, miner)
print(json.dumps({"setup_cpu": round(cpu() - c0, 1), "setup_wall": round(time.time() - t0, 1)}), flush=True)
progress = Progress()
for epoch in range(config.run.epochs):
    c0, t0 = cpu(), time.time()
    outcome = trainer.run_epoch(epoch, progress)
    progress.epochs_done = epoch + 1
    m = outcome.metrics
    save_checkpoint(out / f"epoch{epoch + 1:02d}.pt", trainer.net, epoch=epoch + 1)
    print(json.dumps({"epoch": epoch + 1, **{k: round(v, 2) for k, v in m.items() if k in
          ("loss", "val_map_sym", "val_map_asym", "train_time_s", "mining_time_s", "val_time_s", "epoch_time_s")},
          "cpu_s": round(cpu() - c0, 1), "wall_s": round(time.time() - t0, 1)}), flush=True)
