"""The MoE agent as an RLlib module: shapes, equal active parameters, routing per game, the balance loss
in PPO's loss, group-only weight syncs, and RLlib PPO learning a synthetic game with it."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.evaluation.postprocessing import Postprocessing

from aios_ray.model.moe import MoEFeedForward
from aios_ray.rl.learner import LB_METRIC, MoEPPOLearner
from aios_ray.rl.module import (
    LB_LOSS_KEY,
    GridCNN,
    MoEAgentModule,
    NatureCNN,
    expert_groups,
    set_active_game_everywhere,
    state_nbytes,
)

ATARI = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
GRID = gym.spaces.Box(0.0, 1.0, (10, 10, 10), np.float32)
ACTIONS = gym.spaces.Discrete(6)
SMALL = {"hidden": 32, "expert_hidden": 16, "num_experts": 8, "num_experts_per_tok": 2}


def build(obs_space: gym.Space = GRID, inference_only: bool = False, seed: int = 0, **model_config) -> MoEAgentModule:
    torch.manual_seed(seed)
    spec = RLModuleSpec(module_class=MoEAgentModule, observation_space=obs_space, action_space=ACTIONS,
                        model_config={**SMALL, **model_config}, inference_only=inference_only)
    return spec.build()


def grid_batch(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {Columns.OBS: (torch.rand(n, 10, 10, 10, generator=g) < 0.3).float()}


@pytest.mark.parametrize(("space", "encoder"), [(ATARI, NatureCNN), (GRID, GridCNN)])
def test_each_observation_shape_gets_its_encoder_and_the_heads_have_batch_shapes(space, encoder):
    module = build(space, moe_layers=2)
    obs = torch.as_tensor(np.stack([space.sample() for _ in range(5)]))
    out = module.forward_train({Columns.OBS: obs})
    assert isinstance(module.encoder, encoder)
    assert out[Columns.ACTION_DIST_INPUTS].shape == (5, ACTIONS.n)
    assert out[LB_LOSS_KEY].shape == ()
    assert module.compute_values({Columns.OBS: obs}).shape == (5,)
    assert [m.layer_index for m in module.moe_layers()] == [0, 1]
    acting = build(space, inference_only=True)
    assert not hasattr(acting, "value_head")  # env runners need no critic
    assert acting.forward_exploration({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS].shape == (5, ACTIONS.n)


def test_an_observation_shape_without_an_encoder_is_refused():
    with pytest.raises(ValueError, match="no encoder"):
        build(gym.spaces.Box(0.0, 1.0, (64, 64, 3), np.float32))


def test_the_dense_baseline_uses_as_many_parameters_per_step_as_the_moe_plus_its_router():
    moe, dense = build(moe_layers=2), build(moe_layers=2, dense=True)
    layers = moe.moe_layers()
    assert len(layers) == 2 and dense.moe_layers() == []
    # Counted by hand: the k experts an observation uses against the dense SwiGLU of width k * expert_hidden.
    k, c, f = SMALL["num_experts_per_tok"], SMALL["hidden"], SMALL["expert_hidden"]
    dense_ffn = sum(p.numel() for block in dense.blocks for p in block.ffn.parameters())
    per_expert = sum(w[0].numel() for w in (layers[0].w_gate_up, layers[0].w_down))
    assert dense_ffn == 2 * 3 * c * (k * f) == 2 * k * per_expert
    router = sum(m.router.weight.numel() for m in layers)
    assert moe.active_parameter_count() == dense.active_parameter_count() + router
    assert sum(p.numel() for p in moe.parameters()) > moe.active_parameter_count()  # the idle experts


def _expert_grads(module: MoEAgentModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert: gradient norm of its FFN weights, and of its router row, in the first MoE layer."""
    moe = module.moe_layers()[0]
    ffn = moe.w_gate_up.grad.flatten(1).norm(dim=1) + moe.w_down.grad.flatten(1).norm(dim=1)
    return ffn, moe.router.weight.grad.norm(dim=1)


