"""The fault matrix of docs/RELIABILITY.md that needs no Ray cluster of the test's own: data errors found
before training starts, a NaN loss inside the epoch, a truncated latest checkpoint, a full disk while a
checkpoint is written, the one-line errors of DataLoader processes, the callback that keeps Ray Train from
retrying a UserError, and the driver stopped by SIGTERM and SIGINT (`amldist train` in a subprocess).

The faults of a running Ray Train run (a worker killed mid-epoch, a garbled shard sample, a non-finite
loss) are in tests/test_training_ray.py, the miner's (killed mid-call, soak) in tests/test_miner_actor.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import yaml
from train_data import make_config, shard_folder

from amldist.cli.main import main
from amldist.errors import UserError, user_message
from amldist.feature_store import MANIFEST
from amldist.miner_actor import Miner, MinerClient
from amldist.nets import create_net
from amldist.runs import check_resume, newest_readable_checkpoint
from amldist.shards import CorruptSampleError
from amldist.training.epoch import FiniteLosses, NonFiniteLoss, Trainer
from amldist.training.paths import default_store_dir, prepare_inputs, read_labels, resolve_paths
from amldist.training.state import CHECKPOINT_FILE, Progress, save_training_state
from amldist.wandb_log import read_events, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("amldist: error: "), err
    return err


# ---------------------------------------------------------------- data errors, before training starts


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_shard_is_one_line_before_ray_starts(data_root, tmp_path, capsys, damage):
    import ray

    shards = shutil.copytree(shard_folder(data_root), tmp_path / "shards")
    tar = shards / "val" / "val-000000.tar"
    if damage == "missing":
        tar.unlink()
    else:
        tar.write_bytes(tar.read_bytes()[:1000])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(data_root), "image_size": 64, "shards": str(shards)},
        "model": {"arch": "small_cnn", "pretrained": False, "teacher": str(data_root / "teacher.pth")},
        "loss": {"name": "regression"}, "run": {"epochs": 1}}))
    assert main(["train", "--config", str(config), "--local", "--storage", str(tmp_path / "runs")]) == 2
    err = one_line_error(capsys)
    assert f"shard {tar} " in err
    assert ("is missing" in err) if damage == "missing" else ("holds 1000 bytes" in err)
    assert (f"`amldist data shards --root {data_root} --dataset retrieval-SfM-120k --image-size 64 "
            f"--splits val --out {shards}`") in err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_a_feature_store_whose_checksum_does_not_match_stops_before_any_worker(data_root, tmp_path):
    stores = shutil.copytree(default_store_dir(make_config(data_root, "regression")).parent, tmp_path / "f")
    manifest = json.loads((stores / "train" / MANIFEST).read_text())
    array = stores / "train" / manifest["array_file"]
    data = bytearray(array.read_bytes())
    data[-2] ^= 0x40  # one bit of the last vector
    array.write_bytes(bytes(data))
    config = make_config(data_root, "regression", data={"teacher_features": str(stores / "train")})
    with pytest.raises(UserError) as caught:
        prepare_inputs(config)  # what run_training does first, before the miner and the workers
    message = str(caught.value)
    assert f"teacher features in {array} do not match the checksum" in message
    assert f"`amldist features --network {data_root / 'teacher.pth'} --shards " in message
    assert message.endswith(f"--out {stores / 'train'} --force`")


def test_an_error_a_dataloader_process_raised_is_still_one_line(data_root, tmp_path):
    """torch re-raises it with the process's traceback as the message; the worker passes on its last line."""
    from amldist.training.data import TrainImages, step_loader

    shards = shutil.copytree(shard_folder(data_root) / "train", tmp_path / "train")
    (shards / "train-000000.tar").unlink()
    loader = step_loader(TrainImages(shards, 64, [0.5] * 3, [0.2] * 3), [np.array([3])], workers=1)
    with pytest.raises(CorruptSampleError) as caught:
        next(iter(loader))
    assert "\n" in str(caught.value)  # the DataLoader's wrapping
    line = user_message(caught.value)
    assert "\n" not in line
    assert line.startswith(f"shard {shards / 'train-000000.tar'} is missing; rewrite it with")
    assert user_message(UserError("plain")) == "plain"


