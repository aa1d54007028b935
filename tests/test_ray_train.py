"""The same training function inside Ray Train's TorchTrainer (1 worker, and 2-worker DDP over gloo)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from aios_ray.tracking.jsonl import read_metrics
from aios_ray.train.run import run_training
from tests.conftest import debug_config

pytestmark = pytest.mark.ray


def _on_ray(tmp_path: Path, workers: int, **train):
    cfg = debug_config(tmp_path, **train)
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, use_ray=True, num_workers=workers))


def test_torch_trainer_reports_checkpoints_and_writes_the_bundle(ray_local, tmp_path: Path):
    plan, summary = run_training(_on_ray(tmp_path, 1))
    assert summary["step"] == 6 and summary["eval_loss"] > 0
    reported = Path(summary["ray_checkpoint"])
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= {p.name for p in reported.iterdir()}
    state = json.loads((reported / "trainer_state.json").read_text())
    assert state["trainer"]["step"] == 6
    assert json.loads((Path(plan.bundle_root) / "metadata.json").read_text())["total_steps"] == 6


def test_two_workers_train_data_parallel(ray_local, tmp_path: Path):
    plan, summary = run_training(_on_ray(tmp_path, 2, steps=4, checkpoint_interval=2))
    start = next(e for e in read_metrics(Path(plan.log_file)) if e["event"] == "run_start")
    assert start["world_size"] == 2
    assert summary["step"] == 4
    train = [e for e in read_metrics(Path(plan.log_file)) if e["event"] == "train"]
    assert len(train) == 4  # only rank 0 logs
