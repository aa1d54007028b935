"""HRM ACTv1: causality, next-token labels, ACT halting, one-step gradient, eval segments."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from aios_ray.config import ModelConfig
from aios_ray.data.dataset import block_batch
from aios_ray.model.hrm import HRMACTv1
from tests.helpers import PER_SEQUENCE_LOSS

TINY = ModelConfig(vocab_size=64, max_seq_len=16, hidden_size=32, num_heads=2, h_layers=1, l_layers=1,
                   h_cycles=2, l_cycles=2, halt_max_steps=3, num_experts=4, num_experts_per_tok=2)


def _model(**changes) -> HRMACTv1:
    torch.manual_seed(0)
    return HRMACTv1(dataclasses.replace(TINY, **changes))


def _batch(B: int = 4, T: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY.vocab_size, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("use_moe", [True, False])
def test_perturbing_a_later_token_leaves_earlier_logits_unchanged(use_moe):
    model = _model(use_moe=use_moe, moe_capacity_factor=8.0).eval()
    ids, labels = _batch()
    t = 7
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(ids, labels).logits, model(changed, labels).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-4  # and the change is seen from t+1 on


def test_capacity_drops_never_leak_the_future():
    """Assignments are served in token order, so a later token cannot push an earlier one over capacity. Drops
    happen in training only, so the model trains here: one ACT segment and no exploration, so that halting (read
    from the last position) cannot change how many segments run."""
    model = _model(moe_capacity_factor=0.5, halt_max_steps=1, halt_exploration_prob=0.0).train()
    ids, labels = _batch(B=1)
    for t in (3, 9):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, TINY.vocab_size, changed[:, t + 1:].shape)
        with torch.no_grad():
            a, b = model(ids, labels), model(changed, labels)
        assert sum(usage.dropped_tokens for usage in a.routing.usage.values()) > 0  # drops do happen
        torch.testing.assert_close(a.logits[:, : t + 1], b.logits[:, : t + 1], rtol=0, atol=1e-6)


def test_labels_are_the_next_tokens():
    tokens = np.arange(100, dtype=np.int32)
    ids, labels = block_batch(tokens, np.array([0, 3]), seq_len=10)
    assert torch.equal(labels[:, :-1], ids[:, 1:])
    assert ids[1, 0].item() == 30 and labels[1, -1].item() == 40


def _train_steps(model: HRMACTv1, shift: bool, steps: int) -> float:
    """Fresh random sequences every step, so nothing can be memorised."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = math.inf
    for step in range(steps):
        ids, labels = _batch(B=8, seed=step)
        out = model(ids, labels if shift else ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = out.lm_loss.item()
    return loss


def test_copying_cannot_reach_low_loss_on_next_token_targets():
    """On random tokens the next token is unpredictable: loss stays near ln(V). The same model with
    unshifted labels (the copying bug) drives its loss towards zero: the test can tell them apart."""
    shifted = _train_steps(_model(halt_max_steps=1).train(), shift=True, steps=60)
    copied = _train_steps(_model(halt_max_steps=1).train(), shift=False, steps=60)
    assert shifted > 0.9 * math.log(TINY.vocab_size)
    assert copied < 0.5


def test_eval_runs_every_segment_even_when_the_q_head_says_halt():
    model = _model(halt_exploration_prob=0.0)
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([10.0, -10.0]))  # strongly "halt"
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    ids, labels = _batch()
    model.train()
    out = model(ids, labels)
    assert out.halt_steps.tolist() == [1.0] * 4
    calls.clear()
    model.eval()
    with torch.no_grad():
        out = model(ids, labels)
    assert len(calls) == TINY.halt_max_steps
    assert out.halt_steps.tolist() == [float(TINY.halt_max_steps)] * 4


def test_training_runs_all_segments_while_the_q_head_says_continue():
    model = _model(halt_exploration_prob=0.0).train()  # Q-head init: halt == continue -> never halt early
    out = model(*_batch())
    assert out.halt_steps.tolist() == [float(TINY.halt_max_steps)] * 4