def _train_step_grads(module: MoEAgentModule) -> None:
    out = module.forward_train(grid_batch())
    loss = out[Columns.ACTION_DIST_INPUTS].pow(2).sum() + module.compute_values(
        {}, embeddings=out[Columns.EMBEDDINGS]).sum() + out[LB_LOSS_KEY]
    loss.backward()


def test_the_active_game_routes_and_trains_only_its_own_group():
    groups = expert_groups(8, num_games=2, shared_experts=2)
    assert groups == [[0, 1, 2, 3, 4], [0, 1, 5, 6, 7]]
    module = build(groups=groups)
    module.set_active_game(1)
    _train_step_grads(module)
    ffn, router = _expert_grads(module)
    outside = torch.tensor([2, 3, 4])
    assert module.last_moe_stats[0].token_counts[outside].sum() == 0
    assert ffn[outside].abs().sum() == 0 and router[outside].abs().sum() == 0
    assert (ffn[groups[1]] > 0).sum() >= 2  # the group does learn


def test_free_routing_trains_experts_of_every_group():
    module = build(groups=expert_groups(8, num_games=2, shared_experts=2), routing="free")
    module.set_active_game(1)
    assert module.active_experts() is None
    _train_step_grads(module)
    ffn, router = _expert_grads(module)
    assert ffn[[2, 3, 4]].sum() > 0 and (router > 0).all()


def test_an_env_runner_synced_with_the_active_group_only_acts_like_the_learner():
    groups = expert_groups(8, num_games=2)
    learner = build(groups=groups, seed=0)
    actor = build(groups=groups, inference_only=True, seed=1)  # other weights: only the sync can make them equal
    actor.set_state(learner.get_state(inference_only=True))  # the first sync (game 0)
    learner.set_active_game(1)
    group_state = learner.get_state(inference_only=True)
    assert state_nbytes(group_state) < state_nbytes(learner.get_state())  # half the experts stay home
    before = actor.moe_layers()[0].w_gate_up[groups[0]].clone()
    actor.set_state(group_state)
    assert actor.active_game == 1 and actor.active_experts() == groups[1]  # the game travels with the state
    batch = grid_batch()
    torch.testing.assert_close(actor.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS],
                               learner.forward_inference(batch)[Columns.ACTION_DIST_INPUTS])
    assert torch.equal(actor.moe_layers()[0].w_gate_up[groups[0]], before)  # game 0's experts were not sent
    # What a sync of every expert would carry: the same module routing freely ships all of them.
    free = build(groups=groups, routing="free")
    assert learner.full_sync_nbytes(state_nbytes(group_state)) == state_nbytes(free.get_state(inference_only=True))


def test_a_game_without_a_group_is_refused():
    with pytest.raises(ValueError, match="no expert group"):
        build(groups=expert_groups(8, num_games=2)).set_active_game(2)
    with pytest.raises(ValueError, match="distinct experts"):
        build(groups=[[0], [1, 2]])  # top-2 routing in a group of one


def _ppo_config(lb_coef: float = 0.01, **model_config):
    from ray.rllib.algorithms.ppo import PPOConfig

    spec = RLModuleSpec(module_class=MoEAgentModule,
                        model_config={**SMALL, "lb_coef": lb_coef, "num_games": 2, **model_config})
    return PPOConfig().rl_module(rl_module_spec=spec).learners(num_learners=0, learner_class=MoEPPOLearner)


def _ppo_batch(module: MoEAgentModule, n: int = 16) -> dict[str, torch.Tensor]:
    batch = grid_batch(n)
    with torch.no_grad():
        logits = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    dist = torch.distributions.Categorical(logits=logits)
    actions = dist.sample()
    return {**batch, Columns.ACTIONS: actions, Columns.ACTION_LOGP: dist.log_prob(actions),
            Columns.ACTION_DIST_INPUTS: logits, Postprocessing.ADVANTAGES: torch.randn(n),
            Postprocessing.VALUE_TARGETS: torch.randn(n)}


