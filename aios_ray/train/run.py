"""Entry point used by the CLI: prepare on the driver, then train locally or on Ray Train."""

from __future__ import annotations

import math
from typing import Any

from aios_ray.config import Config
from aios_ray.train.context import LocalContext
from aios_ray.train.gpus import select_local_gpus
from aios_ray.train.independent import merge_run
from aios_ray.train.loop import train_worker
from aios_ray.train.plan import RunPlan, TrainData
from aios_ray.train.prepare import prepare_run


def run_training(cfg: Config) -> tuple[RunPlan, dict[str, Any]]:
    select_local_gpus(cfg.cluster)  # --cuda-ids: before Ray (or CUDA) starts, which read CUDA_VISIBLE_DEVICES once
    if cfg.train.expert_id:  # expert-only training: the same loop on a plan with one trainable expert
        from aios_ray.train.expert_only import run_expert_training

        return run_expert_training(cfg)
    plan, data = prepare_run(cfg)
    print((f"data: {data.dataset['train_blocks']:,} training blocks streamed from {data.shards}" if data.shards
           else f"data: {len(data.train_tokens):,} training tokens")
          + (f", {len(data.eval_tokens):,} eval tokens" if data.eval_tokens is not None else "")
          + f"; vocabulary {plan.config.model.vocab_size}; bundle {plan.bundle_root}", flush=True)
    summary = run_plan(plan, data)
    return plan, summary


def run_plan(plan: RunPlan, data: TrainData) -> dict[str, Any]:
    summary = _train(plan, data)
    if plan.config.cluster.parallel_independent:  # the workers' copies become one model (after the last checkpoint)
        merged = merge_run(plan, data)
        summary["worker_eval_losses"] = merged["worker_eval_losses"]
        if merged["merged_eval_loss"] is not None:  # the bundle's model is the merge: its loss is the run's
            summary.update(eval_loss=merged["merged_eval_loss"], ppl=math.exp(min(merged["merged_eval_loss"], 50.0)))
    return summary


def _train(plan: RunPlan, data: TrainData) -> dict[str, Any]:
    if not plan.config.cluster.use_ray:
        with LocalContext(plan.config.cluster.use_gpu) as ctx:  # closes the in-process store, however it ends
            return train_worker(plan, data, ctx)
    from aios_ray.train.ray_train import fit_on_ray  # Ray is imported only when it is used

    return fit_on_ray(plan, data)
