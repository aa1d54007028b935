"""cluster.yaml passes Ray's own cluster-config checks."""

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
