"""The same training function inside Ray Train's TorchTrainer (1 worker, and 2-worker DDP over gloo)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from aios_ray.train.run import run_training
from tests.helpers import (
    PER_SEQUENCE_LOSS,
    assert_same_weights,
    bundle_weights,
    debug_config,
    events,
    train_losses,
)

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


def test_two_workers_train_data_parallel_like_one_worker_with_twice_the_batch(ray_local, tmp_path: Path):
    """2 DDP workers x batch 4 give the weights, gradient norms and eval losses of 1 worker x batch 8.

    Why they can: step i's global batch is blocks [8i, 8i + 8) of the shuffle either way (rank r takes the 4 at
    8i + 4r, tests/test_data.py), and DDP's mean of the two shards' gradients is the gradient of the mean over the
    8 sequences, because the loss is a mean of per-sequence terms with the settings of ``PER_SEQUENCE_LOSS`` (ACT
    exploration draws its random numbers per process and forward: each rank draws the same ones for its rows as
    the other rank, one worker draws 8 different ones). Tolerance: float noise of another summation order,
    measured 1e-6 on losses and norms and a few 1e-6 on weights. Not compared: the logged train_loss,
    lm_loss and mean_halt_steps, which under DDP are rank 0's shard's only."""
    train = {"steps": 4, "checkpoint_interval": 2}
    # The eval set is --eval-batches batches of --batch-size sequences: 4 x 4 here and 2 x 8 below, the same 16.
    plan, summary = run_training(_on_ray(tmp_path / "ddp", 2, model=PER_SEQUENCE_LOSS, eval_batches=4, **train))
    assert events(plan.log_file, "run_start")[0]["world_size"] == 2
    assert summary["step"] == 4
    ddp = events(plan.log_file, "train")
    assert len(ddp) == 4  # only rank 0 logs
    single, _ = run_training(debug_config(tmp_path / "single", model=PER_SEQUENCE_LOSS, batch_size=8,
                                          eval_batches=2, **train))
    expected = events(single.log_file, "train")
    # grad_norm is taken after DDP's all-reduce: the norm of the whole global batch's gradient, clipped alike
    assert [e["grad_norm"] for e in ddp] == pytest.approx([e["grad_norm"] for e in expected], rel=1e-5)
    assert [e["eval_loss"] for e in events(plan.log_file, "eval")] == pytest.approx(
        [e["eval_loss"] for e in events(single.log_file, "eval")], rel=1e-5)
    assert_same_weights(bundle_weights(plan.bundle_root), bundle_weights(single.bundle_root), atol=2e-5, rtol=1e-4)


def test_two_workers_with_tiered_experts_train_like_two_workers_with_local_experts(ray_local, tmp_path: Path):
    """DDP with experts in the tiered store: both workers compute on the one hot slab of the node, their expert
    gradients are averaged (as DDP averages the rest) and rank 0 updates the slots; the losses and the final
    weights are those of the same run with local experts."""
    from aios_ray.train.bundle import load_tensors

    train = {"steps": 4, "checkpoint_interval": 2, "eval_interval": 100, "expert_usage_interval": 100,
             "stats_interval": 100}
    runs = {}
    for experts in ("local", "tiered"):
        plan, summary = run_training(_on_ray(tmp_path / experts, 2, experts=experts, **train))
        assert summary["step"] == 4
        losses = train_losses(plan.log_file)
        runs[experts] = (losses, load_tensors(Path(plan.bundle_root) / "model.safetensors"))
    for suffix in ("gpu0", "dram", "nvme"):  # the workers made the store's actors detached; the run ended them
        with pytest.raises(ValueError):
            ray_local.get_actor(f"t-{suffix}", namespace="aios-ray")
    (local_losses, local_weights), (tiered_losses, tiered_weights) = runs["local"], runs["tiered"]
    assert tiered_losses == pytest.approx(local_losses, rel=1e-5)
    # The store's counters through the actors: every tier in the log, the table and the plot's series.
    from aios_ray.config import StoreConfig
    from aios_ray.store.report import finished_store_stats, format_table
    from aios_ray.tracking.jsonl import read_metrics
    from aios_ray.tracking.plots import store_series

    stats = finished_store_stats(StoreConfig(path=str(plan.bundle_root) + "/expert_store"))
    assert [t["tier"] for t in stats["tiers"]] == ["hot", "dram", "nvme"]
    table = format_table(stats)
    assert table.splitlines()[1].split()[0] == "hot" and "nvme: 8 experts" in table
    assert set(store_series(read_metrics(Path(plan.log_file)))) == {"hot", "dram"}
    assert set(tiered_weights) == set(local_weights)
    for name, tensor in local_weights.items():
        torch.testing.assert_close(tiered_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
