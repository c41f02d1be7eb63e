"""The cluster-launcher files in cluster/ pass Ray's own config validation (offline: no cloud account,
no ssh), and say what the code relies on: a miner node type offering `miner: 1`, the resource the
miner actor asks for, and an auto-scaling GPU trainer pool."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from amldist.miner_actor import miner_options

# prepare_config / validate_config: a private API of Ray 2.60
util = pytest.importorskip("ray.autoscaler._private.util")
jsonschema = pytest.importorskip("jsonschema")

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def validated(raw: dict) -> dict:
    config = util.prepare_config(copy.deepcopy(raw))  # merges the provider's defaults, as `ray up` does
    util.validate_config(config)
    return config


def test_the_aws_cluster_passes_rays_validation_and_has_the_three_node_types():
    raw = load("ray_cluster.yaml")
    config = validated(raw)
    types = config["available_node_types"]
    assert set(types) == {"head", "gpu_trainer", "miner"} and config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}  # training work stays off the head
    trainers = types["gpu_trainer"]
    assert trainers["min_workers"] == 0 < trainers["max_workers"]  # scales with demand
    assert types["miner"]["resources"] == {"miner": 1} and types["miner"]["max_workers"] == 1
    # The miner actor asks for exactly the resource this node type offers.
    offered = types["miner"]["resources"]
    assert miner_options({"GPU": 9, **offered}, "miner")["resources"] == offered
    assert raw["file_mounts"] == {"~/amldist": "."}
    assert any('amldist[gpu]' in command for command in raw["setup_commands"])
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-py311")  # the versions amldist pins


def test_the_local_pool_passes_rays_validation_and_its_head_offers_the_miner_resource():
    raw = load("ray_cluster_local.yaml")
    config = validated(raw)
    assert config["provider"]["type"] == "local"
    start = " ".join(raw["head_start_ray_commands"])
    offered = json.loads(re.search(r"--resources='([^']*)'", start).group(1))
    assert miner_options({"GPU": 1, **offered}, "miner")["resources"] == offered == {"miner": 1}
    starts = raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]
    assert all("amldist-venv/bin" in c for c in starts)
    assert any('amldist[gpu]' in command for command in raw["setup_commands"])


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c["available_node_types"]["miner"].__setitem__("resources", {"miner": "one"}),
     jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["miner"].pop("node_config"), jsonschema.ValidationError),
    (lambda c: c.__setitem__("head_node_type", "nowhere"), ValueError),
])
def test_the_validation_catches_a_broken_copy(break_it, error):
    raw = load("ray_cluster.yaml")
    break_it(raw)
    with pytest.raises(error):
        validated(raw)
