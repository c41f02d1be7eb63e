"""A training run's folder: where it lives, the checks before a run starts or continues, and the defaults
of how it runs (no Ray).

A run named NAME lives in `<storage>/NAME`, Ray Train's run folder: its `checkpoint_epochNNNN/` folders
(each holding `amldist.training.state.CHECKPOINT_FILE`), and beside them rank 0's `model_best.pth.tar`,
`metrics.jsonl`, `negatives.jsonl` and `wandb/`. Storage may also be an object-store URI (s3://, gs://;
`amldist.storage.is_uri`, where file:// counts as a local folder); Ray Train then keeps only its
checkpoints there, and rank 0 writes the rest to `run.out_dir/NAME` on its own node (`local_run_dir`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from amldist.errors import UserError, require
from amldist.storage import is_uri, local_path
from amldist.training.state import CHECKPOINT_FILE, checkpoint_file, load_epochs_done
from amldist.wandb_log import read_metrics

log = logging.getLogger(__name__)

DEFAULT_IMAGE_EVERY = 5   # epochs between records of the fixed anchors' negatives (negatives.jsonl, wandb)
DEFAULT_MAX_FAILURES = 2  # worker-group restarts after a failure (-1: no limit)


def local_run_dir(out_dir: str, storage: str | Path, name: str) -> Path:
    """Where rank 0 writes model_best, metrics.jsonl and wandb: the Ray run folder for a local storage
    path, else `out_dir/<name>` on rank 0's node (a URI storage holds only Ray's checkpoints)."""
    base = out_dir if is_uri(storage) else local_path(storage)
    return Path(base).expanduser().resolve() / name


def check_storage(storage: str | Path) -> None:
    """A storage URI must name a filesystem Ray Train can open (it resolves it with pyarrow, as here):
    one line now instead of a pyarrow traceback after Ray has started. Local folders are left to Ray."""
    if not is_uri(storage):
        return
    import pyarrow
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(str(storage))
    except (pyarrow.ArrowException, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--storage {storage}: not a storage Ray Train can open ({reason})") from None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Ray Train checkpoint folders of a run that hold our checkpoint file, oldest first."""
    found = [d for d in run_dir.glob("checkpoint_*") if (d / CHECKPOINT_FILE).is_file()]
    return sorted(found, key=lambda d: (d / CHECKPOINT_FILE).stat().st_mtime)


def newest_readable_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint folder of a run whose file loads, and why each newer one does not (a truncated
    or damaged file, one line each naming it; Ray Train's workers skip them the same way)."""
    skipped = []
    for folder in reversed(checkpoint_dirs(run_dir)):
        try:
            load_epochs_done(folder / CHECKPOINT_FILE)
        except UserError as err:
            skipped.append(str(err))
            continue
        return folder, skipped
    return None, skipped


def checkpointed_records(run_dir: Path) -> list[dict]:
    """The metrics.jsonl records of the epochs the run's last checkpoint holds: what a continued run will
    not train again. Empty for a run without checkpoints (or with them in a storage URI)."""
    newest, _ = newest_readable_checkpoint(run_dir)  # the one the continued run restores
    if newest is None:
        return []
    done = load_epochs_done(newest / CHECKPOINT_FILE)
    return [record for record in read_metrics(run_dir) if isinstance(record.get("epoch"), int)
            and record["epoch"] < done]


def check_resume(storage: str | Path, name: str, resume: str | None, epochs: int) -> str | None:
    """Refuse to silently continue (or clobber) a run. `resume`: None (a new run), "" (continue the run
    of this name) or a checkpoint to start from. Returns the checkpoint file a new run starts from."""
    if is_uri(storage):  # Ray checks a remote run itself
        return None if not resume else str(checkpoint_file(resume).resolve())
    run_dir = local_path(storage).expanduser() / name
    existing = checkpoint_dirs(run_dir)
    if resume is None:
        require(not existing,
                f"{run_dir} already holds checkpoints of a run named {name!r}; pass --resume to "
                "continue it, or --name to start a new run")
        leftovers = sorted(entry.name for entry in run_dir.iterdir()) if run_dir.is_dir() else []
        require(not leftovers,
                f"{run_dir} already holds files of a run named {name!r} but no checkpoint to resume "
                f"({', '.join(leftovers[:4])}{', ...' if len(leftovers) > 4 else ''}); "
                "pass --name to start a new run, or move that folder away")
        return None
    if resume == "":
        require(bool(existing), f"nothing to resume: no checkpoints in {run_dir}")
        last, skipped = newest_readable_checkpoint(run_dir)
        require(last is not None,
                f"nothing to resume: no checkpoint in {run_dir} loads ({'; '.join(skipped)})")
        if skipped:
            log.warning("skipping unreadable checkpoints: %s; the run continues from %s",
                        "; ".join(skipped), last)
    else:
        require(not existing,
                f"{run_dir} already holds checkpoints; pass --resume without a path to continue "
                f"that run, or --name to start a new run from {resume}")
        last = checkpoint_file(resume)
    done = load_epochs_done(checkpoint_file(last))
    require(done < epochs,
            f"the checkpoint {last} has finished {done} epochs and --epochs asks for {epochs}; "
            f"pass --epochs above {done} to train longer")
    return None if resume == "" else str(Path(last).resolve())  # the workers run in other folders


def interrupted_message(storage: str | Path, name: str, run_dir: Path) -> str:
    """What a stopped run left behind and how to go on from it."""
    if is_uri(storage):
        return (f"training interrupted; its checkpoints are under {str(storage).rstrip('/')}/{name}: "
                f"the same command with --resume continues it")
    if not checkpoint_dirs(run_dir):
        return (f"training interrupted before its first checkpoint, so there is nothing to resume: "
                f"remove {run_dir} or pass --name to start again")
    return (f"training interrupted; its checkpoints are in {run_dir}: "
            "the same command with --resume continues it")
