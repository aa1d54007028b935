"""AdamW with parameter groups, the LR schedule, and optimizer state as safetensors + JSON."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from aios_ray.config import TrainConfig

ROUTER_LR_SCALE = 0.1  # --auto-adjust-lr: MoE routers are the unstable part; they learn 10x slower


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """Groups: decayed matrices, undecayed vectors/embeddings, and routers (own LR scale)."""
    decay, no_decay, router = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".router." in name:
            router.append(param)
        elif param.ndim >= 2 and not name.startswith("embed."):
            decay.append(param)
        else:
            no_decay.append(param)
    router_scale = ROUTER_LR_SCALE if tc.auto_adjust_lr else 1.0
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay, "lr_scale": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        {"params": router, "weight_decay": tc.weight_decay, "lr_scale": router_scale, "name": "router"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8, fused=False)


def lr_at(step_in_round: int, steps: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at the end of the round."""
    if warmup and step_in_round < warmup:
        return (step_in_round + 1) / warmup
    span = max(steps - warmup, 1)
    progress = min((step_in_round - warmup) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Per-parameter state as named tensors; group hyper-parameters as JSON-able dicts."""
    state = optimizer.state_dict()
    tensors = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"state.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict[str, Any]]) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, index, key = name.split(".", 2)
        per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
