"""HRM ACTv1 for causal language modelling, with sparse MoE (or dense SwiGLU) FFNs.

Two recurrent stacks: L (fast) updates ``z_L <- L(z_L, z_H + x)`` l_cycles times per H update,
H (slow) updates ``z_H <- H(z_H, z_L)``; h_cycles H updates make one *segment*. ACT runs up to
``halt_max_steps`` segments per sequence, each supervised with the next-token loss (deep
supervision); the carry is detached between segments. A Q-head on the last position of ``z_H``
(the only position that has seen the whole causal sequence) predicts (halt, continue) values.

Halting reward for text: "whole answer exactly right", HRM's puzzle reward, is almost never true
for text and would teach the Q-head never to halt. Here halting after a segment is *right* when
one more segment would lower the sequence's next-token loss by less than ``halt_epsilon`` of it
(thinking more would not help). The continue value is bootstrapped from the next segment's Q
values as in HRM, times ``q_continue_discount`` < 1: without that cost, "halt now" and "halt
next time" are worth the same whenever halting is right, and the Q-head cannot choose.
Larger ``halt_epsilon`` -> earlier halting -> fewer ``mean_halt_steps`` (tested).

Shapes: B batch, T time, C hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aios_ray.config import ModelConfig
from aios_ray.model.layers import CausalSelfAttention, RotaryEmbedding, SwiGLU, rms_norm, trunc_normal_
from aios_ray.model.moe import MoEFeedForward, MoEStats
from aios_ray.model.routing_log import RoutingLog

Rope = tuple[torch.Tensor, torch.Tensor] | None  # None: --pos-encodings learned|none
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --model-dtype


class Block(nn.Module):
    """Post-norm transformer block (HRM): x = norm(x + attn(x)); x = norm(x + ffn(x))."""

    def __init__(self, cfg: ModelConfig, moe_impl: str = "fast") -> None:
        super().__init__()
        self.attn = CausalSelfAttention(cfg.hidden_size, cfg.num_heads, cfg.window_size, cfg.use_flash_attn)
        self.ffn: nn.Module
        if cfg.use_moe:
            self.ffn = MoEFeedForward(cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.num_experts_per_tok,
                                      cfg.moe_capacity_factor, impl=moe_impl, dropless=cfg.moe_dropless)
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_size)

    def forward(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, MoEStats | None]:
        x = rms_norm(x + self.attn(x, rope))
        if isinstance(self.ffn, MoEFeedForward):
            out, stats = self.ffn(x)
        else:
            out, stats = self.ffn(x), None
        return rms_norm(x + out), stats


class ReasoningModule(nn.Module):
    """A stack of blocks applied to ``hidden + injection`` (HRM's input injection)."""

    def __init__(self, cfg: ModelConfig, num_layers: int, name: str, moe_impl: str) -> None:
        super().__init__()
        self.name = name
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.layers = nn.ModuleList(Block(cfg, moe_impl) for _ in range(num_layers))

    def forward(self, hidden: torch.Tensor, injection: torch.Tensor, rope: Rope,
                log: RoutingLog | None) -> torch.Tensor:
        hidden = hidden + injection
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden, stats = checkpoint(layer, hidden, rope, use_reentrant=False)
            else:
                hidden, stats = layer(hidden, rope)
            if log is not None and stats is not None:
                log.add(f"{self.name}.{i}", stats)
        return hidden


@dataclass
class Carry:
    z_H: torch.Tensor  # (B, T, C)
    z_L: torch.Tensor  # (B, T, C)


@dataclass
class Segment:
    carry: Carry  # detached
    logits: torch.Tensor  # (B, T, V)
    q_halt: torch.Tensor  # (B,) fp32
    q_continue: torch.Tensor  # (B,) fp32


@dataclass
class HRMOutput:
    loss: torch.Tensor  # scalar to backpropagate: lm + 0.5 * q + lb_coef * lb
    lm_loss: torch.Tensor  # detached; training: mean of each sequence's mean over its segments; eval: last segment
    q_loss: torch.Tensor  # detached
    lb_loss: torch.Tensor  # detached; summed over every MoE call of the forward
    halt_steps: torch.Tensor  # (B,) segments each sequence ran
    logits: torch.Tensor  # (B, T, V) of the last segment
    routing: RoutingLog


class HRMACTv1(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_impl: str = "fast") -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        C = cfg.hidden_size
        self.embed_scale = math.sqrt(C)
        self.embed = nn.Embedding(cfg.vocab_size, C)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        self.q_head = nn.Linear(C, 2, bias=True)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # buffers only, never saved
        # --pos-encodings learned: one trained vector per position, added to the token embeddings
        self.pos_embed = nn.Embedding(cfg.max_seq_len, C) if cfg.pos_encodings == "learned" else None
        self.H_level = ReasoningModule(cfg, cfg.h_layers, "H", moe_impl)
        self.L_level = ReasoningModule(cfg, cfg.l_layers, "L", moe_impl)
        # Fixed random initial states (HRM): part of the model, saved with it.
        self.register_buffer("H_init", trunc_normal_(torch.empty(C), std=1.0))
        self.register_buffer("L_init", trunc_normal_(torch.empty(C), std=1.0))
        self._init_weights()
        for index, moe in enumerate(self.moe_layers()):
            moe.layer_index = index
        # --model-dtype: every construction site (training, eval, attach, export) builds the same dtype, and the
        # saved tensors keep it; the RoPE tables are cast back to x.dtype at use anyway.
        self.to(DTYPES[cfg.model_dtype])

    def moe_layers(self) -> list[MoEFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def restrict_experts(self, groups: list[list[int]] | list[int] | None) -> None:
        """Route every MoE layer among its active group only (see ``MoEFeedForward.restrict_to``): one list for
        all layers, one list per MoE layer, or None to route among all experts again."""
        layers = self.moe_layers()
        if groups is None or not groups or isinstance(groups[0], int):
            per_layer = [groups] * len(layers)
        elif len(groups) != len(layers):
            raise ValueError(f"{len(groups)} expert groups for {len(layers)} MoE layers")
        else:
            per_layer = groups
        for moe, group in zip(layers, per_layer, strict=True):
            moe.restrict_to(group)  # type: ignore[arg-type]

    def set_expert_bias(self, bias: torch.Tensor | None) -> None:
        """Goal-aware routing: add ``bias`` to every MoE layer's router logits (see ``MoEFeedForward.
        set_expert_bias``): one (E,) vector for all layers, an (L, E) tensor with a row per MoE layer, or None."""
        layers = self.moe_layers()
        if bias is not None and bias.ndim == 2 and bias.shape[0] != len(layers):
            raise ValueError(f"expert bias for {bias.shape[0]} layers, the model has {len(layers)} MoE layers")
        for i, moe in enumerate(layers):
            moe.set_expert_bias(None if bias is None else bias[i] if bias.ndim == 2 else bias)

    def use_expert_source(self, source: object) -> None:
        """Experts of every MoE layer come from a tiered store from now on (see aios_ray/store)."""
        for moe in self.moe_layers():
            moe.use_expert_source(source)

    def _init_weights(self) -> None:
        C = self.cfg.hidden_size
        trunc_normal_(self.embed.weight, std=1.0 / self.embed_scale)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed.weight, std=1.0 / self.embed_scale)
        trunc_normal_(self.lm_head.weight, std=C**-0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module not in (self.lm_head, self.q_head):
                trunc_normal_(module.weight, std=module.in_features**-0.5)
        # Q-head starts at "always continue" (HRM): early training runs every segment.
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)

    def initial_carry(self, batch: int, seq_len: int) -> Carry:
        C = self.cfg.hidden_size
        return Carry(self.H_init.expand(batch, seq_len, C), self.L_init.expand(batch, seq_len, C))

    def segment(self, carry: Carry, x: torch.Tensor, rope: Rope, log: RoutingLog | None,
                with_grad: bool) -> Segment:
        """One ACT segment: h_cycles x l_cycles updates. With the one-step gradient only the final
        L and H updates are differentiated; every earlier cycle runs under no_grad."""
        cfg = self.cfg
        z_H, z_L = carry.z_H, carry.z_L
        with torch.set_grad_enabled(with_grad and not cfg.one_step_grad):
            for h in range(cfg.h_cycles):
                for step in range(cfg.l_cycles):
                    if h < cfg.h_cycles - 1 or step < cfg.l_cycles - 1:
                        z_L = self.L_level(z_L, z_H + x, rope, log)
                if h < cfg.h_cycles - 1:
                    z_H = self.H_level(z_H, z_L, rope, log)
        with torch.set_grad_enabled(with_grad):
            z_L = self.L_level(z_L, z_H + x, rope, log)
            z_H = self.H_level(z_H, z_L, rope, log)
            logits = self.lm_head(z_H)
            q = self.q_head(z_H[:, -1]).float()  # last position: it has seen the whole sequence
        return Segment(Carry(z_H.detach(), z_L.detach()), logits, q[:, 0], q[:, 1])

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(input_ids.shape[1], device=input_ids.device))
        return x * self.embed_scale

    def positions(self, seq_len: int) -> Rope:
        """The RoPE tables for ``seq_len`` tokens, or None where positions are not rotary."""
        return self.rope(seq_len) if self.cfg.pos_encodings == "rope" else None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> HRMOutput:
        """input_ids, labels: (B, T) with labels[:, t] == the token after input_ids[:, t]."""
        if self.training:
            return self._forward_train(input_ids, labels)
        return self._forward_eval(input_ids, labels)

    def _forward_eval(self, input_ids: torch.Tensor, labels: torch.Tensor) -> HRMOutput:
        """Evaluation always runs all ``halt_max_steps`` segments and scores the last one."""
        B, T = input_ids.shape
        x, rope, log = self.embed_tokens(input_ids), self.positions(T), RoutingLog()
        seg = None
        carry = self.initial_carry(B, T)
        for _ in range(self.cfg.halt_max_steps):
            seg = self.segment(carry, x, rope, log, with_grad=torch.is_grad_enabled())
            carry = seg.carry
        assert seg is not None
        lm_loss = sequence_ce(seg.logits, labels).mean()
        zero = torch.zeros((), device=x.device)
        steps = torch.full((B,), float(self.cfg.halt_max_steps), device=x.device)
        lb = log.lb_loss.detach() if log.num_calls else zero
        return HRMOutput(lm_loss, lm_loss.detach(), zero, lb, steps, seg.logits, log)

    @torch.no_grad()
    def inference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) logits of the last of all ``halt_max_steps`` segments, as evaluation scores them;
        no labels, no routing log (generation: ``aios_ray.generate`` and the ``transformers`` wrapper)."""
        B, T = input_ids.shape
        x, rope = self.embed_tokens(input_ids), self.positions(T)
        carry, logits = self.initial_carry(B, T), None
        for _ in range(self.cfg.halt_max_steps):
            seg = self.segment(carry, x, rope, None, with_grad=False)
            carry, logits = seg.carry, seg.logits
        assert logits is not None
        return logits

    def _forward_train(self, input_ids: torch.Tensor, labels: torch.Tensor) -> HRMOutput:
        cfg = self.cfg
        B, T = input_ids.shape
        x, rope, log = self.embed_tokens(input_ids), self.positions(T), RoutingLog()
        max_steps = cfg.halt_max_steps
        halted = torch.zeros(B, dtype=torch.bool, device=x.device)
        steps = torch.zeros(B, device=x.device)
        lm_sum = q_sum = torch.zeros(B, device=x.device)  # per sequence, over the segments it ran
        seg = self.segment(self.initial_carry(B, T), x, rope, log, with_grad=True)
        for s in range(max_steps):
            active = ~halted
            ce = sequence_ce(seg.logits, labels)  # (B,)
            lm_sum = lm_sum + ce * active
            steps = steps + active
            if max_steps == 1:
                break
            is_last = s + 1 >= max_steps
            halt = self._halt_decision(seg, steps, is_last)
            keep_going = bool((active & ~halt).any())
            # The Q target needs the next segment's outputs. When some sequence goes on, that next
            # segment is the real one (with grad); otherwise it is a no-grad target-only pass.
            nxt = self.segment(seg.carry, x, rope, log if keep_going else None, with_grad=keep_going)
            q_terms = self._q_loss_terms(seg, nxt, ce.detach(), labels, is_last)
            q_sum = q_sum + q_terms * active
            halted = halted | halt
            if not keep_going:
                break
            seg = nxt
        # Each sequence's mean over its segments, then the mean over sequences. Not the mean over all (sequence,
        # segment) pairs: that divides by a count of the whole batch, so when sequences halt after different
        # numbers of segments a batch's loss is no longer the size-weighted mean of the losses of its parts, and
        # micro-batches after an out-of-memory retreat, gradient accumulation and DDP shards would each train on
        # another objective than the whole batch. (Equal when every sequence runs as many segments.)
        lm_loss, q_loss = (lm_sum / steps).mean(), (q_sum / steps).mean()
        lb_loss = log.lb_loss if log.num_calls else torch.zeros((), device=x.device)
        loss = lm_loss + 0.5 * q_loss + cfg.moe_lb_coef * lb_loss
        return HRMOutput(loss, lm_loss.detach(), q_loss.detach(), lb_loss.detach(), steps, seg.logits, log)

    @torch.no_grad()
    def _halt_decision(self, seg: Segment, steps: torch.Tensor, is_last: bool) -> torch.Tensor:
        """Halt where the Q-head prefers halting, unless exploration demands a minimum of segments."""
        if is_last:
            return torch.ones_like(seg.q_halt, dtype=torch.bool)
        halt = seg.q_halt > seg.q_continue
        explore = torch.rand(steps.shape, device=steps.device) < self.cfg.halt_exploration_prob
        random_min = torch.randint(2, self.cfg.halt_max_steps + 1, steps.shape, device=steps.device)
        min_steps = torch.where(explore, random_min, torch.ones_like(random_min))
        return halt & (steps >= min_steps)

    def _q_loss_terms(self, seg: Segment, nxt: Segment, ce: torch.Tensor, labels: torch.Tensor,
                      is_last: bool) -> torch.Tensor:
        with torch.no_grad():
            next_ce = sequence_ce(nxt.logits.detach(), labels)
            halt_target = ((ce - next_ce) < self.cfg.halt_epsilon * ce).float()
            nq_halt, nq_cont = nxt.q_halt.detach(), nxt.q_continue.detach()
            best_next = torch.sigmoid(nq_halt if is_last else torch.maximum(nq_halt, nq_cont))
            continue_target = self.cfg.q_continue_discount * best_next
        bce: Callable = F.binary_cross_entropy_with_logits
        return bce(seg.q_halt, halt_target, reduction="none") + bce(seg.q_continue, continue_target,
                                                                    reduction="none")


def sequence_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, in fp32: (B, T, V), (B, T) -> (B,)."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * T, V), labels.reshape(B * T), reduction="none")
    return ce.view(B, T).mean(dim=1)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters and the share active per token (top-k of E experts)."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".ffn.w_" in n)
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    active = total - expert + (expert * cfg.num_experts_per_tok // cfg.num_experts if cfg.use_moe else 0)
    return {"total": total, "active_per_token": active}
