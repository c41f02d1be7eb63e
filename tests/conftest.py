"""Shared test set-up: quiet progress bars and Ray, CPU-only torch unless AMLDIST_TEST_GPU=1, small thread
counts."""

import os

os.environ.setdefault("AMLDIST_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
if os.environ.get("AMLDIST_TEST_GPU") != "1":  # GPU tests (-m gpu) need AMLDIST_TEST_GPU=1 to see the GPU
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest


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


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The small synthetic training set with a random teacher's feature stores (tests/train_data.py),
    built once per session for every Ray test module."""
    from train_data import make_train_data

    return make_train_data(tmp_path_factory.mktemp("train-data"))


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
