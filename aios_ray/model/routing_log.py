"""Accumulates what every MoE call of a forward reports: the summed balance loss and usage counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aios_ray.model.moe import MoEStats


@dataclass
class LayerUsage:
    """Usage of one MoE layer summed over calls (a recurrent layer is called many times per step)."""

    token_counts: torch.Tensor  # (E,) assignments per expert, before capacity
    prob_sum: torch.Tensor  # (E,)
    total_tokens: int = 0
    dropped_tokens: int = 0
    expert_bias: torch.Tensor | None = None  # (E,) goal bias of the latest call (constant within a run)

    def add(self, stats: MoEStats) -> None:
        self.token_counts += stats.token_counts.cpu()
        self.prob_sum += stats.prob_sum.float().cpu()
        self.total_tokens += stats.num_tokens
        self.dropped_tokens += stats.num_dropped
        if stats.expert_bias is not None:
            self.expert_bias = stats.expert_bias.cpu()

    def merge(self, other: LayerUsage) -> None:
        self.token_counts += other.token_counts
        self.prob_sum += other.prob_sum
        self.total_tokens += other.total_tokens
        self.dropped_tokens += other.dropped_tokens
        if other.expert_bias is not None:
            self.expert_bias = other.expert_bias

    def to_event(self, layer: str) -> dict:
        tokens = max(self.total_tokens, 1)
        bias = {} if self.expert_bias is None else {"expert_bias": [round(b, 6) for b in self.expert_bias.tolist()]}
        return {
            "event": "expert_usage",
            "layer": layer,
            "avg_routing_prob": [round(p / tokens, 6) for p in self.prob_sum.tolist()],
            "token_counts": [int(c) for c in self.token_counts.tolist()],
            "total_tokens": self.total_tokens,
            "dropped_tokens": self.dropped_tokens,
            **bias,
        }


@dataclass
class RoutingLog:
    lb_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    num_calls: int = 0
    usage: dict[str, LayerUsage] = field(default_factory=dict)

    def add(self, layer: str, stats: MoEStats) -> None:
        self.lb_loss = self.lb_loss.to(stats.lb_loss.device) + stats.lb_loss
        self.num_calls += 1
        usage = self.usage.get(layer)
        if usage is None:
            num_experts = stats.token_counts.numel()
            usage = self.usage[layer] = LayerUsage(torch.zeros(num_experts, dtype=torch.long),
                                                   torch.zeros(num_experts))
        usage.add(stats)

    def merge_usage(self, other: RoutingLog) -> None:
        for layer, usage in other.usage.items():
            if layer in self.usage:
                self.usage[layer].merge(usage)
            else:
                self.usage[layer] = LayerUsage(usage.token_counts.clone(), usage.prob_sum.clone(),
                                               usage.total_tokens, usage.dropped_tokens, usage.expert_bias)

    def events(self) -> list[dict]:
        return [self.usage[layer].to_event(layer) for layer in sorted(self.usage)]
