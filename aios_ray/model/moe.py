"""Sparse Mixture-of-Experts FFN: fp32 router, top-k, capacity with counted drops, Switch balance loss.

Two implementations of the expert computation share one router:
- ``reference``: every expert runs on every token and is weighted by its combine weight (zero
  for tokens not routed to it or dropped). Slow and obviously right: it is the oracle in tests.
- ``fast``: kept (token, expert) assignments are sorted by expert and run as one grouped matmul
  per projection, then scattered back with their weights.

Shapes: N tokens, C hidden size, F expert FFN size, E experts, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aios_ray.model.layers import SwiGLU, trunc_normal_


@dataclass
class Routing:
    """The router's decision for N tokens."""

    expert_index: torch.Tensor  # (N, k) int64, chosen experts, best first
    combine_weight: torch.Tensor  # (N, k) fp32, renormalised top-k probs, 0 where dropped
    kept: torch.Tensor  # (N, k) bool, False where the expert was over capacity
    probs: torch.Tensor  # (N, E) fp32 softmax over all experts
    capacity: int


@dataclass
class MoEStats:
    """What one MoE call reports: the balance loss (with grad) and usage counts (no grad)."""

    lb_loss: torch.Tensor  # scalar fp32
    token_counts: torch.Tensor  # (E,) assignments routed to each expert, before capacity
    prob_sum: torch.Tensor  # (E,) router probability summed over tokens
    num_tokens: int
    num_dropped: int  # (token, expert) assignments dropped for capacity


def _grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


class MoEFeedForward(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int,
                 capacity_factor: float, impl: str = "fast") -> None:
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k {top_k} > num_experts {num_experts}")
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.impl = impl
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        # Expert weights stacked so the fast path can run one grouped matmul per projection.
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))
        trunc_normal_(self.w_gate_up, std=hidden_size**-0.5)
        trunc_normal_(self.w_down, std=ffn_size**-0.5)
        trunc_normal_(self.router.weight, std=hidden_size**-0.5)

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(self, x: torch.Tensor) -> Routing:
        """x: (N, C). The router always runs in fp32, whatever autocast says."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        capacity = self.capacity(x.shape[0])
        kept = self._within_capacity(top_i, capacity)
        return Routing(top_i, top_p * kept, kept, probs, capacity)

    def _within_capacity(self, top_i: torch.Tensor, capacity: int) -> torch.Tensor:
        """First choices are served before second choices; within a choice rank, earlier tokens first."""
        slot_major = top_i.t().reshape(-1)  # (k*N,)
        one_hot = F.one_hot(slot_major, self.num_experts)  # (k*N, E)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # rank of the assignment in its expert
        return (position < capacity).view(self.top_k, -1).t()

    def load_balance_loss(self, routing: Routing) -> torch.Tensor:
        """Switch loss E * sum_e f_e * P_e; f_e = share of assignments to e (before capacity), P_e = mean prob.

        Equals 1.0 for a perfectly uniform router; only P_e carries gradient.
        """
        counts = torch.bincount(routing.expert_index.reshape(-1), minlength=self.num_experts)
        f = counts.float() / routing.expert_index.numel()
        return self.num_experts * (f * routing.probs.mean(dim=0)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        routing = self.route(flat)
        experts = self._experts_reference if self.impl == "reference" else self._experts_fast
        out = experts(flat, routing)
        with torch.no_grad():
            counts = torch.bincount(routing.expert_index.reshape(-1), minlength=self.num_experts)
            stats = MoEStats(
                lb_loss=torch.zeros((), device=x.device),
                token_counts=counts,
                prob_sum=routing.probs.sum(dim=0),
                num_tokens=flat.shape[0],
                num_dropped=int((~routing.kept).sum()),
            )
        stats.lb_loss = self.load_balance_loss(routing)
        return out.reshape(shape).to(x.dtype), stats

    def _experts_reference(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            weight = (routing.combine_weight * (routing.expert_index == e)).sum(dim=-1)  # (N,)
            gate, up = (x @ self.w_gate_up[e]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.w_down[e]
            out = out + weight[:, None] * y.float()
        return out

    def _experts_fast(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        num_tokens, k = routing.expert_index.shape
        flat_kept = routing.kept.reshape(-1)
        expert = routing.expert_index.reshape(-1)[flat_kept]
        token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)[flat_kept]
        weight = routing.combine_weight.reshape(-1)[flat_kept]
        order = torch.argsort(expert, stable=True)
        token, weight = token[order], weight[order]
        group_ends = torch.bincount(expert, minlength=self.num_experts).cumsum(0)
        xs = x[token]  # (M, C) tokens grouped by expert
        w_gate_up, w_down = self.w_gate_up, self.w_down
        if xs.dtype != w_gate_up.dtype:  # autocast does not cover the grouped matmul
            w_gate_up, w_down = w_gate_up.to(xs.dtype), w_down.to(xs.dtype)
        gate, up = grouped_matmul(xs, w_gate_up, group_ends).chunk(2, dim=-1)
        y = grouped_matmul(F.silu(gate) * up, w_down, group_ends)  # (M, C)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, y.float() * weight[:, None])


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Rows [end_{e-1}, end_e) of x times weights[e]: x (M, K), weights (E, K, N) -> (M, N)."""
    if _grouped_mm_available() and x.shape[0] > 0:
        return torch._grouped_mm(x, weights, offs=group_ends.to(torch.int32))
    ends = group_ends.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x[s:e] @ weights[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True))])


def dense_equivalent(moe: MoEFeedForward) -> SwiGLU:
    """The dense SwiGLU that a 1-expert MoE computes (used to check the MoE against a dense FFN)."""
    assert moe.num_experts == 1
    hidden, ffn2 = moe.w_gate_up.shape[1:]
    dense = SwiGLU(hidden, ffn2 // 2)
    with torch.no_grad():
        dense.gate_up.weight.copy_(moe.w_gate_up[0].t())
        dense.down.weight.copy_(moe.w_down[0].t())
    return dense
