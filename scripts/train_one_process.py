"""Train a preset in one process without Ray: the `Trainer` that every Ray Train worker runs, here under a
torch.distributed group of one (NCCL on a GPU, gloo on a CPU, so the DDP wrapper and the loop's
all-reduces run as they do on a cluster) with the `Miner` in the same process.

For a machine where Ray is not installed (a lent GPU box), and to check the GPU path end to end: bf16
autocast, channels-last, the NCCL process group, the torch-cuda search backend, validation. It writes no
checkpoint and no wandb run: use `amldist train` for real runs.

    python scripts/train_one_process.py --config presets/tiny-student-contrplus-asym.yaml \
        [--set key=value ...] [--device cuda|cpu] [--epochs N] [--out metrics.json]

Inputs must exist as for `amldist train` (data, shards, teacher stores; the val store is computed when
missing). Prints one line per epoch; --out writes every epoch's metrics, the device and the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amldist.config import load_config
from amldist.errors import UserError
from amldist.miner_actor import Miner, MinerClient
from amldist.training.epoch import Trainer
from amldist.training.paths import prepare_inputs
from amldist.training.state import Progress

SHOWN = ("loss", "avg_neg_distance", "val_map_sym", "val_map_asym", "tuples_per_s", "epoch_time_s",
         "miner_wait_s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_group(device: torch.device) -> torch.device:
    """A process group of one (or torchrun's, when its variables are set); returns this rank's device."""
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per torchrun process
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def ddp_wrapper(device: torch.device):
    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(device)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return wrap


def train(config, device: torch.device) -> list[dict]:
    paths, train_labels = prepare_inputs(config)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    miner = Miner(train_labels.clusters, paths.train_store, paths.val_store,
                  pool_size=config.mining.pool_size, backend=config.mining.backend)
    trainer = Trainer(config, paths, MinerClient(miner), device=device, wrap=ddp_wrapper(device), rank=rank,
                      world_size=world_size)
    say = print if rank == 0 else (lambda *args, **kwargs: None)  # one log under torchrun
    say(f"device {device}, miner backend {miner.backend}, autocast {trainer.settings.amp_dtype}, "
          f"channels-last {trainer.settings.channels_last}, "
          f"process group {dist.get_backend()} x {world_size}",
          flush=True)
    progress, epochs = Progress(), []
    for epoch in range(config.run.epochs):
        metrics = {"epoch": epoch, **trainer.run_epoch(epoch, progress).metrics}
        epochs.append(metrics)
        shown = " ".join(f"{key}={metrics[key]:.4g}" for key in SHOWN if isinstance(metrics.get(key), float))
        say(f"epoch {epoch + 1}/{config.run.epochs}: {shown}", flush=True)
    return epochs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="preset name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=None, help="override run.epochs")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides,
                             {"run.epochs": args.epochs} if args.epochs is not None else None)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here")
    except (UserError, RuntimeError) as err:  # RuntimeError: a malformed --device
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = start_group(device)
    rank = dist.get_rank()
    started = time.perf_counter()
    try:
        epochs = train(config, device)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    total = time.perf_counter() - started
    if rank != 0:
        return 0
    print(f"{len(epochs)} epochs in {total:.1f} s", flush=True)
    if args.out:
        summary = {"config": args.config, "overrides": args.overrides, "device": str(device),
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "total_s": total, "epochs": epochs}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
