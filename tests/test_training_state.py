"""Resume state round trip, the validation protocol, rank 0's run log (metrics.jsonl + wandb offline)
and the hard-negative grid."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from amldist.config import config_from_dict
from amldist.errors import UserError
from amldist.nets import create_net
from amldist.training.grid import negatives_grid
from amldist.training.optim import make_optimizer, make_scheduler, set_train_mode, start_epoch_schedule
from amldist.training.plan import SplitLabels
from amldist.training.state import (
    CHECKPOINT_FILE,
    Progress,
    checkpoint_file,
    load_epochs_done,
    load_training_state,
    save_training_state,
)
from amldist.training.validation import ValidationSet
from amldist.wandb_log import METRICS_FILE, RunLog, read_metrics, resolve_mode

CONFIG = config_from_dict({"model": {"arch": "small_cnn", "pretrained": False},
                           "optim": {"optimizer": "sgd", "lr": 0.05, "lr_decay": 0.9}})


def student(seed):
    torch.manual_seed(seed)
    net = set_train_mode(create_net("small_cnn", "gem", None, pretrained=False))
    optimizer = make_optimizer(net, CONFIG.optim)
    return net, optimizer, make_scheduler(optimizer, CONFIG.optim.lr_decay)


def train_step(net, optimizer, seed):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    (net(x) * torch.linspace(-1, 1, 128)).sum().backward()
    optimizer.step()


def test_resume_state_round_trip_continues_identically(tmp_path):
    net, optimizer, scheduler = student(0)
    for epoch in range(2):
        start_epoch_schedule(scheduler)
        train_step(net, optimizer, epoch)
    progress = Progress(epochs_done=2, global_step=2, best_score=41.5, best_epoch=1,
                        best_metric="val_map_asym")
    path = save_training_state(tmp_path / CHECKPOINT_FILE, net, optimizer, scheduler, {"a": 1}, progress,
                               {"loss": 0.3})

    net2, optimizer2, scheduler2 = student(1)  # other weights, empty optimiser state
    restored = load_training_state(checkpoint_file(tmp_path), net2, optimizer2, scheduler2)
    assert restored == progress and load_epochs_done(path) == 2
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    momentum = [optimizer.state[p]["momentum_buffer"] for p in net.parameters()]
    momentum2 = [optimizer2.state[p]["momentum_buffer"] for p in net2.parameters()]
    for a, b in zip(momentum, momentum2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert scheduler2.last_epoch == scheduler.last_epoch == 2
    # The next epoch runs at lr * 0.9^3 on both and the weights stay identical.
    assert start_epoch_schedule(scheduler) == start_epoch_schedule(scheduler2) == \
        pytest.approx(0.05 * 0.9 ** 3)
    train_step(net, optimizer, 7)
    train_step(net2, optimizer2, 7)
    for a, b in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_other_networks_and_missing_files(tmp_path):
    net, optimizer, scheduler = student(0)
    save_training_state(tmp_path / CHECKPOINT_FILE, net, optimizer, scheduler, {}, Progress(epochs_done=1))
    other = create_net("resnet18", "gem", None, pretrained=False)
    with pytest.raises(UserError, match="small_cnn"):
        load_training_state(tmp_path / CHECKPOINT_FILE, other)
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint_file(tmp_path / "nowhere")


def test_validation_excludes_the_query_itself():
    clusters = np.array([0, 0, 0, 1, 1, 1])
    labels = SplitLabels(np.array([0, 3, 0]), np.array([1, 4, 2]), clusters)
    val = ValidationSet.from_labels(labels)
    assert val.query_ids.tolist() == [0, 3]
    assert val.gnd[0]["ok"].tolist() == [1, 2] and val.gnd[0]["junk"].tolist() == [0]
    perfect = np.eye(2)[clusters] + 0.01 * np.arange(6)[:, None]  # (6, 2): clusters are orthogonal
    assert val.scores(perfect, None) == {"val_map_sym": pytest.approx(100.0)}
    # A teacher database that ranks the query's own image first scores nothing extra for it: the query is
    # junk, so only the ordering of the other images counts.
    teacher = np.eye(2)[1 - clusters]  # clusters swapped: every positive ranks below every negative
    teacher[[0, 3]] = perfect[[0, 3]] * 10
    scores = ValidationSet.from_labels(labels).scores(perfect, teacher)
    assert scores["val_map_sym"] == pytest.approx(100.0)
    assert scores["val_map_asym"] < 60.0


def test_run_log_writes_metrics_and_trims_on_resume(tmp_path):
    first = RunLog(tmp_path, mode="off", project="p", name="r", config={})
    for epoch in range(3):
        first.log_epoch(epoch, {"loss": 1.0 / (epoch + 1), "val_map_sym": float("nan")})
    first.finish()
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert read_metrics(tmp_path)[0]["val_map_sym"] is None  # NaN is not JSON
    assert not (tmp_path / "wandb").exists()  # off writes no wandb files
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"epoch": 3, "lo')  # torn by a crash
    resumed = RunLog(tmp_path, mode="off", project="p", name="r", config={}, start_epoch=2)
    resumed.log_epoch(2, {"loss": 0.1})
    assert [(r["epoch"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 1.0), (1, 0.5), (2, 0.1)]


def test_run_log_offline_wandb_keeps_one_run_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(None, True) == "offline" and resolve_mode(None, False) == "off"
    with pytest.raises(UserError, match="--wandb"):
        resolve_mode("cloud", True)
    log = RunLog(tmp_path, mode="offline", project="amldist-test", name="r", config={"lr": 0.1})
    log.log_epoch(0, {"loss": 0.5})
    log.log_image(0, "hard_negatives", np.zeros((8, 12, 3), np.uint8), caption="grid")
    run_id = log.run.id
    log.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("files/media/images/hard_negatives_0_*.png"))
    again = RunLog(tmp_path, mode="offline", project="amldist-test", name="r", config={}, start_epoch=1)
    assert again.run.id == run_id
    again.finish()
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])["loss"] == 0.5


def test_negatives_grid_layout():
    anchor = Image.new("RGB", (40, 20), (0, 0, 255))
    negative = Image.new("RGB", (20, 40), (255, 255, 0))
    grid = negatives_grid([[anchor, negative, negative], [anchor, negative]], cell=32, border=2, gap=4)
    assert grid.shape == (2 * 32 + 3 * 4, 3 * 32 + 4 * 4, 3) and grid.dtype == np.uint8
    assert tuple(grid[4, 4]) == (40, 170, 60)       # the anchor's green frame
    assert tuple(grid[4, 4 + 36]) == (200, 40, 40)  # a negative's red frame
    assert tuple(grid[4 + 16, 4 + 16]) == (0, 0, 255)  # the anchor itself
