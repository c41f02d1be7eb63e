"""Hyper-parameter search: search-space parsing and checks (no Ray), the results table and best preset from
plain trial records, and real searches with Ray Tune on the small synthetic set (tests/train_data.py):
ASHA stopping a trial early without leaking its placement group, the best preset training, and an
interrupted search resumed."""

import json
import math
import re

import pytest
import yaml

from amldist.cli.main import main
from amldist.config import config_from_dict, preset_dict, preset_sections
from amldist.errors import UserError
from amldist.tuning.plan import SearchPlan, SearchSettings, plan_search
from amldist.tuning.results import SearchResults, TrialRecord, best_preset_text, format_table
from amldist.tuning.space import Dimension, default_space, parse_dimension

TINY = "tiny-student-contrplus-asym"


# ------------------------------------------------------------------ parsing and checks (no Ray)


def test_expressions_parse_into_dimensions():
    lr = parse_dimension("optim.lr=loguniform(1e-4, 1e-2)")
    assert lr == Dimension("optim.lr", "loguniform", (1e-4, 1e-2))
    assert parse_dimension(" loss.margin = uniform(0.6,1) ") == Dimension("loss.margin", "uniform", (0.6, 1))
    assert parse_dimension("mining.num_negatives=choice(3, 5, 10)").args == (3, 5, 10)
    assert parse_dimension("optim.optimizer=grid(adam, 'sgd')").args == ("adam", "sgd")
    assert parse_dimension("mining.num_negatives=randint(3,11)").extremes() == [3, 10]  # high is exclusive
    assert parse_dimension("optim.lr=loguniform(1e-4,1e-2)").log_scale


@pytest.mark.parametrize("text, says", [
    ("optim.lr=loguniform(1e-4,1e-2", "expected KEY=FUNCTION(ARGS)"),
    ("optim.lr loguniform(1e-4,1e-2)", "expected KEY=FUNCTION(ARGS)"),
    ("optim.lrr=uniform(1e-4,1e-2)", "unknown config key 'optim.lrr'"),
    ("optim.lr=uniform(1e-2,1e-4)", "inverted range"),
    ("loss.margin=uniform(0.7,0.7)", "empty range"),
    ("optim.lr=loguniform(0,1e-2)", "needs 0 < low"),
    ("optim.lr=logunifrom(1e-4,1e-2)", "unknown function 'logunifrom'"),
    ("optim.lr=__import__('os').system('true')", "unknown function '__import__'"),
    ("optim.lr=uniform(1e-4)", "takes 2 numbers, got 1"),
    ("optim.lr=uniform(1e-4,nan)", "not a finite number"),
    ("optim.lr=uniform(1e-4,,1)", "an empty argument"),
    ("optim.lr=choice()", "needs at least one value"),
    ("mining.num_negatives=uniform(3,10)", "is an integer"),
    ("loss.asym=uniform(0,1)", "is not a number"),
])
def test_malformed_or_impossible_expressions_are_refused(text, says):
    with pytest.raises(UserError, match=re.escape(says)):
        parse_dimension(text)


@pytest.mark.parametrize("search, says", [
    ("optim.lr=uniform(-1e-3,1e-2)", "optim.lr: must be > 0"),       # a non-positive lr the space could draw
    ("optim.lr=choice(1e-3, 0)", "optim.lr: must be > 0"),
    ("loss.margin=uniform(0.5,1.5)", "out of range for the contrastive_plus loss"),
    ("run.num_workers=choice(1,2)", "not searchable"),
])
def test_a_space_that_can_draw_an_invalid_config_is_refused(search, says):
    with pytest.raises(UserError, match=says):
        plan_search(preset_dict(TINY), searches=[search])


def test_the_default_space_is_centred_on_the_papers_values():
    contr_asym = config_from_dict({"model": {"teacher": "vgg16"}, "loss": {"name": "contrastive_plus"}})
    lr, margin = default_space(contr_asym)
    assert lr == Dimension("optim.lr", "loguniform", (1e-4, 1e-2))  # §4.1: 1e-3 for asym contrastive
    assert margin == Dimension("loss.margin", "uniform", (0.5, 0.9))  # the registry's 0.7, +-0.2
    triplet = config_from_dict({"model": {"teacher": "vgg16"}, "loss": {"name": "triplet"}})
    assert default_space(triplet)[0].args == pytest.approx((1e-9, 1e-7))
    assert default_space(triplet)[1].args == (0.0, 0.3)  # the triplet margin stays >= 0
    regression = config_from_dict({"model": {"teacher": "vgg16"}, "loss": {"name": "regression"}})
    assert [d.key for d in default_space(regression)] == ["optim.lr"]
    plan = plan_search(preset_dict(TINY))
    assert [d.key for d in plan.dimensions] == ["optim.lr", "loss.margin"]
    assert plan.metric == "val_map_asym" and plan.mode == "max"  # what the run picks its best model by


