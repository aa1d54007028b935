"""MoE layer: fast path vs the looped reference, dense equivalence, drops, balance loss by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from aios_ray.config import ModelConfig
from aios_ray.model.hrm import HRMACTv1
from aios_ray.model.moe import MoEFeedForward, dense_equivalent


def _pair(hidden: int, ffn: int, experts: int, k: int, factor: float) -> tuple[MoEFeedForward, MoEFeedForward]:
    torch.manual_seed(0)
    fast = MoEFeedForward(hidden, ffn, experts, k, factor, impl="fast")
    ref = MoEFeedForward(hidden, ffn, experts, k, factor, impl="reference")
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _run(layer: MoEFeedForward, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out, stats = layer(x)
    (out * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads, stats


@pytest.mark.parametrize(
    ("tokens", "hidden", "ffn", "experts", "k", "factor"),
    [
        (64, 16, 32, 4, 2, 1.25),  # default-like, a few drops
        (64, 16, 32, 4, 2, 0.5),  # heavy drops
        (50, 8, 16, 8, 1, 1.0),  # top-1
        (30, 8, 16, 1, 1, 1.0),  # a single expert
        (7, 8, 16, 16, 2, 2.0),  # more experts than tokens: some get none
    ],
)
def test_fast_path_equals_reference_outputs_and_grads(tokens, hidden, ffn, experts, k, factor):
    fast, ref = _pair(hidden, ffn, experts, k, factor)
    x = torch.randn(2, tokens // 2 if tokens % 2 == 0 else tokens, hidden)
    grad_out = torch.randn_like(x)
    out_f, gx_f, grads_f, stats_f = _run(fast, x, grad_out)
    out_r, gx_r, grads_r, stats_r = _run(ref, x, grad_out)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-5, rtol=1e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], atol=1e-5, rtol=1e-4, msg=name)
    assert stats_f.num_dropped == stats_r.num_dropped
    assert torch.equal(stats_f.token_counts, stats_r.token_counts)


def test_one_expert_moe_equals_dense_swiglu():
    torch.manual_seed(1)
    moe = MoEFeedForward(16, 32, num_experts=1, top_k=1, capacity_factor=1.0)
    dense = dense_equivalent(moe)
    x = torch.randn(3, 10, 16)
    grad_out = torch.randn_like(x)
    out_m, gx_m, grads_m, stats = _run(moe, x, grad_out)
    xd = x.clone().requires_grad_(True)
    out_d = dense(xd)
    (out_d * grad_out).sum().backward()
    torch.testing.assert_close(out_m, out_d.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_m, xd.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_m["w_gate_up"][0], dense.gate_up.weight.grad.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_m["w_down"][0], dense.down.weight.grad.t(), atol=1e-5, rtol=1e-5)
    assert stats.num_dropped == 0


def test_drops_are_counted_and_pass_nothing_through():
    """Every token prefers expert 0; capacity ceil(1.0 * 12 * 1 / 4) = 3 keeps the first 3 tokens only."""
    layer = MoEFeedForward(4, 8, num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    x = torch.zeros(12, 4)
    x[:, 0] = 1.0
    x[:, 1:] = torch.randn(12, 3)
    out, stats = layer(x)
    assert layer.capacity(12) == 3
    assert stats.num_dropped == 9
    assert stats.token_counts.tolist() == [12, 0, 0, 0]
    assert torch.all(out[3:] == 0)  # dropped tokens: the FFN adds nothing (the residual carries them)
    assert torch.all(out[:3].abs().sum(-1) > 0)


def test_load_balance_loss_matches_hand_computation():
    """3 tokens, 2 experts, top-1. Probabilities (0.75, 0.25), (0.75, 0.25), (0.25, 0.75):
    f = (2/3, 1/3), P = (7/12, 5/12), loss = 2 * (2/3 * 7/12 + 1/3 * 5/12) = 19/18."""
    layer = MoEFeedForward(2, 4, num_experts=2, top_k=1, capacity_factor=2.0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    ln3 = math.log(3.0)
    x = torch.tensor([[ln3, 0.0], [ln3, 0.0], [0.0, ln3]])
    _, stats = layer(x)
    assert stats.lb_loss.item() == pytest.approx(19 / 18, rel=1e-6)
    # A uniform router scores exactly 1.0 whatever it picks.
    with torch.no_grad():
        layer.router.weight.zero_()
    _, stats = layer(x)
    assert stats.lb_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_router_stays_fp32_under_bf16_autocast():
    layer = MoEFeedForward(16, 32, 4, 2, 1.25)
    x = torch.randn(20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.route(x)
        out, _ = layer(x)
    assert routing.probs.dtype == torch.float32
    assert out.dtype == x.dtype and torch.isfinite(out).all()


def test_loop_fallback_where_grouped_mm_is_refused(monkeypatch):
    """Some devices refuse torch._grouped_mm for a dtype: the layer then loops over experts, same result."""
    from aios_ray.model import moe

    def refuse(*_args, **_kwargs):
        raise RuntimeError("grouped gemm is not supported for this dtype")

    monkeypatch.setattr(moe, "_GROUPED_MM_REFUSED", set())
    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    fast, ref = _pair(16, 32, 4, 2, 1.0)
    x, grad_out = torch.randn(40, 16), torch.randn(40, 16)
    out_f, gx_f, grads_f, _ = _run(fast, x, grad_out)
    out_r, gx_r, grads_r, _ = _run(ref, x, grad_out)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_f["w_gate_up"], grads_r["w_gate_up"], atol=1e-5, rtol=1e-4)
    assert (x.device.type, torch.float32) in moe._GROUPED_MM_REFUSED


def _sub_moe(full: MoEFeedForward, group: list[int], impl: str) -> MoEFeedForward:
    """A standalone MoE made of ``group``'s experts and router rows: what a restricted layer must equal."""
    hidden, experts = full.router.weight.shape[1], len(group)
    sub = MoEFeedForward(hidden, full.w_down.shape[1], experts, full.top_k, full.capacity_factor, impl=impl)
    with torch.no_grad():
        sub.router.weight.copy_(full.router.weight[group])
        sub.w_gate_up.copy_(full.w_gate_up[group])
        sub.w_down.copy_(full.w_down[group])
    return sub