# ---------------------------------------------------------------- a NaN loss


def test_a_nan_loss_stops_the_epoch_at_its_step_before_the_optimiser_uses_it(data_root, monkeypatch):
    config = make_config(data_root, "contrastive_plus", epochs=1, num_workers=1)
    paths = resolve_paths(config)
    labels, _ = read_labels(paths)
    trainer = Trainer(config, paths, MinerClient(Miner(labels.clusters, paths.train_store, paths.val_store,
                                                       pool_size=60)))
    real_loss, calls = trainer.loss_fn, []

    def nan_at_the_third_step(batch):
        calls.append(1)
        losses = real_loss(batch)
        return losses * float("nan") if len(calls) == 3 else losses

    trainer.loss_fn = nan_at_the_third_step
    weights = {}
    trainer.after_step = lambda epoch, step: weights.update(
        {step: [p.detach().clone() for p in trainer.net.parameters()]})
    progress = Progress()
    with pytest.raises(NonFiniteLoss) as caught:
        trainer.run_epoch(0, progress)
    assert (caught.value.epoch, caught.value.step, caught.value.num_steps) == (0, 2, 6)
    assert str(caught.value) == "the loss became nan at epoch 0, step 3 of 6 (rank 0)"
    assert progress.global_step == 2 and sorted(weights) == [0, 1]  # the third never reached the optimiser
    for now, before in zip(trainer.net.parameters(), weights[1]):
        assert torch.equal(now, before)


def test_on_a_gpu_the_check_reads_one_step_behind():
    """The host never waits for the device's latest step; the epoch's end reads the rest."""
    finite, nan = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])
    behind = FiniteLosses(epoch=4, num_steps=9, rank=1, lag=1)
    behind.add(0, finite)
    behind.add(1, nan)  # not read yet
    with pytest.raises(NonFiniteLoss, match="at epoch 4, step 2 of 9 .rank 1."):
        behind.add(2, finite)
    last = FiniteLosses(epoch=0, num_steps=2, rank=0, lag=1)
    last.add(0, finite)
    last.add(1, torch.tensor([float("inf")]))
    with pytest.raises(NonFiniteLoss, match="became inf at epoch 0, step 2 of 2"):
        last.flush()


# ---------------------------------------------------------------- checkpoints: truncated, full disk


def checkpoint_of(run_dir, epochs_done):
    net = create_net("small_cnn", "gem", None, pretrained=False)
    path = run_dir / f"checkpoint_epoch{epochs_done:04d}" / CHECKPOINT_FILE
    save_training_state(path, net, None, None, {}, Progress(epochs_done=epochs_done))
    os.utime(path, (time.time() - 100 + epochs_done, time.time() - 100 + epochs_done))  # in epoch order
    return path


def test_a_truncated_latest_checkpoint_is_skipped_for_the_one_before_and_said(tmp_path, caplog):
    run_dir = tmp_path / "runs" / "r"
    checkpoint_of(run_dir, 1)
    latest = checkpoint_of(run_dir, 2)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    os.utime(latest, (time.time(), time.time()))
    folder, skipped = newest_readable_checkpoint(run_dir)
    assert folder == run_dir / "checkpoint_epoch0001" and len(skipped) == 1 and str(latest) in skipped[0]
    with caplog.at_level("WARNING", logger="amldist.runs"):
        assert check_resume(str(tmp_path / "runs"), "r", "", 3) is None  # Ray's workers skip it the same way
    assert "skipping unreadable checkpoints" in caplog.text and str(latest) in caplog.text
    assert "continues from " + str(run_dir / "checkpoint_epoch0001") in caplog.text
    first = run_dir / "checkpoint_epoch0001" / CHECKPOINT_FILE
    first.write_bytes(b"")
    with pytest.raises(UserError, match="nothing to resume: no checkpoint in .* loads"):
        check_resume(str(tmp_path / "runs"), "r", "", 3)


