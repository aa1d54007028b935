"""What a run is, decided on the driver before any worker starts: the plan and the tokenised data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aios_ray.config import Config
from aios_ray.train.goal_routing import GoalBias


@dataclass
class TrainData:
    """Everything tokenised on the driver; shipped to workers once (Ray's object store, zero-copy)."""

    train_tokens: np.ndarray
    eval_tokens: np.ndarray | None
    tokenizer_json: str
    dataset: dict[str, Any]  # description recorded in the bundle's dataset history
    shards: str | None = None  # --data: a prepared directory the workers stream (train_tokens is then empty)


@dataclass
class RunPlan:
    """The resolved run: config (vocab size and the store's defaults filled in), where the bundle lives,
    what to resume, and this run's id (its checkpoints carry it, so a restarted worker can tell this
    run's checkpoints in the bundle from those of an earlier run)."""

    config: Config
    bundle_root: str
    log_file: str
    stop_file: str
    resume_from: str | None = None  # checkpoint directory
    metadata: dict[str, Any] = field(default_factory=dict)  # existing bundle metadata when resuming
    run_id: str = ""
    init_weights: str | None = None  # a fresh run starts from these weights (expert-only training), not at random
    expert_index: int | None = None  # expert-only training: the one expert (row of every MoE layer) that trains
    goal_bias: GoalBias | None = None  # goal-aware routing, resolved from the goals DB on the driver