@pytest.mark.parametrize(("impl", "factor"), [("fast", 1.25), ("reference", 1.25), ("fast", 0.5)])
def test_restricted_routing_equals_a_moe_of_the_group_alone(impl, factor):
    torch.manual_seed(3)
    full = MoEFeedForward(12, 24, num_experts=10, top_k=2, capacity_factor=factor, impl=impl)
    group = [7, 2, 5, 9]
    full.restrict_to(group)
    sub = _sub_moe(full, sorted(group), impl)
    x = torch.randn(2, 20, 12)
    grad_out = torch.randn_like(x)
    out_full, gx_full, grads_full, stats_full = _run(full, x, grad_out)
    out_sub, gx_sub, grads_sub, stats_sub = _run(sub, x, grad_out)
    torch.testing.assert_close(out_full, out_sub, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_full, gx_sub, atol=1e-5, rtol=1e-5)
    idx = sorted(group)
    for name in grads_sub:
        torch.testing.assert_close(grads_full[name][idx], grads_sub[name], atol=1e-5, rtol=1e-4, msg=name)
        others = [e for e in range(10) if e not in group]
        assert not grads_full[name][others].any(), f"{name}: experts outside the group got gradient"
    assert stats_full.token_counts[[e for e in range(10) if e not in group]].sum() == 0
    torch.testing.assert_close(stats_full.token_counts[idx], stats_sub.token_counts)
    assert stats_full.num_dropped == stats_sub.num_dropped
    torch.testing.assert_close(stats_full.lb_loss, stats_sub.lb_loss)


def test_restrict_to_none_and_to_all_route_as_before():
    torch.manual_seed(4)
    layer = MoEFeedForward(8, 16, num_experts=6, top_k=2, capacity_factor=1.0)
    x = torch.randn(30, 8)
    before, _ = layer(x)
    layer.restrict_to(list(range(6)))
    torch.testing.assert_close(layer(x)[0], before)
    layer.restrict_to([0, 1])
    assert not torch.allclose(layer(x)[0], before)
    layer.restrict_to(None)
    torch.testing.assert_close(layer(x)[0], before)


@pytest.mark.parametrize("group", [[3], [], [0, 6], [-1, 2]])
def test_restrict_to_refuses_impossible_groups(group):
    layer = MoEFeedForward(8, 16, num_experts=6, top_k=2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="top_k|subset"):
        layer.restrict_to(group)


def test_eval_never_drops_so_a_sequence_does_not_depend_on_its_batch():
    """Capacity 0.25 drops most assignments in training; in eval each sequence alone equals its batched self."""
    fast, ref = _pair(16, 32, 4, 2, 0.25)
    batch = torch.randn(4, 12, 16)
    _, train_stats = fast(batch)
    assert train_stats.num_dropped > 0.5 * batch.shape[0] * batch.shape[1] * 2  # training still drops, counted
    fast.eval()
    ref.eval()
    with torch.no_grad():
        batched, stats = fast(batch)
        alone = torch.cat([fast(batch[i : i + 1])[0] for i in range(batch.shape[0])])
        reference, ref_stats = ref(batch)
    assert stats.num_dropped == 0 and ref_stats.num_dropped == 0
    torch.testing.assert_close(alone, batched, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-5)


