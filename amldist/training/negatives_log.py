"""`<run>/negatives.jsonl`: the hard negatives mined for a few fixed anchors, one line per epoch (no Ray).

Each line is `{"epoch": e, "anchors": [ids], "negatives": [[ids], ...]}` with training-split dataset
indices, negatives most similar first, as the miner returned them. It is what the paper's Fig. 2 shows
(the demo report draws it); rank 0 appends a line whenever it has probed the fixed anchors.
A resumed run may write an epoch again: readers keep the last line of each epoch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

NEGATIVES_FILE = "negatives.jsonl"


def append_negatives(run_dir: str | Path, epoch: int, anchors: np.ndarray, negatives: np.ndarray) -> None:
    """Append epoch `epoch`'s record: anchors (p,), negatives (p, N)."""
    anchors = np.asarray(anchors, np.int64).reshape(-1)
    negatives = np.asarray(negatives, np.int64).reshape(len(anchors), -1)
    record = {"epoch": int(epoch), "anchors": anchors.tolist(), "negatives": negatives.tolist()}
    with open(Path(run_dir) / NEGATIVES_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_negatives(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run folder, one per epoch (the last written), by epoch; [] when there is none."""
    path = Path(run_dir) / NEGATIVES_FILE
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
            if len(record["anchors"]) != len(record["negatives"]):
                continue
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a crash mid-write
        by_epoch[epoch] = record
    return [by_epoch[e] for e in sorted(by_epoch)]
