"""Sparse Mixture-of-Experts FFN: fp32 router, top-k, capacity with counted drops, Switch balance loss.

Capacity applies only in training and only without ``dropless``: evaluation and inference (``eval()``) keep
every assignment, so a sequence's output never depends on the other sequences of its batch. Dropless training
keeps every assignment too; the grouped matmuls take variable group sizes, so that costs no padding.

Two implementations of the expert computation share one router:
- ``reference``: every expert runs on every token and is weighted by its combine weight (zero
  for tokens not routed to it or dropped). Slow and obviously right: it is the oracle in tests.
- ``fast``: kept (token, expert) assignments are sorted by expert and run as one grouped matmul
  per projection (hand-written backward), then gathered back per token with their weights.

Shapes: N tokens, C hidden size, F expert FFN size, E experts, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
    capacity: int  # most assignments an expert serves; N (no limit) when nothing is dropped


@dataclass
class MoEStats:
    """What one MoE call reports: the balance loss (with grad) and usage counts (no grad)."""

    lb_loss: torch.Tensor  # scalar fp32
    token_counts: torch.Tensor  # (E,) assignments routed to each expert, before capacity
    prob_sum: torch.Tensor  # (E,) router probability summed over tokens
    num_tokens: int
    num_dropped: int  # (token, expert) assignments dropped for capacity
    expert_bias: torch.Tensor | None = None  # (E,) the goal bias added to the router logits, None when off


def _grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


class MoEFeedForward(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int,
                 capacity_factor: float, impl: str = "fast", dropless: bool = False) -> None:
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k {top_k} > num_experts {num_experts}")
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.dropless = dropless  # train without capacity too (eval never applies it)
        self.impl = impl
        self.layer_index = -1  # position among the model's MoE layers: the store's address of its experts
        self.expert_source: Any = None  # set by use_expert_source(): experts then live in a tiered store
        self.active_mask: torch.Tensor | None = None  # set by restrict_to(): the only experts the router may pick
        self.expert_bias: torch.Tensor | None = None  # set by set_expert_bias(): goal-aware routing, not saved
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        # Expert weights stacked so the fast path can run one grouped matmul per projection.
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))
        trunc_normal_(self.w_gate_up, std=hidden_size**-0.5)
        trunc_normal_(self.w_down, std=ffn_size**-0.5)
        trunc_normal_(self.router.weight, std=hidden_size**-0.5)

    @property
    def num_active(self) -> int:
        """Experts the router may pick: all of them, or the active group set by ``restrict_to``."""
        return self.num_experts if self.active_mask is None else int(self.active_mask.sum())

    def restrict_to(self, experts: list[int] | None) -> None:
        """Route only among ``experts`` (the active group: a game, goal or data domain), or among all with None.

        Why: a tiered store pays off only when a step's experts fit its hot tier. Masking the other experts'
        logits makes the group a small MoE of its own: softmax, capacity and balance loss are over the group,
        so the experts of other groups get neither tokens nor gradient and stay cold and unchanged.
        """
        if experts is None:
            self.active_mask = None
            return
        ids = sorted(set(experts))
        if not ids or ids[0] < 0 or ids[-1] >= self.num_experts:
            raise ValueError(f"active experts {experts} are not a non-empty subset of 0..{self.num_experts - 1}")
        if self.top_k > len(ids):
            raise ValueError(f"top_k {self.top_k} > {len(ids)} active experts")
        mask = torch.zeros(self.num_experts, dtype=torch.bool, device=self.router.weight.device)
        mask[ids] = True
        self.active_mask = mask

    def set_expert_bias(self, bias: torch.Tensor | None) -> None:
        """Add ``bias`` (E,) to the router logits before top-k (and softmax), or nothing with None.

        Why here and not in the data: goal-aware routing steers tokens towards the experts linked to active goals
        without touching any weight, so the same brain serves every goal set. The bias is a plain attribute, not a
        buffer: it is run state (which goals are active), never part of the saved weights.
        """
        if bias is None:
            self.expert_bias = None
            return
        if bias.shape != (self.num_experts,):
            raise ValueError(f"expert bias of shape {tuple(bias.shape)} for {self.num_experts} experts")
        self.expert_bias = bias.detach().float().to(self.router.weight.device)

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_active)

    @property
    def applies_capacity(self) -> bool:
        """Capacity is a training-time cap on compute; in eval it would make a sequence's output depend on
        the rest of its batch (and drop tokens that inference must serve), so only training applies it."""
        return self.training and not self.dropless

    def route(self, x: torch.Tensor) -> Routing:
        """x: (N, C). The router always runs in fp32, whatever autocast says."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        if self.expert_bias is not None:
            logits = logits + self.expert_bias.to(logits.device)
        if self.active_mask is not None:
            logits = logits.masked_fill(~self.active_mask.to(logits.device), float("-inf"))
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        if not self.applies_capacity:  # top-k experts are distinct, so no expert gets more than N assignments
            return Routing(top_i, top_p, torch.ones_like(top_i, dtype=torch.bool), probs, x.shape[0])
        capacity = self.capacity(x.shape[0])
        kept = self._within_capacity(top_i, capacity)
        return Routing(top_i, top_p * kept, kept, probs, capacity)

    def _within_capacity(self, top_i: torch.Tensor, capacity: int) -> torch.Tensor:
        """Assignments are served in token order (a token's choices best first). Why not all first choices
        before any second choice (Switch/GShard style): then a later token's first choice could push an
        earlier token's second choice over capacity, and the output at position t would depend on tokens
        after t, a causal leak. Token order makes an assignment's fate depend only on earlier tokens."""
        token_major = top_i.reshape(-1)  # (N*k,) in serving priority order
        order = torch.argsort(token_major, stable=True)  # grouped by expert, priority order kept within a group
        counts = torch.bincount(token_major, minlength=self.num_experts)
        group_start = counts.cumsum(0) - counts
        rank_sorted = torch.arange(order.numel(), device=top_i.device) - group_start[token_major[order]]
        position = torch.empty_like(order).scatter_(0, order, rank_sorted)  # rank of the assignment in its expert
        return (position < capacity).view_as(top_i)

    def load_balance_loss(self, routing: Routing) -> torch.Tensor:
        """Switch loss E * sum_e f_e * P_e; f_e = share of assignments to e (before capacity), P_e = mean prob.

        Equals 1.0 for a perfectly uniform router; only P_e carries gradient. Under ``restrict_to`` E is the
        group's size (f and P are zero outside it): the loss balances within the active group.
        """
        counts = torch.bincount(routing.expert_index.reshape(-1), minlength=self.num_experts)
        f = counts.float() / routing.expert_index.numel()
        return self.num_active * (f * routing.probs.mean(dim=0)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        routing = self.route(flat)
        if self.expert_source is not None:
            out = self._experts_tiered(flat, routing)
        elif self.impl == "reference":
            out = self._experts_reference(flat, routing)
        else:
            out = self._experts_fast(flat, routing)
        with torch.no_grad():
            counts = torch.bincount(routing.expert_index.reshape(-1), minlength=self.num_experts)
            stats = MoEStats(
                lb_loss=torch.zeros((), device=x.device),
                token_counts=counts,
                prob_sum=routing.probs.sum(dim=0),
                num_tokens=flat.shape[0],
                num_dropped=int((~routing.kept).sum()),
                expert_bias=self.expert_bias,
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

    def use_expert_source(self, source: Any) -> None:
        """Hand the experts to a tiered store: drop the local weights. From then on ``source.weights(layer, ids)``
        supplies (w_gate_up, w_down) leaf tensors per expert, ``source.slots_of(layer, ids)`` their slots (None if
        some have none: streamed past a full hot tier), ``source.slot_weights()`` every slot's weights as
        (S, C, 2F) and (S, F, C) views."""
        for name in ("w_gate_up", "w_down"):
            if name in self._parameters:
                delattr(self, name)
        self.expert_source = source

    def _experts_tiered(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Experts from leased store slots, by the grouped fast path with the slots as groups (the weights are
        read in place through strided views of the slab; no copy)."""
        used = routing.expert_index[routing.kept].unique().tolist()
        leaves = self.expert_source.weights(self.layer_index, used)
        slot_w_gate_up, slot_w_down = self.expert_source.slot_weights()
        slots = self.expert_source.slots_of(self.layer_index, used)  # None: some came as copies (hot tier full)
        if not used or x.dtype != slot_w_gate_up.dtype or slots is None:  # autocast: cast per used expert
            return self._experts_tiered_loop(x, routing, used, leaves)
        slot_of_expert = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        slot_of_expert[used] = torch.tensor(slots, device=x.device)
        plan = _DispatchPlan.build(slot_of_expert[routing.expert_index], routing.kept, slot_w_gate_up.shape[0])
        order = sorted(range(len(used)), key=slots.__getitem__)
        ordered = [leaves[used[i]] for i in order]
        used_slots = torch.tensor([slots[i] for i in order], device=x.device)
        return _SlotExpertFFN.apply(x, routing.combine_weight, plan, (slot_w_gate_up, slot_w_down), used_slots,
                                    *(w for w, _ in ordered), *(w for _, w in ordered))

    def _experts_tiered_loop(self, x: torch.Tensor, routing: Routing, used: list[int],
                             weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One matmul chain per expert that received tokens (autograd through the per-expert leaves)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in used:
            w_gate_up, w_down = weights[e]
            token, slot = ((routing.expert_index == e) & routing.kept).nonzero(as_tuple=True)
            gate, up = (x[token] @ w_gate_up.to(x.dtype)).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ w_down.to(x.dtype)
            out.index_add_(0, token, y.float() * routing.combine_weight[token, slot, None])
        return out

    def _experts_fast(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        plan = _DispatchPlan.build(routing.expert_index, routing.kept, self.num_experts)
        w_gate_up, w_down = self.w_gate_up, self.w_down
        if x.dtype != w_gate_up.dtype:  # autocast does not cover the grouped matmul
            w_gate_up, w_down = w_gate_up.to(x.dtype), w_down.to(x.dtype)
        return _ExpertFFN.apply(x, w_gate_up, w_down, routing.combine_weight, plan)


@dataclass
class _DispatchPlan:
    """Where the kept (token, expert) assignments go: rows sorted by expert, and back.

    Slot s = n * k + j is token n's j-th choice. ``token`` lists, per row of the grouped matmuls, the token whose
    kept slot ``slots[i]`` it is, rows grouped by expert; ``row_of_slot[s]`` is the row of slot s. A dropped slot
    points at row 0 and is weighted 0: gathering is faster than scattering on CPU, at the price that a non-finite
    row 0 would leak into the tokens that have a dropped slot.
    """

    token: torch.Tensor  # (M,) int64
    slots: torch.Tensor  # (M,) int64
    row_of_slot: torch.Tensor  # (N*k,) int64
    kept: torch.Tensor  # (N, k) bool
    group_ends: torch.Tensor  # (E,) int32, cumulative kept rows per expert

    @staticmethod
    def build(expert_index: torch.Tensor, kept: torch.Tensor, num_experts: int) -> _DispatchPlan:
        """``expert_index`` (N, k) in 0..num_experts-1 (experts, or the hot slots that hold them)."""
        k = expert_index.shape[1]
        flat_kept = kept.reshape(-1)
        key = expert_index.reshape(-1).masked_fill(~flat_kept, num_experts)  # dropped sort last
        order = torch.argsort(key, stable=True)
        group_ends = torch.bincount(key, minlength=num_experts + 1)[:num_experts].cumsum(0).to(torch.int32)
        num_rows = int(group_ends[-1])
        slots = order[:num_rows]
        row_of_slot = torch.zeros_like(order).index_copy_(0, slots, torch.arange(num_rows, device=order.device))
        token = slots.div(k, rounding_mode="floor")
        return _DispatchPlan(token, slots, row_of_slot, kept, group_ends)

    def to_slots(self, rows: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """(M, C) rows in expert order -> (N, k, C), the row of each slot (row 0 for a dropped one)."""
        num_tokens, k = self.kept.shape
        if rows.shape[0] == 0:
            return rows.new_zeros(num_tokens, k, rows.shape[1])
        return _gather_rows(rows, self.row_of_slot, buffer).view(num_tokens, k, -1)


def _gather_rows(src: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """src[index], written into the first rows of a free (R, C) ``buffer`` when it fits, to spare fresh pages."""
    fits = buffer is not None and buffer.dtype == src.dtype and buffer.shape[1:] == src.shape[1:]
    if not fits or buffer.shape[0] < index.shape[0]:
        return src.index_select(0, index)
    return torch.index_select(src, 0, index, out=buffer[: index.shape[0]])


class _ExpertFFN(torch.autograd.Function):
    """SwiGLU experts over rows grouped by expert, with a hand-written backward.

    Forward: xs = x[token]; h = xs @ W_gu[e]; act = silu(gate) * up; y = act @ W_down[e];
    out[n] = sum_j w[n, j] * y[row_of_slot[n, j]].
    Saved: h, act and y per slot (the gathered copy, whose dot with d out is the combine-weight gradient); x is
    gathered again in the backward. The backward turns h into d h in place, writes gathers into dead buffers and
    gathers instead of scattering, so it takes few fresh pages (which the kernel must zero: a real cost on CPU).
    Because it overwrites what it saved, it runs once per forward: autograd's version check refuses a second
    backward through the same graph (retain_graph).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,  # type: ignore[override]
                combine_weight: torch.Tensor, plan: _DispatchPlan) -> torch.Tensor:
        out, h, act, y_slots = _ffn_forward(x, w_gate_up, w_down, combine_weight, plan)
        ctx.plan = plan
        ctx.save_for_backward(x, w_gate_up, w_down, combine_weight, h, act, y_slots)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        plan: _DispatchPlan = ctx.plan
        x, w_gate_up, w_down, combine_weight, h, act, y_slots = ctx.saved_tensors
        grad_x, grad_w_gate_up, grad_w_down, grad_w = _ffn_backward(
            grad_out, x, w_gate_up, w_down, combine_weight, h, act, y_slots, plan, plan.group_ends)
        return grad_x, grad_w_gate_up, grad_w_down, grad_w, None  # type: ignore[return-value]


class _SlotExpertFFN(torch.autograd.Function):
    """``_ExpertFFN`` on experts that live in the slots of a tiered store's slab, without copying weights.

    The grouped matmuls read every slot's weights through two strided views of the slab (groups = slots; a
    slot that got no rows is skipped for free). Weight gradients are computed for the used slots only and go
    to the per-expert leaf tensors (``leaves``: every used slot's w_gate_up, then every w_down, in slot order),
    which is where the store's optimizer reads them.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, combine_weight: torch.Tensor, plan: _DispatchPlan,  # type: ignore[override]
                slot_weights: tuple[torch.Tensor, torch.Tensor], used_slots: torch.Tensor,
                *leaves: torch.Tensor) -> torch.Tensor:
        w_gate_up, w_down = slot_weights
        out, h, act, y_slots = _ffn_forward(x, w_gate_up, w_down, combine_weight, plan)
        ctx.plan, ctx.slot_weights, ctx.used_slots = plan, slot_weights, used_slots
        ctx.save_for_backward(x, combine_weight, h, act, y_slots)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        plan: _DispatchPlan = ctx.plan
        x, combine_weight, h, act, y_slots = ctx.saved_tensors
        w_gate_up, w_down = ctx.slot_weights
        used_ends = plan.group_ends.index_select(0, ctx.used_slots)  # empty groups own no rows: skip them
        grad_x, grad_w_gate_up, grad_w_down, grad_w = _ffn_backward(
            grad_out, x, w_gate_up, w_down, combine_weight, h, act, y_slots, plan, used_ends)
        return grad_x, grad_w, None, None, None, *grad_w_gate_up.unbind(0), *grad_w_down.unbind(0)


def _ffn_forward(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, combine_weight: torch.Tensor,
                 plan: _DispatchPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, h, act, y_slots): the output and what the backward needs (see ``_ExpertFFN``)."""
    ffn = w_down.shape[1]
    h = grouped_matmul(x.index_select(0, plan.token), w_gate_up, plan.group_ends)  # (M, 2F)
    act = F.silu(h[:, :ffn]).mul_(h[:, ffn:])  # (M, F)
    y_slots = plan.to_slots(grouped_matmul(act, w_down, plan.group_ends)).float()  # (N, k, C)
    return _weighted_slot_sum(y_slots, combine_weight.float()), h, act, y_slots


def _ffn_backward(grad_out: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  combine_weight: torch.Tensor, h: torch.Tensor, act: torch.Tensor, y_slots: torch.Tensor,
                  plan: _DispatchPlan, weight_ends: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(d x, d w_gate_up, d w_down, d combine_weight). Weight gradients are per group of ``weight_ends`` (the
    plan's groups, or only the non-empty ones); this overwrites h and y_slots (see ``_ExpertFFN``)."""
    grad_out = grad_out.float()
    grad_w = torch.bmm(y_slots, grad_out.unsqueeze(2)).view_as(combine_weight).to(combine_weight.dtype)
    buffer = y_slots.view(-1, y_slots.shape[-1])  # free from here on
    grad_y = _gather_rows(grad_out.to(h.dtype), plan.token, buffer)  # (M, C)
    grad_y.mul_(combine_weight.reshape(-1).index_select(0, plan.slots).to(h.dtype)[:, None])
    groups = weight_ends.shape[0]
    grad_w_down = grouped_matmul_weight_grad(act, grad_y, weight_ends, (groups, *w_down.shape[1:]))
    grad_act = grouped_matmul(grad_y, w_down.transpose(1, 2), plan.group_ends)  # (M, F)
    grad_h = _swiglu_backward_(h, grad_act, act)
    xs = _gather_rows(x, plan.token, buffer)
    grad_w_gate_up = grouped_matmul_weight_grad(xs, grad_h, weight_ends, (groups, *w_gate_up.shape[1:]))
    grad_xs = grouped_matmul(grad_h, w_gate_up.transpose(1, 2), plan.group_ends)  # (M, C)
    grad_x = _weighted_slot_sum(plan.to_slots(grad_xs, buffer), plan.kept.to(grad_xs.dtype))
    return grad_x.to(x.dtype), grad_w_gate_up, grad_w_down, grad_w


def _weighted_slot_sum(slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j weight[:, j] * slots[:, j]: slots (N, k, C), weight (N, k) -> (N, C). (bmm loops per token here.)"""
    out = slots[:, 0] * weight[:, :1]
    for j in range(1, slots.shape[1]):
        out.addcmul_(slots[:, j], weight[:, j : j + 1])
    return out


def _swiglu_backward_(h: torch.Tensor, grad_act: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """act = silu(gate) * up with h = [gate | up]: overwrites h with [d gate | d up]; ``scratch`` (M, F) is free."""
    ffn = grad_act.shape[1]
    gate, up = h[:, :ffn], h[:, ffn:]
    up.mul_(grad_act)  # d silu(gate)
    silu_gate = torch.ops.aten.silu.out(gate, out=scratch)
    torch.ops.aten.silu_backward.grad_input(up, gate, grad_input=gate)
    torch.mul(grad_act, silu_gate, out=up)
    return h


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm exists, takes the dtype, and its CPU kernel's 16-byte stride and alignment rule holds."""
    if not _grouped_mm_available() or any(t.dtype not in _GROUPED_MM_DTYPES for t in tensors):
        return False
    return all(t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride() if st != 1)
               for t in tensors)


# (device type, dtype) pairs where torch._grouped_mm refused to run (e.g. fp32 on some CUDA GPUs):
# those use the per-expert loop from then on instead of failing every call.
_GROUPED_MM_REFUSED: set[tuple[str, torch.dtype]] = set()


def _try_grouped_mm(a: torch.Tensor, b: torch.Tensor, group_ends: torch.Tensor, rows: int) -> torch.Tensor | None:
    """torch._grouped_mm(a, b) when it can run here; None tells the caller to loop over experts."""
    key = (a.device.type, a.dtype)
    if rows == 0 or key in _GROUPED_MM_REFUSED or not _grouped_mm_ok(a, b):
        return None
    try:
        return torch._grouped_mm(a, b, offs=group_ends.to(torch.int32))
    except RuntimeError:
        _GROUPED_MM_REFUSED.add(key)
        return None


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Rows [end_{e-1}, end_e) of x times weights[e]: x (M, K), weights (E, K, N) -> (M, N)."""
    out = _try_grouped_mm(x, weights, group_ends, rows=x.shape[0])
    if out is not None:
        return out
    ends = group_ends.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x[s:e] @ weights[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True))])


def grouped_matmul_weight_grad(x: torch.Tensor, grad: torch.Tensor, group_ends: torch.Tensor,
                               shape: tuple[int, ...]) -> torch.Tensor:
    """Per group e: x[rows_e].T @ grad[rows_e]: x (M, K), grad (M, N) -> (E, K, N); zeros for an empty group."""
    out = _try_grouped_mm(x.t(), grad, group_ends, rows=x.shape[0])
    if out is not None:
        return out
    out = grad.new_zeros(shape)
    start = 0
    for e, end in enumerate(group_ends.tolist()):
        if end > start:
            torch.mm(x[start:end].t(), grad[start:end], out=out[e])
        start = end
    return out


def dense_equivalent(moe: MoEFeedForward) -> SwiGLU:
    """The dense SwiGLU that a 1-expert MoE computes (used to check the MoE against a dense FFN)."""
    assert moe.num_experts == 1
    hidden, ffn2 = moe.w_gate_up.shape[1:]
    dense = SwiGLU(hidden, ffn2 // 2)
    with torch.no_grad():
        dense.gate_up.weight.copy_(moe.w_gate_up[0].t())
        dense.down.weight.copy_(moe.w_down[0].t())
    return dense