def test_model_eval_logits_of_a_sequence_do_not_depend_on_its_batch():
    cfg = ModelConfig(vocab_size=64, max_seq_len=16, hidden_size=32, num_heads=2, h_layers=1, l_layers=1,
                      h_cycles=2, l_cycles=2, halt_max_steps=2, num_experts=4, num_experts_per_tok=2,
                      moe_capacity_factor=0.1)
    torch.manual_seed(0)
    model = HRMACTv1(cfg)
    reference = HRMACTv1(cfg, moe_impl="reference")
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len + 1), generator=torch.Generator().manual_seed(1))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    train_drops = sum(e["dropped_tokens"] for e in model.train()(ids, labels).routing.events())
    assert train_drops > 0
    model.eval()
    reference.eval()
    with torch.no_grad():
        out = model(ids, labels)
        alone = model(ids[1:2], labels[1:2]).logits
        ref_logits = reference(ids, labels).logits
    assert sum(e["dropped_tokens"] for e in out.routing.events()) == 0
    torch.testing.assert_close(alone, out.logits[1:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_train_mode_drops_never_leak_the_future():
    """Assignments are served in token order, so a later token cannot push an earlier one over capacity."""
    layer = MoEFeedForward(16, 32, num_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(1, 24, 16)
    with torch.no_grad():
        out, stats = layer(x)
        assert stats.num_dropped > 0
        for t in (5, 15):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            torch.testing.assert_close(layer(changed)[0][:, : t + 1], out[:, : t + 1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("tokens", "experts", "k", "factor"),
    [(64, 4, 2, 0.25), (50, 8, 1, 0.5), (7, 16, 2, 1.0)],
)
def test_dropless_fast_path_equals_reference_and_drops_nothing(tokens, experts, k, factor):
    fast, ref = _pair(16, 32, experts, k, factor)
    x = torch.randn(tokens, 16)
    grad_out = torch.randn_like(x)
    capped = _run(fast, x, grad_out)[3]
    fast.dropless = ref.dropless = True
    for layer in (fast, ref):
        layer.zero_grad()
    out_f, gx_f, grads_f, stats_f = _run(fast, x, grad_out)
    # A capacity that no expert can exceed keeps every assignment: what dropless must compute.
    unlimited = MoEFeedForward(16, 32, experts, k, experts / k, impl="reference")
    unlimited.load_state_dict(ref.state_dict())
    for layer in (ref, unlimited):
        out_r, gx_r, grads_r, stats_r = _run(layer, x, grad_out)
        torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx_f, gx_r, atol=1e-5, rtol=1e-5)
        for name in grads_r:
            torch.testing.assert_close(grads_f[name], grads_r[name], atol=1e-5, rtol=1e-4, msg=name)
        assert stats_r.num_dropped == 0
    assert stats_f.num_dropped == 0
    assert capped.num_dropped > 0  # the same layer with capacity does drop
    assert torch.equal(stats_f.token_counts, capped.token_counts)  # routing itself is unchanged


class _SlabSource:
    """A stand-in for the tiered store: every expert in a slot of one slab (a permutation, spare slots
    between), per-expert leaves that alias their slot, as ``MoEFeedForward.use_expert_source`` expects."""

    def __init__(self, layer: MoEFeedForward, num_slots: int) -> None:
        experts = layer.num_experts
        self.slot = torch.randperm(num_slots, generator=torch.Generator().manual_seed(5))[:experts].tolist()
        self.gate_up = torch.zeros(num_slots, *layer.w_gate_up.shape[1:])
        self.down = torch.zeros(num_slots, *layer.w_down.shape[1:])
        with torch.no_grad():
            self.gate_up[self.slot] = layer.w_gate_up
            self.down[self.slot] = layer.w_down
        self.leaves = {e: (self.gate_up[self.slot[e]].detach().requires_grad_(True),
                           self.down[self.slot[e]].detach().requires_grad_(True)) for e in range(experts)}

    def weights(self, layer: int, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {e: self.leaves[e] for e in ids}

    def slots_of(self, layer: int, ids: list[int]) -> list[int]:
        return [self.slot[e] for e in ids]

    def slot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up, self.down


def test_dropless_tiered_experts_equal_the_reference():
    tiered, ref = _pair(16, 32, 6, 2, 0.25)
    tiered.dropless = ref.dropless = True
    source = _SlabSource(tiered, num_slots=9)
    tiered.use_expert_source(source)
    x, grad_out = torch.randn(40, 16), torch.randn(40, 16)
    out_t, gx_t, _, stats_t = _run(tiered, x, grad_out)
    out_r, gx_r, grads_r, stats_r = _run(ref, x, grad_out)
    assert stats_t.num_dropped == stats_r.num_dropped == 0
    torch.testing.assert_close(out_t, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_t, gx_r, atol=1e-5, rtol=1e-5)
    for e, (w_gate_up, w_down) in source.leaves.items():
        torch.testing.assert_close(w_gate_up.grad, grads_r["w_gate_up"][e], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(w_down.grad, grads_r["w_down"][e], atol=1e-5, rtol=1e-4)


def test_dropless_flag_reaches_every_moe_layer():
    cfg = dataclasses.replace(ModelConfig(vocab_size=32, max_seq_len=8, hidden_size=16, num_heads=2),
                              moe_dropless=True, moe_capacity_factor=0.1)
    model = HRMACTv1(cfg).train()
    ids = torch.randint(0, 32, (2, 8))
    events = model(ids, ids).routing.events()
    assert events and all(e["dropped_tokens"] == 0 for e in events)
    assert all(sum(e["token_counts"]) > 0 for e in events)
