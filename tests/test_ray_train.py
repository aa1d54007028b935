"""The same training function inside Ray Train's TorchTrainer (1 worker, and 2-worker DDP over gloo)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

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


def test_two_workers_with_tiered_experts_train_like_two_workers_with_local_experts(ray_local, tmp_path: Path):
    """DDP with experts in the tiered store: both workers compute on the one hot slab of the node, their expert
    gradients are averaged (as DDP averages the rest) and rank 0 updates the slots; the losses and the final
    weights are those of the same run with local experts."""
    from aios_ray.train.bundle import load_tensors

    train = {"steps": 4, "checkpoint_interval": 2, "eval_interval": 100, "expert_usage_interval": 100,
             "store_stats_interval": 100}
    runs = {}
    for experts in ("local", "tiered"):
        plan, summary = run_training(_on_ray(tmp_path / experts, 2, experts=experts, **train))
        assert summary["step"] == 4
        losses = {e["step"]: e["train_loss"] for e in read_metrics(Path(plan.log_file)) if e["event"] == "train"}
        runs[experts] = (losses, load_tensors(Path(plan.bundle_root) / "model.safetensors"))
    for suffix in ("gpu0", "dram", "nvme"):  # the workers made the store's actors detached; the run ended them
        with pytest.raises(ValueError):
            ray_local.get_actor(f"t-{suffix}", namespace="aios-ray")
    (local_losses, local_weights), (tiered_losses, tiered_weights) = runs["local"], runs["tiered"]
    assert tiered_losses == pytest.approx(local_losses, rel=1e-5)
    assert set(tiered_weights) == set(local_weights)
    for name, tensor in local_weights.items():
        torch.testing.assert_close(tiered_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