def test_a_tune_section_is_read_and_flags_win(tmp_path):
    preset = tmp_path / "search.yaml"
    data = {**preset_dict(TINY), "tune": {"search": {"optim.lr": "loguniform(1e-4, 1e-2)",
                                                     "mining.num_negatives": [3, 5]},
                                          "num_samples": 3, "scheduler": "fifo"}}
    preset.write_text(yaml.safe_dump(data))
    base, section = preset_sections(str(preset))
    assert "tune" not in base and section["num_samples"] == 3  # `amldist train` on this file ignores it
    plan = plan_search(base, section=section, searches=["optim.lr=loguniform(1e-3,1e-1)"],
                       settings=SearchSettings(num_samples=5), source=str(preset))
    assert plan.num_samples == 5 and plan.scheduler == "fifo"
    assert {d.key: d for d in plan.dimensions}["optim.lr"].args == (1e-3, 1e-1)
    negatives = {d.key: d for d in plan.dimensions}["mining.num_negatives"]
    assert negatives == Dimension("mining.num_negatives", "choice", (3, 5))
    assert SearchPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # search.json round trip
    with pytest.raises(UserError, match="unknown tune setting samples"):
        plan_search(base, section={"samples": 3})


def test_bad_search_input_is_one_line_and_exit_2_before_ray_starts(monkeypatch, capsys):
    import amldist.driver

    monkeypatch.setattr(amldist.driver, "start_ray", lambda local: pytest.fail("Ray started"))
    cases = [["--search", "optim.lr=loguniform(1e-4,1e-2"], ["--search", "optim.bogus=uniform(1,2)"],
             ["--search", "loss.margin=uniform(0.9,0.6)"], ["--search", "optim.lr=uniform(0,1e-2)"]]
    for extra in cases:
        assert main(["tune", "--config", TINY, "--local", *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (extra, err)
    for extra in (["--max-concurrent", "0"], ["--scheduler", "hyperband"]):  # argparse's checks: also exit 2
        with pytest.raises(SystemExit) as stop:
            main(["tune", "--config", TINY, "--local", *extra])
        assert stop.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_table_and_best_preset_come_from_the_trials_records():
    plan = plan_search(preset_dict(TINY), searches=["optim.lr=loguniform(1e-4,1e-2)"],
                       settings=SearchSettings(num_samples=3))

    def trial(index, lr, scores, status="TERMINATED"):
        epochs = [{"epoch": e, "val_map_asym": s, "loss": 1.0} for e, s in enumerate(scores)]
        return TrialRecord(f"t_{index}", {"optim.lr": lr}, status, 3, epochs, 10.0 + index,
                           f"/runs/t_{index}")

    results = SearchResults(plan, "s", [trial(0, 1e-3, [10.0, 30.0, 20.0]), trial(1, 1e-4, [5.0]),
                                        trial(2, 3e-3, [math.nan, 31.0, 31.0])])
    rows = results.rows()
    assert [r["trial"] for r in rows] == ["t_2", "t_0", "t_1"]
    assert rows[0]["best_val_map_asym"] == 31.0 and rows[0]["best_epoch"] == 1  # the earliest of a tie
    assert rows[2]["stopped_early"] and not rows[1]["stopped_early"]
    assert not results.interrupted
    text = best_preset_text(results)
    best = config_from_dict(yaml.safe_load(text))
    assert best.optim.lr == 3e-3 and best.run.name == "s-best" and text.startswith("# Best trial t_2")
    assert "t_2" in format_table(results).splitlines()[1]
    unfinished = SearchResults(plan, "s", [trial(0, 1e-3, [1.0], status="PENDING")])
    assert unfinished.interrupted


# ------------------------------------------------------------------ searches on Ray


def test_trials_share_the_cpus_when_more_run_at_once_than_fit():
    from amldist.tune_search import trial_resources

    def config(workers, gpu=False):
        return config_from_dict({"run": {"num_workers": workers, "use_gpu": gpu}})

    cpus = {"CPU": 2.0}
    assert trial_resources(config(1), None, cpus) == (2, 0.99)  # 2 trials of 1 worker; 0.01: trial actors
    assert trial_resources(config(2), None, cpus) == (1, 0.99)
    assert trial_resources(config(2), 2, cpus) == (2, 0.49)     # asked for 2 at once: half a CPU per worker
    assert trial_resources(config(2, gpu=True), None, {"CPU": 16.0, "GPU": 4.0}) == (2, None)
    with pytest.raises(UserError, match="do not fit"):
        trial_resources(config(2), 100, cpus)


def test_a_search_folder_is_never_overwritten_and_resume_continues_the_stored_search(tmp_path):
    from amldist.tune_search import SEARCH_FILE, check_search_folder

    plan = plan_search(preset_dict(TINY), searches=["optim.lr=loguniform(1e-4,1e-2)"])
    assert check_search_folder(plan, str(tmp_path), "s", resume=False, wandb="off") == (plan, "off")
    with pytest.raises(UserError, match="nothing to resume"):
        check_search_folder(plan, str(tmp_path), "s", resume=True, wandb="off")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / SEARCH_FILE).write_text(json.dumps({"plan": plan.to_dict(), "wandb": "offline"}))
    with pytest.raises(UserError, match="already holds a search named 's'"):
        check_search_folder(plan, str(tmp_path), "s", resume=False, wandb="off")
    assert check_search_folder(None, str(tmp_path), "s", resume=True, wandb="off") == (plan, "offline")
    other = plan_search(preset_dict(TINY), searches=["optim.lr=loguniform(1e-5,1e-2)"])
    with pytest.raises(UserError, match=r"other settings \(dimensions differ\)"):
        check_search_folder(other, str(tmp_path), "s", resume=True, wandb="off")


def write_run(run_dir, epochs_logged, checkpoints):
    """A run folder: metrics.jsonl with `epochs_logged` records (and a line torn by a crash), and one
    checkpoint folder per finished-epoch count in `checkpoints`, older to newer."""
    import os

    import torch

    from amldist.training.state import CHECKPOINT_FILE

    run_dir.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "val_map_asym": 10.0 + e}) for e in range(epochs_logged)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 9, "val_m')
    for age, done in enumerate(checkpoints):
        folder = run_dir / f"checkpoint_epoch{done:04d}"
        folder.mkdir()
        torch.save({"epoch": done}, folder / CHECKPOINT_FILE)
        os.utime(folder / CHECKPOINT_FILE, (1e9 + age, 1e9 + age))