def test_the_balance_loss_is_part_of_the_learners_loss():
    losses, lb = {}, None
    for coef in (0.0, 0.5):
        learner = _ppo_config(lb_coef=coef).build_learner(spaces={DEFAULT_MODULE_ID: (GRID, ACTIONS)})
        module = learner.module[DEFAULT_MODULE_ID]
        module.load_state_dict(build(num_games=2).state_dict())  # both learners: the same weights
        batch = _ppo_batch(module)
        fwd_out = module.forward_train(batch)
        lb = fwd_out[LB_LOSS_KEY].detach()
        losses[coef] = learner.compute_loss_for_module(
            module_id=DEFAULT_MODULE_ID, config=learner.config.get_config_for_module(DEFAULT_MODULE_ID),
            batch=batch, fwd_out=fwd_out).detach()
    assert lb >= 1.0  # Switch loss: 1 for a perfectly even router, more otherwise
    torch.testing.assert_close(losses[0.5] - losses[0.0], 0.5 * lb)


def test_the_dense_baseline_trains_with_plain_ppo_loss():
    learner = _ppo_config(lb_coef=0.5, dense=True).build_learner(spaces={DEFAULT_MODULE_ID: (GRID, ACTIONS)})
    module = learner.module[DEFAULT_MODULE_ID]
    batch = _ppo_batch(module)
    fwd_out = module.forward_train(batch)
    assert LB_LOSS_KEY not in fwd_out
    loss = learner.compute_loss_for_module(module_id=DEFAULT_MODULE_ID,
                                           config=learner.config.get_config_for_module(DEFAULT_MODULE_ID),
                                           batch=batch, fwd_out=fwd_out)
    assert torch.isfinite(loss)


def test_rllib_ppo_with_the_moe_agent_learns_a_synthetic_game_and_switches_games(ray_local):
    from ray.tune.registry import register_env

    from aios_ray.rl.envs import SyntheticGameEnv, env_creator

    register_env("aios_rl_module_test", env_creator)
    # Learner and env runner share this process; one torch thread keeps it from spinning against the other
    # jobs on a 2-core machine (its tensors are small enough that a second thread buys little).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    algo = None
    config = (_ppo_config(hidden=64, expert_hidden=64)
              .environment(env="aios_rl_module_test", env_config={"suite": "synthetic", "game": "synth0"})
              .env_runners(num_env_runners=0, num_envs_per_env_runner=4, rollout_fragment_length=64)
              .training(train_batch_size_per_learner=256, minibatch_size=64, num_epochs=4, lr=3e-3,
                        entropy_coeff=0.0)
              .reporting(metrics_num_episodes_for_smoothing=12)
              .debugging(seed=0))
    try:
        algo = config.build_algo()
        random_return = SyntheticGameEnv(0).episode_len / SyntheticGameEnv.NUM_ACTIONS
        returns, start = [], time.perf_counter()
        for _ in range(20):  # 5,120 env steps
            result = algo.train()
            returns.append(result["env_runners"]["episode_return_mean"])
        steps = result["env_runners"]["num_env_steps_sampled_lifetime"]
        sps = steps / (time.perf_counter() - start)
        print(f"returns {[round(float(r), 1) for r in returns]}; {sps:.0f} env steps/s")
        assert returns[0] < 1.5 * random_return
        assert np.mean(returns[-3:]) > 2 * random_return
        assert 1.0 <= result["learners"][DEFAULT_MODULE_ID][LB_METRIC] <= 4.0  # balanced within a group of 4

        learner_module = algo.learner_group._learner.module[DEFAULT_MODULE_ID]
        sent = set_active_game_everywhere(algo, 1)
        acting = algo.env_runner_group.local_env_runner.module
        assert learner_module.active_experts() == acting.active_experts() == [4, 5, 6, 7]
        assert sent < state_nbytes(learner_module.get_state(inference_only=False))
        for mine, theirs in zip(learner_module.moe_layers(), acting.moe_layers(), strict=True):
            assert isinstance(theirs, MoEFeedForward)
            assert torch.equal(mine.w_gate_up[4:], theirs.w_gate_up[4:])
    finally:
        if algo is not None:
            algo.stop()
        torch.set_num_threads(threads)