def test_a_restarted_worker_takes_a_newer_checkpoint_ray_had_not_registered(tmp_path):
    """A worker group killed right after rank 0 reported epoch 2's checkpoint: the folder is written, but
    Ray Train (which polls the reports) still names epoch 1's as the last. The restart must not train
    epoch 2 again; a newer folder that does not load is skipped for Ray's."""
    from ray.train import Checkpoint

    from amldist.training.state import load_epochs_done
    from amldist.worker import _restore_newest_readable

    class Restorer:  # the one Trainer method the choice uses
        def restore(self, path):
            return Progress(epochs_done=load_epochs_done(path))

    run_dir = tmp_path / "r"
    checkpoint_of(run_dir, 1)
    checkpoint_of(run_dir, 2)
    registered = Checkpoint(str(run_dir / "checkpoint_epoch0001"))
    progress, checkpoints = _restore_newest_readable(Restorer(), registered, rank=0)
    assert progress.epochs_done == 2 and checkpoints.resumed_from == str(run_dir / "checkpoint_epoch0002")
    torn = checkpoint_of(run_dir, 3)
    torn.write_bytes(torn.read_bytes()[:100])
    progress, checkpoints = _restore_newest_readable(Restorer(), registered, rank=0)
    assert progress.epochs_done == 2 and len(checkpoints.skipped) == 1
    assert str(torn.parent) in checkpoints.skipped[0]


FULL_DISK_WRITER = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from amldist.atomic import disk_full_is_fatal
    from amldist.errors import UserError
    from amldist.nets import create_net
    from amldist.training.state import Progress, save_training_state

    net = create_net("small_cnn", "gem", None, pretrained=False)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        with disk_full_is_fatal("the checkpoint of epoch 1", "the last good checkpoint is the one before"):
            save_training_state(Path(sys.argv[1]), net, None, None, {}, Progress(epochs_done=2))
    except UserError as err:
        print(err)
        sys.exit(3)
""")


def test_a_full_disk_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path):
    """The writing process meets a file-size limit (RLIMIT_FSIZE) half-way through the checkpoint."""
    run_dir = tmp_path / "runs" / "r"
    good = checkpoint_of(run_dir, 1)
    before = good.read_bytes()
    assert len(before) > 64 * 1024  # the limit cuts the next write short
    target = run_dir / "checkpoint_epoch0002" / CHECKPOINT_FILE
    done = subprocess.run([sys.executable, "-c", FULL_DISK_WRITER, str(target)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=300, check=False)
    assert done.returncode == 3, done.stderr
    assert done.stdout == ("cannot write the checkpoint of epoch 1: File too large; the last good checkpoint "
                           "is the one before\n")
    assert list(target.parent.iterdir()) == []  # no half-written file, no temporary left
    assert good.read_bytes() == before
    assert newest_readable_checkpoint(run_dir) == (run_dir / "checkpoint_epoch0001", [])
    assert check_resume(str(tmp_path / "runs"), "r", "", 3) is None


# ---------------------------------------------------------------- no retry of a UserError


def test_a_workers_user_error_stops_the_run_and_other_errors_are_left_to_the_retries():
    pytest.importorskip("ray")
    from ray.train import ControllerError
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    from amldist.driver import StopOnUserError

    def as_ray_hands_it_over(error):  # what Ray Train's worker makes of an exception of the train function
        try:
            raise error
        except (RuntimeError, UserError) as raised:
            return construct_user_exception_with_traceback(raised)

    callback = StopOnUserError()
    callback.after_exception(None, {0: as_ray_hands_it_over(RuntimeError("gloo: connection reset"))})
    with pytest.raises(ControllerError) as caught:
        callback.after_exception(None, {0: as_ray_hands_it_over(RuntimeError("reset")),
                                        1: as_ray_hands_it_over(CorruptSampleError("sample 3 is corrupt"))})
    assert isinstance(caught.value.controller_failure, UserError)
    assert str(caught.value.controller_failure) == "sample 3 is corrupt"


# ---------------------------------------------------------------- the driver stopped by a signal


# `amldist train`, with the run paused mid-epoch when asked: an epoch of the test data lasts well under a
# second, less than Ray Train takes to register a checkpoint, so a signal could not be aimed at one.
LAUNCH = """
import functools, sys
import amldist.driver
from amldist.cli.main import main
if sys.argv[1] != "-":
    pause = int(sys.argv[1])
    amldist.driver.run_training = functools.partial(amldist.driver.run_training, pause_at_epoch=pause)
