"""Rank 0's record of a training run: `metrics.jsonl` always, Weights & Biases unless turned off.

Under Ray Train V2, Ray's `setup_wandb` does not honour rank-0-only (observed with Ray 2.60), so rank 0 calls
`wandb.init` itself. Modes: `off` (no wandb files at all), `offline` (files under `<run>/wandb/`, upload
later with `wandb sync <run>/wandb/offline-run-*`), `online`, and `auto` = online when WANDB_API_KEY is
set, else offline. An `online` start that fails (no key, no network) falls back to offline with a warning.

The wandb run id is kept in `<run>/wandb-id.txt`, so a resumed training run logs into the same wandb run.
`metrics.jsonl` holds one JSON object per finished epoch; on resume, lines of epochs that will be trained
again (after a failure) are dropped first, atomically. `events.jsonl` keeps what the epochs do not show:
one line per start of the workers (fresh, or resumed after a failure or a stop, and from which
checkpoint) and the error that stopped a run; it is never trimmed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from amldist.atomic import atomic_write_text, json_ready
from amldist.errors import UserError

log = logging.getLogger(__name__)

MODES = ("off", "offline", "online", "auto")
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
WANDB_ID_FILE = "wandb-id.txt"


def resolve_mode(requested: str | None, enabled_in_config: bool) -> str:
    """The wandb mode to use: the --wandb flag if given, else `auto` when run.wandb is true, else off.
    `auto` becomes online or offline here."""
    mode = requested if requested is not None else ("auto" if enabled_in_config else "off")
    if mode not in MODES:
        raise UserError(f"--wandb: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run folder's metrics.jsonl (empty when there is none)."""
    return _read_jsonl(Path(run_dir) / METRICS_FILE)


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run folder's events.jsonl (empty when there is none)."""
    return _read_jsonl(Path(run_dir) / EVENTS_FILE)


def append_event(run_dir: str | Path, event: str, **fields: Any) -> None:
    """One line in `<run_dir>/events.jsonl`: the event, the time, and `fields`."""
    record = {"event": event, "time": round(time.time(), 3), **json_ready(fields)}
    _append_line(Path(run_dir) / EVENTS_FILE, record)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:  # one line per record; a torn last line is skipped by the readers
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash mid-write
    return [r for r in records if isinstance(r, dict)]


class RunLog:
    """Per-epoch metrics and images of rank 0; every method is cheap when wandb is off."""

    def __init__(self, run_dir: str | Path, *, mode: str, project: str, name: str, config: dict[str, Any],
                 start_epoch: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._keep_epochs_before(start_epoch)
        self.run = None if mode == "off" else self._start_wandb(mode, project, name, config)

    def _keep_epochs_before(self, start_epoch: int) -> None:
        records = [r for r in read_metrics(self.run_dir) if r.get("epoch", -1) < start_epoch]
        if self.metrics_path.is_file():
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def _start_wandb(self, mode: str, project: str, name: str, config: dict[str, Any]):
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id + "\n")
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                                  save_code=False)
        options = {"project": project, "name": name, "id": run_id, "resume": "allow",
                   "dir": str(self.run_dir), "config": config, "settings": settings}
        try:
            return wandb.init(mode=mode, **options)
        except Exception as err:  # wandb raises many kinds when it cannot go online
            if mode != "online":
                raise
            log.warning("wandb could not start online (%s); logging offline instead",
                        str(err).splitlines()[0])
            return wandb.init(mode="offline", **options)

    @property
    def wandb_dir(self) -> Path | None:
        return None if self.run is None else Path(self.run.dir).parent

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        record = {"epoch": int(epoch), **json_ready(metrics)}
        _append_line(self.metrics_path, record)  # a torn last line is dropped on resume
        if self.run is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))
                       and not isinstance(v, bool)}
            self.run.log(numbers, step=int(epoch))

    def log_image(self, epoch: int, key: str, image: np.ndarray, caption: str) -> None:
        """An (H, W, 3) uint8 image, e.g. the hard-negative grid."""
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(np.ascontiguousarray(image), caption=caption)}, step=int(epoch))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
