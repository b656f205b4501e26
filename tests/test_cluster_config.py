"""cluster.yaml passes Ray's own cluster-config validation (no cloud access needed)."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    # `ray up` fills the provider's defaults, then validates against Ray's schema: do the same.
    prepared = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(prepared)
    assert prepared["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"


def test_the_validation_used_above_rejects_a_broken_config():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="zero"):
        validate_config(prepare_config(config))


def test_gpu_workers_autoscale_from_zero_and_the_head_has_no_gpu():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    nodes = config["available_node_types"]
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["max_workers"] > 0
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert not nodes["head"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any("--shm-size" in option for option in config["docker"]["run_options"])
    assert all("IamInstanceProfile" in node["node_config"] for node in nodes.values())
    assert any("raybackfill[gpu]" in command for command in config["setup_commands"])