sys.exit(main(sys.argv[2:]))
"""


def start_training(config, storage, pause_at_epoch=None, *extra):
    command = [sys.executable, "-c", LAUNCH, "-" if pause_at_epoch is None else str(pause_at_epoch), "train",
               "--config", str(config), "--local", "--storage", str(storage), "--name", "sig",
               "--max-failures", "0", *extra]
    return subprocess.Popen(command, env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_in_epoch(process, run_dir, epoch, signum):
    """Send `signum` to the driver while a worker is paused in the middle of `epoch` and Ray Train has
    registered the checkpoint before it; returns (exit code, stdout, stderr)."""
    marker, snapshot = run_dir / f"pause-epoch{epoch}.pid", run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 540
    wanted = f"checkpoint_epoch{epoch:04d}"
    while not (marker.is_file() and snapshot.is_file() and wanted in snapshot.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signum)
    out, err = process.communicate(timeout=240)
    marker.unlink()
    return process.returncode, out, err


@pytest.mark.slow
def test_the_driver_stopped_by_sigterm_and_sigint_keeps_its_checkpoints_and_resume_continues(data_root,
                                                                                             tmp_path):
    """A scheduler's SIGTERM in epoch 2; the latest checkpoint then truncated, as a disk might leave it;
    `--resume` skips it for the one before, says so, trains on, and Ctrl-C's SIGINT stops it in epoch 2."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(data_root), "image_size": 64, "workers": 0},
        "model": {"arch": "small_cnn", "pretrained": False, "teacher": str(data_root / "teacher.pth")},
        "loss": {"name": "regression"}, "mining": {"queries_per_epoch": 20},
        "optim": {"optimizer": "adam", "lr": 1e-3},
        "run": {"epochs": 3, "batch_size": 10, "num_workers": 2}}))
    storage, run_dir = tmp_path / "runs", tmp_path / "runs" / "sig"
    said = (f"amldist: training interrupted; its checkpoints are in {run_dir}: the same command with "
            "--resume continues it")

    code, _, err = stop_in_epoch(start_training(config, storage, 2), run_dir, 2, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and said in err.splitlines(), err  # workers' log lines may follow
    latest = run_dir / "checkpoint_epoch0002"
    assert newest_readable_checkpoint(run_dir) == (latest, [])  # it loads, and so does every other

    damaged = latest / CHECKPOINT_FILE
    damaged.write_bytes(damaged.read_bytes()[:4096])
    code, _, err = stop_in_epoch(start_training(config, storage, 2, "--resume"), run_dir, 2, signal.SIGINT)
    assert code == 130 and said in err.splitlines(), err
    assert f"skipping unreadable checkpoints: {damaged}" in err  # said before Ray starts
    starts = [e for e in read_events(run_dir) if e["event"] == "start"]
    assert [s["epochs_done"] for s in starts] == [0, 1]  # resumed after epoch 1, not 2
    assert starts[1]["resumed_from"].endswith("checkpoint_epoch0001")
    assert str(damaged) in starts[1]["skipped_checkpoints"][0]
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1]  # epoch 1 trained again, logged once
    again = run_dir / "checkpoint_epoch0002-r1"  # not in the damaged folder Ray Train would delete later
    state = torch.load(again / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 2 and state["metrics"]["progress"]["global_step"] == 2 * 2
    assert newest_readable_checkpoint(run_dir)[0] == again


def test_the_summary_names_the_checkpoints_a_resumed_run_skipped(tmp_path, capsys):
    from types import SimpleNamespace

    from amldist.cli.train import print_summary

    value = {"skipped_checkpoints": ["/r/checkpoint_epoch0002 (truncated)"],
             "resumed_from": "/r/checkpoint_epoch0001"}
    print_summary(SimpleNamespace(return_value=value, checkpoint=None), tmp_path, "off")
    assert ("note: unreadable checkpoints skipped: /r/checkpoint_epoch0002 (truncated); the run went on from "
            "/r/checkpoint_epoch0001") in capsys.readouterr().out
