"""`ray job submit --working-dir . -- amldist train --config ...` against a head this test starts on
loopback: the same command as a local run, joined to the cluster; its status and logs read back
through Ray's job client."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_head import ray_head
from train_data import make_config, make_train_data

from amldist.config import config_to_yaml
from amldist.training.state import CHECKPOINT_FILE

ray = pytest.importorskip("ray")
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# What a cluster's nodes would have set: quiet Ray Train, and reports polled often (tests/conftest.py).
HEAD_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
            "WANDB_MODE": "offline", "AMLDIST_NO_PROGRESS": "1"}


def wait_for(client: JobSubmissionClient, job_id: str, timeout_s: float) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} still {status} after {timeout_s} s")


@pytest.mark.timeout(600, method="thread")  # a hard bound: Ray blocks the signal method
def test_ray_job_submit_runs_amldist_train_unchanged(tmp_path):
    root = make_train_data(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(make_config(root, "contrastive_plus", epochs=1, num_workers=1)))
    storage = tmp_path / "runs"
    with ray_head(num_cpus=2, extra_env=HEAD_ENV) as head:
        submit = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.dashboard,
             "--working-dir", ".", "--submission-id", "amldist-job-test", "--no-wait", "--",
             "amldist", "train", "--config", str(config), "--storage", str(storage), "--name", "jobrun"],
            check=False, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "amldist-job-test" in submit.stdout

        client = JobSubmissionClient(head.dashboard)
        status = wait_for(client, "amldist-job-test", timeout_s=300)
        logs = client.get_job_logs("amldist-job-test")
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        info = client.get_job_info("amldist-job-test")
        assert info.entrypoint.startswith("amldist train --config")
        assert info.runtime_env["working_dir"].startswith("gcs://")  # the checkout went up with the job
    # The job printed the summary a local run prints, and left its checkpoint in the storage folder.
    assert f"run folder: {storage / 'jobrun'}" in logs
    assert "best val_map_asym:" in logs and "last checkpoint:" in logs
    assert (storage / "jobrun" / "checkpoint_epoch0001" / CHECKPOINT_FILE).is_file()
