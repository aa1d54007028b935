"""AdamW with parameter groups, the LR schedule, and optimizer state as safetensors + JSON."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from aios_ray.adamw import BETAS, EPS, adamw_update_
from aios_ray.config import TrainConfig

ROUTER_LR_SCALE = 0.1  # --auto-adjust-lr: MoE routers are the unstable part; they learn 10x slower


def is_expert_param(name: str) -> bool:
    return ".ffn.w_" in name and "router" not in name


def is_router_param(name: str) -> bool:
    return ".ffn.router." in name


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """Groups: decayed matrices, undecayed vectors/embeddings, routers (own LR scale) and experts.

    Experts are stepped per expert and only when they received tokens (see ``ExpertSparseAdamW``); with
    --use-8bit-optimizer bitsandbytes' AdamW8bit steps the same groups, every expert every step.
    """
    decay, no_decay, router, experts = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_expert_param(name):
            experts.append(param)
        elif ".router." in name:
            router.append(param)
        elif param.ndim >= 2 and not name.startswith(("embed.", "pos_embed.")):
            decay.append(param)
        else:
            no_decay.append(param)
    router_scale = ROUTER_LR_SCALE if tc.auto_adjust_lr else 1.0
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay, "lr_scale": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        # expert-only training: router rows step per expert too, so the frozen experts' rows keep their bits
        {"params": router, "weight_decay": tc.weight_decay, "lr_scale": router_scale, "name": "router",
         "per_expert": bool(tc.expert_id)},
        {"params": experts, "weight_decay": tc.weight_decay, "lr_scale": 1.0, "name": "experts",
         "per_expert": True},
    ]
    if tc.use_8bit_optimizer:
        import bitsandbytes  # checked at config time (``Config._check_precision``): installed

        return bitsandbytes.optim.AdamW8bit([g for g in groups if g["params"]], lr=tc.lr, betas=BETAS, eps=EPS)
    return ExpertSparseAdamW([g for g in groups if g["params"]], lr=tc.lr, betas=BETAS, eps=EPS)


class ExpertSparseAdamW(torch.optim.Optimizer):
    """AdamW where groups marked ``per_expert`` hold stacked expert tensors (E, ...): each expert has
    its own step count and is stepped only when it received gradient (tokens) in this step.

    Why: an expert that no token chose should not drift (plain AdamW would keep moving it on stale
    moments and decay it), which is what keeps old tasks' experts intact; and a tiered store can then
    update exactly the experts a step touched, with the same result as keeping them all local.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "per_expert": False})

    def _state(self, param: torch.Tensor, per_expert: bool) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if not state:
            if param.dtype != torch.float32:  # --model-dtype bf16/fp16: the update happens on fp32 master weights
                state["master"] = param.detach().float().clone()
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            state["step"] = torch.zeros(param.shape[0] if per_expert else 1)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but fp32 master weights and moments of low-precision parameters stay fp32 (torch casts
        every floating state tensor to its parameter's dtype, which would round them at every resume)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            param = params[int(index)]
            if param.dtype == torch.float32:
                continue
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32:
                    self.state[param][key] = value.to(param.device)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            hyper = {"lr": group["lr"], "weight_decay": group["weight_decay"], "betas": group["betas"],
                     "eps": group["eps"]}
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param, group["per_expert"])
                target, grad = state.get("master", param), param.grad.float()  # fp32 params: themselves
                if not group["per_expert"]:
                    adamw_update_(target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], **hyper)
                elif param.ndim == 1:  # ZeRO's flat partition of the group: the expert rows are gone
                    masked_adamw_update_(target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], **hyper)
                else:
                    for e in touched_experts(grad):
                        adamw_update_(target[e], grad[e], state["exp_avg"][e], state["exp_avg_sq"][e],
                                      state["step"][e:e + 1], **hyper)
                if target is not param:
                    param.copy_(target)


def masked_adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         step: torch.Tensor, lr: float, weight_decay: float, betas: tuple[float, float],
                         eps: float) -> None:
    """``adamw_update_`` on the elements whose gradient is not zero, each with its own step count (``step`` has
    the shape of ``param``); the others keep their value and moments.

    Why: under DeepSpeed ZeRO the optimizer sees each group as one flat partition, so the per-expert rule (step an
    expert only when it received tokens) is applied per element. An expert that no token chose has an all-zero
    gradient, so none of its elements moves, as without ZeRO; in one that received tokens every element has a
    non-zero gradient in practice (an input feature that is exactly 0 for all its tokens would be needed)."""
    touched = grad.ne(0)
    if not bool(touched.any()):
        return
    beta1, beta2 = betas
    step.add_(touched.to(step.dtype))
    t = step.double().clamp(min=1)  # untouched elements that were never stepped: any value, the result is unused
    bias1, bias2 = (1 - beta1**t).to(param.dtype), (1 - beta2**t).sqrt().to(param.dtype)
    avg = exp_avg.lerp(grad, 1 - beta1)
    avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    updated = param.mul(1 - lr * weight_decay).sub_(lr * avg / bias1 / (avg_sq.sqrt() / bias2 + eps))
    param.copy_(torch.where(touched, updated, param))
    exp_avg.copy_(torch.where(touched, avg, exp_avg))
    exp_avg_sq.copy_(torch.where(touched, avg_sq, exp_avg_sq))


def touched_experts(grad: torch.Tensor) -> list[int]:
    """Experts (rows of a stacked expert tensor) whose gradient is not all zero: they received tokens."""
    return grad.flatten(1).ne(0).any(dim=1).nonzero().flatten().tolist()


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