def test_a_batch_trains_like_any_split_of_it_when_sequences_halt_after_different_segments():
    """The training loss of a batch is the size-weighted mean of the losses of its parts, so micro-batches after
    an out-of-memory retreat, gradient accumulation and DDP shards all follow the whole batch's gradient.
    Settings that couple the sequences of a batch on purpose are off (see ``PER_SEQUENCE_LOSS``)."""
    model = _model(**{**PER_SEQUENCE_LOSS, "moe_capacity_factor": TINY.num_experts / TINY.num_experts_per_tok})
    model.train()
    with torch.no_grad():  # a Q-head with opinions: sequences halt after 1, 2 or 3 segments
        model.q_head.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(2))
        model.q_head.bias.zero_()
    ids, labels = _batch(B=6)
    whole = model(ids, labels)
    assert len(set(whole.halt_steps.tolist())) > 1  # else the test could not tell the normalisations apart
    whole.loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    split_loss = 0.0
    for part in (slice(0, 2), slice(2, 6)):  # unequal parts: the weights must be the part sizes
        out = model(ids[part], labels[part])
        weight = len(ids[part]) / len(ids)
        (out.loss * weight).backward()
        split_loss += float(out.loss.detach()) * weight
    assert split_loss == pytest.approx(float(whole.loss.detach()), rel=1e-6)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def _grad_flags(model: HRMACTv1) -> list[bool]:
    flags: list[bool] = []
    model.L_level.register_forward_hook(lambda _m, _i, out: flags.append(out.requires_grad))
    return flags


def test_one_step_gradient_only_differentiates_the_last_cycle():
    model = _model(halt_max_steps=1).train()
    flags = _grad_flags(model)
    model(*_batch())
    per_segment = TINY.h_cycles * TINY.l_cycles
    assert flags == [False] * (per_segment - 1) + [True]


def test_full_bptt_differentiates_every_cycle():
    model = _model(halt_max_steps=1, one_step_grad=False).train()
    flags = _grad_flags(model)
    model(*_batch())
    assert flags == [True] * (TINY.h_cycles * TINY.l_cycles)


