"""Render a wandb-style dashboard PNG from a training run's offline wandb files (no server needed).

    python scripts/render_dashboard.py RUN_FOLDER [--out docs/img/dashboard.png]

Reads what rank 0 logged to wandb in offline mode: the per-epoch history from the run's
`wandb/offline-run-*/run-*.wandb` file (wandb's record log: 32 KiB blocks of length-prefixed protobuf
`Record`s), and the hard-negative grids from `files/media/images/hard_negatives_<epoch>_*.png`. When a
run was resumed, its offline runs (same wandb id) are read in order and later epochs replace earlier
ones. Draws the curves a wandb workspace would show and the first and last grid.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
from PIL import Image

BLOCK_BYTES = 32 * 1024
HEADER = b":W&B"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
CURVES = (("loss", "training loss per tuple"), ("val_map", "validation mAP (%)"),
          ("avg_neg_distance", "mean distance to hard negatives"), ("lr", "learning rate"),
          ("tuples_per_s", "training tuples / s"), ("miner_wait_s", "time waiting on the miner (s)"))


def wandb_records(path: Path):
    """The raw protobuf records of a .wandb file (a LevelDB-style log after a 7-byte header)."""
    data = path.read_bytes()
    if data[:4] != HEADER:
        raise SystemExit(f"{path} is not a wandb record file")
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = BLOCK_BYTES - position % BLOCK_BYTES
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def history(run_dirs: list[Path]) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} over the offline runs, later runs overriding earlier steps."""
    from wandb.proto import wandb_internal_pb2

    steps: dict[int, dict[str, float]] = {}
    for run_dir in run_dirs:
        for path in sorted(run_dir.glob("run-*.wandb")):
            for raw in wandb_records(path):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(raw)
                if record.WhichOneof("record_type") != "history":
                    continue
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                step = int(items.get("_step", record.history.step.num))
                steps[step] = {k: v for k, v in items.items() if isinstance(v, (int, float))
                               and not k.startswith("_")}
    return dict(sorted(steps.items()))


def grid_images(run_dirs: list[Path]) -> dict[int, Path]:
    """{epoch: PNG} of the logged hard-negative grids."""
    found = {}
    for run_dir in run_dirs:
        for path in (run_dir / "files" / "media" / "images").glob("hard_negatives_*.png"):
            match = re.match(r"hard_negatives_(\d+)_", path.name)
            if match:
                found[int(match[1])] = path
    return dict(sorted(found.items()))


def render(run_folder: Path, out: Path) -> None:
    runs = sorted((run_folder / "wandb").glob("offline-run-*"))
    if not runs:
        raise SystemExit(f"no offline wandb runs under {run_folder / 'wandb'}")
    steps = history(runs)
    grids = grid_images(runs)
    if not steps:
        raise SystemExit(f"no logged history in {runs}")
    epochs = [step + 1 for step in steps]
    fig = plt.figure(figsize=(11, 7.2), dpi=90)
    spec = fig.add_gridspec(3, 3, height_ratios=[1, 1, 1.35], hspace=0.55, wspace=0.3)
    for index, (key, title) in enumerate(CURVES):
        ax = fig.add_subplot(spec[index // 3, index % 3])
        if key == "val_map":
            for name, style in (("val_map_sym", "-"), ("val_map_asym", "--")):
                values = [row.get(name) for row in steps.values()]
                if any(v is not None for v in values):
                    ax.plot(epochs, values, style, marker="o", ms=3, label=name.removeprefix("val_map_"))
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.plot(epochs, [row.get(key) for row in steps.values()], marker="o", ms=3, color="tab:blue")
        if key == "lr":
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    shown = [min(grids), max(grids)] if len(grids) > 1 else list(grids)
    for column, epoch in enumerate(shown):
        ax = fig.add_subplot(spec[2, column * 3 // 2: (column + 1) * 3 // 2] if len(shown) > 1
                             else spec[2, :])
        ax.imshow(Image.open(grids[epoch]))
        ax.set_title(f"hard_negatives, epoch {epoch + 1}: anchors (green), mined negatives (red)", fontsize=9,
                     loc="left")
        ax.axis("off")
    fig.suptitle(f"{run_folder.name} — rendered from the offline wandb run ({len(steps)} epochs logged)",
                 fontsize=10, x=0.01, ha="left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) from {len(runs)} offline run(s), grids of epochs "
          f"{[e + 1 for e in shown]}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_folder", type=Path, help="a training run folder (holds wandb/offline-run-*)")
    parser.add_argument("--out", type=Path, default=Path("docs/img/dashboard.png"))
    args = parser.parse_args(argv)
    render(args.run_folder, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
