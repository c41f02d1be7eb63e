"""Searches with Ray Tune on the small synthetic set (tests/train_data.py), each trial a 2-worker Ray Train
run: a 3-trial ASHA search that stops a trial early and leaves no placement group behind, its results and
best preset (which then trains an epoch), and a search interrupted by Ctrl-C and resumed."""

import os
import signal
import time

import pytest
import yaml
from train_data import config_dict

from amldist.config import load_config
from amldist.tuning.plan import SearchSettings, plan_search

ray = pytest.importorskip("ray")
from ray import tune

from amldist.driver import run_training, start_ray
from amldist.tune_search import check_search_folder, run_search
from amldist.wandb_log import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
PLACEMENT_GROUP_CLEANUP_S = 60  # Ray Train's cleaner polls for a dead controller every few seconds


# Ray's memory monitor kills Ray workers once the machine's memory use passes 95 %, whoever uses it; on a
# shared test machine other jobs' memory killed trials of these tests. Off here (the kernel still guards
# against real exhaustion); `amldist tune` itself keeps Ray's default.
TEST_RAY_ENV = {"RAY_memory_monitor_refresh_ms": "0"}


@pytest.fixture(scope="module")
def ray_local():
    """Ray as `amldist tune --local` starts it (with the dashboard, whose state API the placement-group
    cleaner needs); the environment it changes is put back afterwards."""
    keys = ["RAY_API_SERVER_ADDRESS", *TEST_RAY_ENV]
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(TEST_RAY_ENV)
    start_ray(local=True)
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def store_files(root):
    return {path: path.stat().st_mtime_ns for path in (root / "features").rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def asha_search(data_root, ray_local, tmp_path_factory):
    """Three trials in a row, 2 epochs each, ASHA with its first rung after one epoch and half the trials
    going on. The second and third trials learn nothing (lr 1e-9): at the rung each is below the median of
    the trials recorded there before it (the first alone, then the first and the second) and is stopped."""
    stores = store_files(data_root)
    plan = plan_search(config_dict(data_root, "contrastive_plus", epochs=2),
                       searches=["optim.lr=grid(1e-3, 1e-9, 1e-9)"],
                       settings=SearchSettings(num_samples=1, grace_period=1, reduction_factor=2,
                                               max_concurrent=1))
    storage = tmp_path_factory.mktemp("tune")
    outcome = run_search(plan, storage=str(storage), name="asha", wandb="offline")
    return outcome, stores


def test_a_tiny_search_completes_and_writes_its_results(asha_search, data_root):
    outcome, stores = asha_search
    trials = outcome.results.trials
    assert [t.params["optim.lr"] for t in trials] == [1e-3, 1e-9, 1e-9]
    assert all(t.status == "TERMINATED" for t in trials) and not outcome.results.interrupted
    for trial in trials:  # each trial is a full run: its folder, its epochs, its best model
        records = read_metrics(trial.folder)
        # A stopped run may finish the epoch it was in when Tune stopped the trial: Tune never saw that one.
        assert trial.epochs_run <= len(records) <= trial.epochs_run + 1
        seen = records[:trial.epochs_run]
        assert trial.curve("val_map_asym") == [(r["epoch"], r["val_map_asym"]) for r in seen]
        assert os.path.isfile(os.path.join(trial.folder, "model_best.pth.tar"))
        wandb_runs = os.listdir(os.path.join(trial.folder, "wandb"))
        assert any(name.startswith("offline-run-") for name in wandb_runs)  # one wandb run per trial
    assert store_files(data_root) == stores  # the teacher stores were read, never written again
    csv_lines = (outcome.folder / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("trial,optim.lr,best_val_map_asym,best_epoch")
    assert (outcome.folder / "search.png").read_bytes()[:4] == b"\x89PNG"
    best = yaml.safe_load((outcome.folder / "best.yaml").read_text())
    assert best["optim"]["lr"] == 1e-3 and best["run"]["name"] == "asha-best"


def test_asha_stops_a_trial_early_and_leaves_no_placement_group(asha_search):
    from ray.util.state import list_placement_groups

    trials = asha_search[0].results.trials
    assert [t.epochs_run for t in trials] == [2, 1, 1]
    assert [t.stopped_early for t in trials] == [False, True, True]
    deadline = time.monotonic() + PLACEMENT_GROUP_CLEANUP_S
    created = [("state", "=", "CREATED")]
    while (left := list_placement_groups(filters=created)) and time.monotonic() < deadline:
        time.sleep(2)
    assert not left, left


def test_the_best_preset_trains_one_epoch(asha_search, tmp_path):
    config = load_config(str(asha_search[0].folder / "best.yaml"), extra={"run.epochs": 1})
    result = run_training(config, storage=str(tmp_path), name=config.run.name)
    assert result.return_value["epochs_done"] == 1
    assert [r["epoch"] for r in read_metrics(tmp_path / config.run.name)] == [0]


class InterruptAfterFirstTrial(tune.Callback):
    """Ctrl-C, as a user would press it, once the first trial has finished (a marker file keeps the
    restored copy of this callback from pressing it again)."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_search_resumes_with_only_its_unfinished_trials(data_root, ray_local, tmp_path):
    plan = plan_search(config_dict(data_root, "contrastive_plus", epochs=1, num_workers=1),
                       searches=["optim.lr=grid(1e-3, 3e-3)"],
                       settings=SearchSettings(num_samples=1, scheduler="fifo", max_concurrent=1))
    storage = str(tmp_path / "runs")
    ctrl_c = InterruptAfterFirstTrial(str(tmp_path / "pressed"))
    first = run_search(plan, storage=storage, name="cut", callbacks=[ctrl_c])
    assert first.results.interrupted
    done = [t for t in first.results.trials if t.status == "TERMINATED"]
    assert len(done) == 1 and done[0].epochs_run == 1

    def finished_state():  # its run's files (rewritten only by training) and what Tune recorded of it
        times = {name: os.path.getmtime(os.path.join(done[0].folder, name))
                 for name in ("metrics.jsonl", "model_best.pth.tar")}
        with open(os.path.join(done[0].folder, "result.json")) as reports:
            return times, reports.read()

    before = finished_state()

    stored, _ = check_search_folder(plan, storage, "cut", resume=True, wandb="off")
    second = run_search(stored, storage=storage, name="cut", resume=True)
    trials = second.results.trials
    assert not second.results.interrupted and len(trials) == 2
    assert all(t.status == "TERMINATED" and t.epochs_run == 1 for t in trials)
    assert finished_state() == before  # the finished trial did not run again
    assert [t.params["optim.lr"] for t in trials] == [1e-3, 3e-3]
