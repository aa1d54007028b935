"""One expert in and out of a brain's weights: the tensor side of expert-only training and ``experts attach``.

An expert ("subbrain") is one row of every MoE layer: its FFN (``w_gate_up[e]``, ``w_down[e]``) and its router
row (``router.weight[e]``). Appending one to a brain gives a brain with ``num_experts + 1`` experts whose first
``num_experts`` rows, and every other tensor, are the brain's own, unchanged. Pure torch on state dicts.

Expert tensors are named ``layers.<i>.w_gate_up`` (C, 2F), ``layers.<i>.w_down`` (F, C) and ``layers.<i>.router``
(C,), i being the MoE layer's position in ``HRMACTv1.moe_layers()`` order.
"""

from __future__ import annotations

import torch
from torch import nn

from aios_ray.model.moe import MoEFeedForward

# (name in the expert file, name under the MoE layer's prefix in the brain's state dict)
EXPERT_PARTS = (("w_gate_up", "w_gate_up"), ("w_down", "w_down"), ("router", "router.weight"))


def moe_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of the MoE layers (``H_level.layers.0.ffn.`` ...), in ``moe_layers()`` order."""
    return [f"{name}." for name, module in model.named_modules() if isinstance(module, MoEFeedForward)]


def take_expert(state: dict[str, torch.Tensor], prefixes: list[str], index: list[int] | int) -> dict[str, torch.Tensor]:
    """Expert ``index`` of every MoE layer (or ``index[i]`` of layer i) as an expert's tensors (copies)."""
    rows = index if isinstance(index, list) else [index] * len(prefixes)
    return {f"layers.{i}.{part}": state[prefix + key][row].detach().clone()
            for i, (prefix, row) in enumerate(zip(prefixes, rows, strict=True)) for part, key in EXPERT_PARTS}


def append_expert(state: dict[str, torch.Tensor], prefixes: list[str],
                  expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict: ``state`` with ``expert`` appended as the last expert of every MoE layer."""
    out = dict(state)
    for i, prefix in enumerate(prefixes):
        for part, key in EXPERT_PARTS:
            stacked = state[prefix + key]
            out[prefix + key] = torch.cat([stacked, expert[f"layers.{i}.{part}"].to(stacked.dtype)[None]])
    return out


def expert_misfit(expert: dict[str, torch.Tensor], state: dict[str, torch.Tensor], prefixes: list[str]) -> str | None:
    """Why ``expert`` cannot join the brain of ``state`` (layer count or a shape), or None when it fits."""
    wanted = {f"layers.{i}.{part}" for i in range(len(prefixes)) for part, _ in EXPERT_PARTS}
    if set(expert) != wanted:
        layers = len({name.split(".")[1] for name in expert if name.startswith("layers.")})
        return f"the expert has {layers} MoE layer(s) ({len(expert)} tensors), the brain {len(prefixes)}"
    for i, prefix in enumerate(prefixes):
        for part, key in EXPERT_PARTS:
            have, need = tuple(expert[f"layers.{i}.{part}"].shape), tuple(state[prefix + key].shape[1:])
            if have != need:
                return f"layers.{i}.{part} has shape {have}, the brain's experts {need}"
    return None


def changed_base_tensors(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                         prefixes: list[str]) -> list[str]:
    """Names of ``base`` tensors that ``trained`` (the base with experts appended) does not hold bit for bit:
    every tensor outside the MoE experts, and the first ``num_experts`` rows of the stacked ones."""
    stacked = {prefix + key for prefix in prefixes for _, key in EXPERT_PARTS}
    changed = []
    for name, tensor in base.items():
        other = trained[name][: tensor.shape[0]] if name in stacked else trained[name]
        if other.shape != tensor.shape or not torch.equal(other, tensor):
            changed.append(name)
    return changed


def freeze_all_but_expert(model: nn.Module, index: int) -> list[torch.Tensor]:
    """Only expert ``index`` of every MoE layer (its FFN rows and router row) can learn; returns what trains.

    Every other parameter gets ``requires_grad=False``. The stacked expert tensors and the routers must keep
    requiring grad as a whole, so a hook zeroes every other row of their gradients: an optimizer that steps rows
    per expert and only rows with gradient (``ExpertSparseAdamW``, routers included in this mode) leaves the other
    rows' bits alone, weight decay included."""
    trainable = []
    stacked = {id(p) for m in model.modules() if isinstance(m, MoEFeedForward)
               for p in (m.w_gate_up, m.w_down, m.router.weight)}
    for param in model.parameters():
        if id(param) not in stacked:
            param.requires_grad_(False)
            continue
        keep = torch.zeros(param.shape[0], *([1] * (param.ndim - 1)), dtype=torch.bool, device=param.device)
        keep[index] = True
        param.register_hook(lambda grad, keep=keep: torch.where(keep, grad, torch.zeros((), dtype=grad.dtype,
                                                                                          device=grad.device)))
        trainable.append(param)
    return trainable
