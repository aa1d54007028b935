"""The AdamW arithmetic shared by the local optimizer (``train/optim.py``) and the expert store's in-slot
update (``store/tiered_experts.py``): one function, so local and tiered experts follow the same numbers."""

from __future__ import annotations

import math

import torch

BETAS = (0.9, 0.95)
EPS = 1e-8


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: torch.Tensor, lr: float, weight_decay: float, betas: tuple[float, float] = BETAS,
                  eps: float = EPS) -> None:
    """One decoupled-weight-decay Adam step, in place (torch.optim.AdamW's single-tensor arithmetic).

    ``step`` is a 1-element tensor, incremented here.
    """
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step.add_(1)
    t = float(step.item())
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
