"""What a training checkpoint holds beyond the network, and its round trip (no Ray).

The file is an amldist checkpoint (`amldist.checkpoints.save_checkpoint`, written atomically):
weights, meta, optimiser and scheduler state, the config, and in `metrics` the run's `Progress` (epochs
done, optimiser steps, best validation score) plus the last epoch's metrics. `epoch` counts finished
epochs, as cirtorch's does, so a resumed run starts at epoch index `epoch`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from amldist.checkpoints import restore_training_state, safe_torch_load, save_checkpoint
from amldist.errors import UserError

CHECKPOINT_FILE = "checkpoint.pth.tar"  # inside each Ray Train checkpoint folder
BEST_FILE = "model_best.pth.tar"        # in the run folder: the best model by validation


@dataclass
class Progress:
    epochs_done: int = 0                 # finished epochs; the next epoch index
    global_step: int = 0                 # optimiser steps so far
    best_score: float | None = None      # best validation score (or lowest loss, see `better`)
    best_epoch: int | None = None
    best_metric: str = ""                # which metric `best_score` is

    def better(self, score: float, higher_is_better: bool = True) -> bool:
        if self.best_score is None:
            return True
        return score > self.best_score if higher_is_better else score < self.best_score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Progress:
        data = dict(data or {})
        known = {key: data[key] for key in ("epochs_done", "global_step", "best_score", "best_epoch",
                                            "best_metric") if key in data}
        return cls(**known)


def save_training_state(path: str | Path, net: nn.Module, optimizer, scheduler, config: dict,
                        progress: Progress, epoch_metrics: dict | None = None) -> Path:
    """Everything needed to resume at epoch `progress.epochs_done`, written atomically."""
    return save_checkpoint(path, net, epoch=progress.epochs_done, optimizer=optimizer, scheduler=scheduler,
                           config=config,
                           metrics={"progress": progress.to_dict(), "epoch": epoch_metrics or {}})


def load_training_state(path: str | Path, net: nn.Module, optimizer=None, scheduler=None) -> Progress:
    """Load weights (into `net`), optimiser and scheduler state from a checkpoint; returns its Progress."""
    state = safe_torch_load(path, map_location="cpu")
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{path}: not an amldist training checkpoint")
    stored_arch = (state.get("meta") or {}).get("architecture")
    own_arch = getattr(getattr(net, "meta", None), "architecture", stored_arch)
    if stored_arch != own_arch:
        raise UserError(f"{path}: holds a {stored_arch} network, this run trains a {own_arch}")
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: its weights do not fit this run's network "
                        f"({str(err).splitlines()[0]})") from None
    epochs = restore_training_state(state, optimizer, scheduler)
    progress = Progress.from_dict((state.get("metrics") or {}).get("progress"))
    progress.epochs_done = epochs
    return progress


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or the file inside a checkpoint folder (a Ray Train `checkpoint_*` folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    return path


def load_epochs_done(path: str | Path) -> int:
    """The finished-epoch count stored in a checkpoint file."""
    state = safe_torch_load(path, map_location="cpu")
    if not isinstance(state, dict) or "epoch" not in state:
        raise UserError(f"{path}: not an amldist training checkpoint")
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise UserError(f"{path}: damaged training checkpoint (epoch is {epoch!r}, not a count)")
    return epoch