def test_a_continued_trial_knows_the_epochs_its_checkpoint_holds(tmp_path):
    from amldist.runs import checkpointed_records

    write_run(tmp_path / "run", epochs_logged=3, checkpoints=[1, 2])  # epoch 2 logged, then killed
    assert checkpointed_records(tmp_path / "run") == [{"epoch": 0, "val_map_asym": 10.0},
                                                      {"epoch": 1, "val_map_asym": 11.0}]
    write_run(tmp_path / "fresh", epochs_logged=1, checkpoints=[])  # killed before its first checkpoint
    assert checkpointed_records(tmp_path / "fresh") == []
    assert checkpointed_records(tmp_path / "never-started") == []


def test_a_restarted_trial_reports_its_checkpointed_epochs_before_the_ones_it_trains(tmp_path, monkeypatch):
    """A trial that a resumed search starts again: Tune hears epochs 0-1 from the run's checkpoint, then
    epoch 2 as the continued run reports it (Ray replaced by in-process fakes)."""
    import queue
    import types

    from amldist import tune_search
    from amldist.tune_search import TrialJob, run_trial

    write_run(tmp_path / "search" / "trial_a", epochs_logged=2, checkpoints=[2])
    reported, started = [], []

    class LocalQueue(queue.Queue):
        def __init__(self, maxsize, actor_options):
            super().__init__(maxsize)

        def get(self, timeout):
            try:
                return super().get(timeout=timeout)
            except queue.Empty:
                raise tune_search.Empty from None

    def fake_training(config, *, storage, name, callbacks, **options):
        started.append((storage, name))
        callbacks[0].after_report(None, [{"epoch": 2, "val_map_asym": 12.0}], None)

    context = types.SimpleNamespace(get_trial_id=lambda: "a")
    monkeypatch.setattr(tune_search, "tune", types.SimpleNamespace(get_context=lambda: context,
                                                                   report=reported.append))
    monkeypatch.setattr(tune_search, "Queue", LocalQueue)
    monkeypatch.setattr(tune_search, "run_training", fake_training)
    plan = plan_search(preset_dict(TINY), searches=["optim.lr=loguniform(1e-4,1e-2)"],
                       settings=SearchSettings(num_samples=1))
    run_trial({"optim.lr": 1e-3}, TrialJob(plan, str(tmp_path), str(tmp_path), "search", 0, None))
    assert started == [(str(tmp_path), "search/trial_a")]
    assert [(r["epoch"], r["val_map_asym"]) for r in reported] == [(0, 10.0), (1, 11.0), (2, 12.0)]


def test_a_trial_config_takes_its_relative_paths_from_the_search_folder(tmp_path):
    from amldist.training.paths import with_absolute_paths

    config = config_from_dict({"data": {"root": "data/synth", "teacher_features": "s3://bucket/features"},
                               "model": {"teacher": "vgg16"}, "run": {"out_dir": "runs"}})
    moved = with_absolute_paths(config, tmp_path)
    assert moved.data.root == str(tmp_path / "data" / "synth") and moved.run.out_dir == str(tmp_path / "runs")
    assert moved.data.teacher_features == "s3://bucket/features" and moved.model.teacher == "vgg16"
    assert with_absolute_paths(config_from_dict({"model": {"teacher": "nets/t.pth"}}),
                               tmp_path).model.teacher == str(tmp_path / "nets" / "t.pth")
