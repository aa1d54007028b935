"""ExpertSparseAdamW: dense groups equal torch's AdamW; experts without tokens do not move."""

from __future__ import annotations

import torch

from aios_ray.train.optim import ExpertSparseAdamW, lr_at


def test_dense_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours = ExpertSparseAdamW([{"params": [a], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(5):
        grad = torch.randn(5, 3)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_experts_without_gradient_are_left_alone_and_keep_their_own_step_count():
    torch.manual_seed(0)
    experts = torch.nn.Parameter(torch.randn(3, 4, 2))
    before = experts.detach().clone()
    opt = ExpertSparseAdamW([{"params": [experts], "weight_decay": 0.1, "per_expert": True}], lr=1e-2,
                            betas=(0.9, 0.95), eps=1e-8)
    grad = torch.zeros(3, 4, 2)
    grad[1] = torch.randn(4, 2)  # only expert 1 received tokens
    experts.grad = grad
    opt.step()
    assert torch.equal(experts[0], before[0]) and torch.equal(experts[2], before[2])
    assert not torch.equal(experts[1], before[1])
    assert opt.state[experts]["step"].tolist() == [0.0, 1.0, 0.0]
    # Expert 1 alone equals a plain AdamW step on that expert.
    single = torch.nn.Parameter(before[1].clone())
    ref = torch.optim.AdamW([single], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    single.grad = grad[1].clone()
    ref.step()
    torch.testing.assert_close(experts[1], single, rtol=1e-6, atol=1e-7)


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_at(0, 100, 10, 0.1) == 0.1
    assert lr_at(9, 100, 10, 0.1) == 1.0
    assert abs(lr_at(100, 100, 10, 0.1) - 0.1) < 1e-9
    assert lr_at(50, 100, 10, 0.1) < lr_at(20, 100, 10, 0.1)
