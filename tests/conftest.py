"""Shared test set-up: quiet progress bars and Ray, CPU-only torch unless AMLDIST_TEST_GPU=1, small thread
counts."""

import errno
import os
from pathlib import Path

os.environ.setdefault("AMLDIST_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
if os.environ.get("AMLDIST_TEST_GPU") != "1":  # GPU tests (-m gpu) need AMLDIST_TEST_GPU=1 to see the GPU
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The synthetic training set of tests/train_data.py, built once per session (shared by the training
    and fault tests)."""
    from train_data import make_train_data

    return make_train_data(tmp_path_factory.mktemp("train-data"))


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when torch sees no CUDA device."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def read_only_dir(tmp_path, monkeypatch):
    """A folder in which nothing may be written. Mode 0o555 stops every user but root, and CI runs as root:
    there the file system's refusal is played instead, os.mkdir and os.open for writing under the folder
    raising the PermissionError they raise for everyone else (tempfile and pathlib go through them)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real_mkdir, real_open = os.mkdir, os.open

        def refuse(path):
            if isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).is_relative_to(folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

        def mkdir(path, mode=0o777, *, dir_fd=None):
            refuse(path)
            return real_mkdir(path, mode, dir_fd=dir_fd)

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", open_)
    yield folder
    folder.chmod(0o755)


@pytest.fixture(scope="module", autouse=True)
def ray_dashboard_address():
    """`start_ray(local=True)` points this process's Ray clients (state API, job client) at its dashboard
    through RAY_API_SERVER_ADDRESS; a test module that started one must not leave that address to the
    modules after it, whose clusters are others (Ray's clients prefer the variable to an address given)."""
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    yield
    if before is None:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    else:
        os.environ["RAY_API_SERVER_ADDRESS"] = before
