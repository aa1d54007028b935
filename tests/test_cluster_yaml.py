"""cluster.yaml (local provider) and cluster.aws.yaml (cloud example) pass Ray's own cluster-config checks."""

from __future__ import annotations

from pathlib import Path

import yaml


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    assert set(prepared["available_node_types"]) >= {"local.cluster.node"}


def test_cluster_aws_yaml_is_a_valid_ray_cluster_config_with_a_gpu_worker_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.aws.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    gpu_types = [name for name, spec in types.items() if spec["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(types[name]["max_workers"] >= 1 for name in gpu_types)
    # The nodes install the project itself, so that they run the Ray version it pins.
    assert any("pip install" in cmd and "aios-ray" in cmd for cmd in prepared["setup_commands"])
