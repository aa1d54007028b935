from __future__ import annotations

import os
from pathlib import Path

import pytest

from aios_ray.config import Config, load_yaml_config, merge

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def debug_config(tmp_path: Path, **train_overrides) -> Config:
    """The debug preset with its bundle under tmp_path; keyword args override train options."""
    base = load_yaml_config("debug")
    overrides = {"train": {"bundle_dir": str(tmp_path / "brains"), "brain_name": "t", **train_overrides},
                 "cluster": {"use_ray": False}}
    return Config.from_dict(merge(base, overrides))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024**2)
    yield ray
    ray.shutdown()
