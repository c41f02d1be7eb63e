"""`amldist train` without Ray: flags onto config keys, one-line errors naming the command that creates a
missing input, and the guards against silently continuing or clobbering a run."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amldist.cli.main import build_parser, main
from amldist.cli.train import config_of
from amldist.datasets import formats
from amldist.errors import UserError
from amldist.nets import create_net
from amldist.runs import check_resume, check_storage
from amldist.training.state import BEST_FILE, CHECKPOINT_FILE, Progress, save_training_state


def write_config(tmp_path, **data):
    path = tmp_path / "run.yaml"
    config = {"data": {"root": str(tmp_path / "data"), "image_size": 64, **data},
              "model": {"arch": "small_cnn", "pretrained": False, "teacher": str(tmp_path / "teacher.pth")},
              "loss": {"name": "contrastive_plus"}, "run": {"epochs": 3}}
    path.write_text(yaml.safe_dump(config))
    return path


def test_flags_map_onto_the_config(tmp_path):
    args = build_parser().parse_args(["train", "--config", str(write_config(tmp_path)), "--num-workers", "4",
                                      "--use-gpu", "--name", "mine", "--lr", "3e-4", "--set", "run.seed=5"])
    config = config_of(args)
    assert (config.run.num_workers, config.run.use_gpu, config.run.name) == (4, True, "mine")
    assert config.optim.lr == pytest.approx(3e-4) and config.run.seed == 5
    assert config.loss.asym is True  # Contr+ with a teacher: asymmetric


def test_missing_inputs_name_the_command_that_creates_them(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["train", "--config", str(config), "--local"]) == 2
    assert "amldist data synth" in capsys.readouterr().err
    root = tmp_path / "data"
    db = formats.SfmSplit(cids=["a" * 32, "b" * 32], cluster=np.array([0, 1]), qidxs=np.array([0]),
                          pidxs=np.array([1]))
    formats.write_sfm_db(root / "train" / "retrieval-SfM-120k" / "retrieval-SfM-120k.pkl",
                         {"train": db, "val": db})
    assert main(["train", "--config", str(config), "--local"]) == 2
    err = capsys.readouterr().err
    assert "amldist data shards --root" in err and "--image-size 64" in err
    for split in ("train", "val"):  # a manifest is enough for this check
        folder = root / "shards" / "retrieval-SfM-120k-64" / split
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
    assert main(["train", "--config", str(config), "--local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no teacher features in" in err
    assert f"amldist features --network {tmp_path / 'teacher.pth'} --shards" in err
    assert f"--out {tmp_path / 'data'}/features/{tmp_path.name}-teacher/retrieval-SfM-120k-64/train`" in err


def fake_run(folder, epochs_done):
    checkpoint = folder / f"checkpoint_epoch{epochs_done:04d}"
    net = create_net("small_cnn", "gem", None, pretrained=False)
    save_training_state(checkpoint / CHECKPOINT_FILE, net, None, None, {}, Progress(epochs_done=epochs_done))
    return checkpoint


def test_resume_guards(tmp_path):
    storage = tmp_path / "runs"
    assert check_resume(str(storage), "fresh", None, 3) is None  # a new run
    with pytest.raises(UserError, match="nothing to resume"):
        check_resume(str(storage), "fresh", "", 3)
    fake_run(storage / "half", 2)
    with pytest.raises(UserError, match="pass --resume"):
        check_resume(str(storage), "half", None, 3)  # Ray would silently continue it
    assert check_resume(str(storage), "half", "", 3) is None  # Ray continues it from its own checkpoint
    with pytest.raises(UserError,
                       match="has finished 2 epochs and --epochs asks for 2; pass --epochs above 2"):
        check_resume(str(storage), "half", "", 2)
    source = fake_run(tmp_path / "elsewhere", 1)
    with pytest.raises(UserError, match="start a new run from .*elsewhere"):
        check_resume(str(storage), "half", str(source), 3)
    assert check_resume(str(storage), "new", str(source), 3) == str(source / CHECKPOINT_FILE)


def test_a_storage_uri_ray_cannot_open_is_one_line_before_ray_starts(tmp_path, capsys):
    import ray

    config = write_config(tmp_path)
    assert main(["train", "--config", str(config), "--local", "--storage", "ftp://host/runs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--storage ftp://host/runs: not a storage Ray Train can open" in err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
    check_storage("mock://bucket/runs")  # filesystems pyarrow knows pass; local folders are Ray's to make
    check_storage(str(tmp_path / "not-yet"))


def test_a_run_folder_with_files_but_no_checkpoint_is_not_overwritten(tmp_path):
    kept = tmp_path / "runs" / "kept"
    kept.mkdir(parents=True)
    (kept / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (kept / BEST_FILE).write_bytes(b"best")
    with pytest.raises(UserError,
                       match=r"holds files of a run named 'kept' but no checkpoint .*metrics.jsonl"):
        check_resume(str(tmp_path / "runs"), "kept", None, 3)
    (tmp_path / "runs" / "empty").mkdir()
    assert check_resume(str(tmp_path / "runs"), "empty", None, 3) is None  # an empty folder holds nothing


def test_a_relative_resume_path_reaches_the_workers_as_an_absolute_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_run(Path("elsewhere"), 1)
    given = check_resume("runs", "new", "elsewhere/checkpoint_epoch0001", 3)
    assert given == str(tmp_path / "elsewhere" / "checkpoint_epoch0001" / CHECKPOINT_FILE)


def test_a_damaged_epoch_count_is_one_line(tmp_path):
    source = fake_run(tmp_path / "old", 1)
    state = torch.load(source / CHECKPOINT_FILE, weights_only=True)
    state["epoch"] = "abc"
    torch.save(state, source / CHECKPOINT_FILE)
    with pytest.raises(UserError, match="damaged training checkpoint"):
        check_resume(str(tmp_path / "runs"), "new", str(source), 3)


def test_errors_raised_inside_ray_become_one_line(tmp_path, monkeypatch, capsys):
    from ray.train.v2.api.exceptions import RayTrainError

    def failing(*args, **kwargs):
        raise RayTrainError("Traceback (most recent call last):\n  File x\nValueError: the miner fell over")

    monkeypatch.setattr("amldist.driver.start_ray", lambda local: None)
    monkeypatch.setattr("amldist.training.paths.resolve_paths", lambda config: None)
    monkeypatch.setattr("amldist.driver.run_training", failing)
    assert main(["train", "--config", str(write_config(tmp_path)), "--local",
                 "--storage", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == "amldist: error: training failed: ValueError: the miner fell over\n"


def interrupt_during_training(tmp_path, monkeypatch, storage, *, checkpoints: int = 0):
    """Run `amldist train` with Ray Train ending the way its Ctrl-C handler ends it: SystemExit in the
    driver."""
    name = "run"
    if checkpoints:
        fake_run(tmp_path / "r" / name, checkpoints)

    def interrupted(*args, **kwargs):
        raise SystemExit(1)

    monkeypatch.setattr("amldist.driver.start_ray", lambda local: None)
    monkeypatch.setattr("amldist.training.paths.resolve_paths", lambda config: None)
    monkeypatch.setattr("amldist.driver.run_training", interrupted)
    monkeypatch.setattr("amldist.cli.train.check_resume", lambda *args: None)
    return main(["train", "--config", str(write_config(tmp_path)), "--local", "--storage", storage,
                 "--name", name])


def test_ctrl_c_during_training_says_how_to_continue(tmp_path, monkeypatch, capsys):
    assert interrupt_during_training(tmp_path, monkeypatch, str(tmp_path / "r"), checkpoints=2) == 130
    err = capsys.readouterr().err
    assert err == (f"amldist: training interrupted; its checkpoints are in {tmp_path / 'r' / 'run'}: "
                   "the same command with --resume continues it\n")


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    assert interrupt_during_training(tmp_path, monkeypatch, str(tmp_path / "r")) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "before its first checkpoint" in err and "--name" in err


def test_ctrl_c_with_a_storage_uri_points_at_the_uri(tmp_path, monkeypatch, capsys):
    storage = "mock://bucket/remote/"  # a URI pyarrow opens offline (file:// counts as a local folder)
    assert interrupt_during_training(tmp_path, monkeypatch, storage) == 130
    assert "checkpoints are under mock://bucket/remote/run:" in capsys.readouterr().err