def test_one_step_gradient_equals_gradient_with_earlier_cycles_detached():
    """The one-step gradient equals full BPTT on a graph cut before the last L and H update.
    (Balance loss off: it reaches the router of every call, cut or not.)"""
    ids, labels = _batch()
    one_step = _model(halt_max_steps=1, moe_lb_coef=0.0).train()
    one_step(ids, labels).loss.backward()
    full = _model(halt_max_steps=1, one_step_grad=False, moe_lb_coef=0.0).train()
    full.load_state_dict(one_step.state_dict())
    original = full.L_level.forward
    calls = {"n": 0}

    def cut_early_cycles(hidden, injection, rope, log):
        calls["n"] += 1
        out = original(hidden, injection, rope, log)
        return out if calls["n"] == TINY.h_cycles * TINY.l_cycles else out.detach()

    full.L_level.forward = cut_early_cycles
    original_h = full.H_level.forward
    h_calls = {"n": 0}

    def cut_early_h(hidden, injection, rope, log):
        h_calls["n"] += 1
        out = original_h(hidden, injection, rope, log)
        return out if h_calls["n"] == TINY.h_cycles else out.detach()

    full.H_level.forward = cut_early_h
    full(ids, labels).loss.backward()
    for (name, p1), (_, p2) in zip(one_step.named_parameters(), full.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_balance_loss_is_summed_over_every_moe_call():
    model = _model(halt_max_steps=1).train()
    per_call = []
    for module in model.modules():
        if module.__class__.__name__ == "MoEFeedForward":
            module.register_forward_hook(lambda _m, _i, out: per_call.append(out[1].lb_loss.item()))
    out = model(*_batch())
    calls_per_segment = TINY.h_cycles * TINY.l_cycles * TINY.l_layers + TINY.h_cycles * TINY.h_layers
    assert len(per_call) == calls_per_segment == out.routing.num_calls
    assert out.lb_loss.item() == pytest.approx(sum(per_call), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, labels = _batch()
    torch.manual_seed(5)
    plain = _model(halt_exploration_prob=0.0).train()
    plain(ids, labels).loss.backward()
    ckpt = _model(halt_exploration_prob=0.0, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt(ids, labels).loss.backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_stays_close_to_fp32_for_one_step():
    """--amp (bf16 autocast, as the trainer's ``_autocast``) against fp32 on the same weights and batch, on CPU.

    Tolerances, and why: bf16 keeps 8 bits of mantissa (relative rounding 2**-8 = 0.4% per value), but the loss is
    a mean over 8 x 16 tokens computed in fp32 from the bf16 logits, so the roundings mostly cancel: measured under
    5e-4 relative over six random batches, asserted 2e-3. The whole gradient (every parameter, one vector) measured
    under 2% relative error, asserted 5%. MoE tensors get no bound of their own: a token whose top-2 experts nearly
    tie switches expert under bf16, a discrete change in which expert and router row get its gradient (measured up
    to 34% on a router), not rounding; it also reaches the layers below through the backward, so tensors outside
    the MoE layers measured up to 10% (attention qkv), asserted 15%. The halting reward is made constant
    (halt_epsilon 10: halting is always right) for the same reason: its target is a threshold on a loss difference,
    and bf16 noise near the threshold flips a target, a jump of the Q loss."""
    model = _model(halt_exploration_prob=0.0, halt_epsilon=10.0).train()
    ids, labels = _batch(B=8)
    fp32 = model(ids, labels)
    fp32.loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(ids, labels)
    bf16.loss.backward()
    assert bf16.logits.dtype == torch.bfloat16  # autocast was on: the numbers below are not fp32 twice
    assert float(bf16.loss.detach()) == pytest.approx(float(fp32.loss.detach()), rel=2e-3)
    assert float(bf16.lm_loss) == pytest.approx(float(fp32.lm_loss), rel=2e-3)
    grads = dict(model.named_parameters())
    assert all(torch.isfinite(p.grad).all() for p in grads.values())
    error = torch.cat([(grads[n].grad - g).flatten() for n, g in expected.items()]).norm()
    assert error / torch.cat([g.flatten() for g in expected.values()]).norm() < 0.05
    for name, grad in expected.items():
        if ".ffn." not in name and grad.norm() > 0:
            assert (grads[name].grad - grad).norm() / grad.norm() < 0.15, name


def _late_mean_halt_steps(epsilon: float, steps: int = 40) -> float:
    model = _model(halt_epsilon=epsilon, halt_exploration_prob=0.0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    halts = []
    for step in range(steps):
        out = model(*_batch(seed=step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        halts.append(out.halt_steps.mean().item())
    return sum(halts[-10:]) / 10


def test_mean_halt_steps_responds_to_the_halting_reward():
    """halt_epsilon large: halting is always 'right' -> the Q-head learns to stop after one segment.
    Negative: halting is never right -> sequences keep running segments."""
    always_halt = _late_mean_halt_steps(10.0)
    never_halt = _late_mean_halt_steps(-10.0)
    assert always_halt < 1.5
    assert never_halt > always_halt + 0.5


def test_restricted_experts_route_and_learn_only_within_each_layers_group():
    model = _model(num_experts=8, h_layers=1, l_layers=1).train()
    groups = [[0, 1, 2], [5, 6]]  # one group per MoE layer, in moe_layers() order
    model.restrict_experts(groups)
    out = model(*_batch())
    out.loss.backward()
    for moe, group in zip(model.moe_layers(), groups, strict=True):
        others = [e for e in range(8) if e not in group]
        assert not moe.w_gate_up.grad[others].any() and not moe.w_down.grad[others].any()
        assert moe.w_gate_up.grad[group].abs().sum() > 0
    counts = {layer: usage.token_counts for layer, usage in out.routing.usage.items()}
    assert sorted(counts) == ["H.0", "L.0"]
    assert set(counts["H.0"].nonzero().flatten().tolist()) <= {0, 1, 2}
    assert set(counts["L.0"].nonzero().flatten().tolist()) <= {5, 6}
    with pytest.raises(ValueError, match="3 expert groups for 2 MoE layers"):
        model.restrict_experts([[0, 1], [2, 3], [4, 5]])
