"""``--experts tiered`` for the RL learner: the agent's experts in the tiered store (in-process here) take the same
PPO updates as local experts (losses, weights and Adam state) and env runners receive the same weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from aios_ray.config import StoreConfig
from aios_ray.rl.envs import SyntheticGameEnv
from aios_ray.rl.learner import MoEPPOLearner
from aios_ray.rl.module import EXPERT_PARAMS, MoEAgentModule
from aios_ray.rl.tiered import IN_PROCESS_KEY, STORE_KEY
from aios_ray.store.backend import LocalExperts, TieredBackend
from aios_ray.store.record import ExpertKey

NUM_EXPERTS, HOT_SLOTS = 8, 2  # two games of 4 experts: a minibatch's experts do not fit the hot tier
AGENT = {"hidden": 32, "expert_hidden": 16, "num_experts": NUM_EXPERTS, "num_experts_per_tok": 2,
         "num_games": 2, "lb_coef": 0.01}
# Expert weights: the tiered forward/backward (slot kernels, streamed copies) sums in another order than the
# local grouped matmul, and Adam's m / sqrt(v) turns gradients at rounding level into steps of up to a few
# thousandths of lr (3e-3): 3e-5 absolute. Measured after 12 minibatch updates: at most 1.5e-5, in one element
# of the encoder's linear layer (every other tensor within 2e-7).
WEIGHT_TOL = {"rtol": 1e-4, "atol": 3e-5}
LOSS_KEYS = ("total_loss", "policy_loss", "vf_loss", "mean_kl_loss", "entropy", "moe_lb_loss")


def build_learner(experts: str, tmp_path, grad_clip: float | None = 0.05, grad_clip_by: str = "global_norm",
                  **agent: int):
    from ray.rllib.algorithms.ppo import PPOConfig

    model_config = {**AGENT, **agent}
    if experts == "tiered":
        store = StoreConfig(experts="tiered", capacity_gpu=HOT_SLOTS, capacity_dram=NUM_EXPERTS,
                            path=str(tmp_path / "expert_store"), name=f"rl-tiered-{tmp_path.name}", device="cpu")
        model_config.update({STORE_KEY: dataclasses.asdict(store), IN_PROCESS_KEY: True})
    spec = RLModuleSpec(module_class=MoEAgentModule, model_config=model_config)
    config = (PPOConfig().training(lr=3e-3, grad_clip=grad_clip, grad_clip_by=grad_clip_by)
              .rl_module(rl_module_spec=spec).learners(num_learners=0, learner_class=MoEPPOLearner))
    env = SyntheticGameEnv(0)
    torch.manual_seed(0)  # both learners start from the same weights
    return config.build_learner(spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})


def rollout_batch(game: int, n: int = 48, seed: int = 0) -> MultiAgentBatch:
    """Observations of a synthetic game with random actions and PPO targets: the same batch for both learners."""
    env, rng = SyntheticGameEnv(game), np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames = []
    for _ in range(n):
        frames.append(obs)
        obs, *_ = env.step(int(rng.integers(env.NUM_ACTIONS)))
    logits = rng.normal(size=(n, env.NUM_ACTIONS)).astype(np.float32)
    actions = rng.integers(env.NUM_ACTIONS, size=n)
    logp = torch.log_softmax(torch.from_numpy(logits), -1)[torch.arange(n), torch.from_numpy(actions)].numpy()
    batch = SampleBatch({Columns.OBS: np.stack(frames), Columns.ACTIONS: actions, Columns.ACTION_LOGP: logp,
                         Columns.ACTION_DIST_INPUTS: logits,
                         Postprocessing.ADVANTAGES: rng.normal(size=n).astype(np.float32),
                         Postprocessing.VALUE_TARGETS: rng.normal(size=n).astype(np.float32)})
    return MultiAgentBatch({DEFAULT_MODULE_ID: batch}, env_steps=n)


def update(learner, game: int) -> dict[str, float]:
    """One PPO update of game ``game``: 2 epochs of 3 minibatches, in order, losses as RLlib reports them."""
    learner.module[DEFAULT_MODULE_ID].set_active_game(game)
    results = learner.update(batch=rollout_batch(game, seed=game), minibatch_size=16, num_epochs=2,
                             shuffle_batch_per_epoch=False)
    return {key: float(results[DEFAULT_MODULE_ID][key].peek()) for key in LOSS_KEYS}


def stored_records(backend: TieredBackend) -> dict[ExpertKey, dict[str, torch.Tensor]]:
    """Every expert's record as the store holds it after a flush: weights, Adam moments, step."""
    backend.store.flush()
    keys = [ExpertKey(0, e) for e in range(NUM_EXPERTS)]
    layout = backend.store.layout
    return {key: layout.views(torch.from_numpy(np.array(flat)))
            for key, (flat, _version) in zip(keys, backend.store.read_all(keys), strict=True)}


@pytest.fixture
def learners(tmp_path):
    local, tiered = build_learner("local", tmp_path), build_learner("tiered", tmp_path)
    yield local, tiered
    local.shutdown()
    tiered.shutdown()


def test_local_and_tiered_experts_take_the_same_ppo_updates(learners):
    local, tiered = learners
    backend = tiered.expert_backends[DEFAULT_MODULE_ID]
    assert isinstance(local.expert_backends[DEFAULT_MODULE_ID], LocalExperts)
    assert isinstance(backend, TieredBackend) and backend.store.slab.num_slots == HOT_SLOTS  # some experts are streamed
    local_module, tiered_module = local.module[DEFAULT_MODULE_ID], tiered.module[DEFAULT_MODULE_ID]
    # The tiered module's experts left its parameters (and RLlib's optimizer); the rest is the same model.
    assert not any(name.endswith(EXPERT_PARAMS) for name, _ in tiered_module.named_parameters())
    assert tiered_module.active_parameter_count() == local_module.active_parameter_count()  # stored ones count
    optimizer = tiered.get_optimizers_for_module(DEFAULT_MODULE_ID)[0][1]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in tiered_module.parameters())

    initial = local_module.moe_layers()[0].w_gate_up.detach().clone()
    # Game 0, then game 1: the second group's experts start their own Adam steps (bias correction from 1).
    for game in (0, 1):
        local_losses, tiered_losses = update(local, game), update(tiered, game)
        for key in LOSS_KEYS:
            assert tiered_losses[key] == pytest.approx(local_losses[key], rel=1e-4, abs=1e-6), (game, key)

    hot = backend.store.stats()[0]
    assert hot["streamed"] > 0 and hot["evictions"] > 0  # experts went past the full hot tier and back down

    tiered_params = dict(tiered_module.named_parameters())
    for name, param in local_module.named_parameters():
        if not name.endswith(EXPERT_PARAMS):
            torch.testing.assert_close(tiered_params[name], param, **WEIGHT_TOL, msg=name)

    moe = local_module.moe_layers()[0]
    local_state = local.get_optimizers_for_module(DEFAULT_MODULE_ID)[0][1].state
    records = stored_records(backend)
    steps = local_state[moe.w_gate_up]["step"]
    # Both groups learned, each expert counting its own steps: some were left out of some minibatches (the
    # sparse case: a dense Adam would have moved them on their momentum), none stepped more than 6 times.
    assert steps[:4].max() >= 1 and steps[4:].max() >= 1 and steps.max() <= 6
    assert len(set(steps.tolist())) > 1
    for key, record in records.items():
        e = key.expert
        assert float(record["step"]) == float(steps[e]), key
        for name in EXPERT_PARAMS:
            param = getattr(moe, name)
            torch.testing.assert_close(record[name], param[e].detach(), **WEIGHT_TOL, msg=f"{key} {name}")
            for moment in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(record[f"{moment}.{name}"], local_state[param][moment][e],
                                           rtol=1e-4, atol=1e-7, msg=f"{key} {moment}.{name}")
    # Exactly the experts that took a step moved (the comparison above is not between two untouched copies).
    moved = (moe.w_gate_up.detach() - initial).flatten(1).abs().amax(dim=1) > 0
    assert moved.tolist() == (steps > 0).tolist()


def test_env_runners_receive_the_same_state_from_a_tiered_learner(learners):
    local, tiered = learners
    for game in (0, 1):
        update(local, game), update(tiered, game)
    local_module, tiered_module = local.module[DEFAULT_MODULE_ID], tiered.module[DEFAULT_MODULE_ID]
    for inference_only in (True, False):  # the active group's experts for a sync, every expert for a full state
        mine, theirs = tiered_module.get_state(inference_only=inference_only), local_module.get_state(
            inference_only=inference_only)
        assert sorted(mine) == sorted(theirs)
        for key, value in theirs.items():
            np.testing.assert_allclose(mine[key], value, **WEIGHT_TOL, err_msg=key)

    # An env runner synced from the tiered learner acts as one synced from the local learner.
    acting = {}
    for source, module in (("local", local_module), ("tiered", tiered_module)):
        spec = RLModuleSpec(module_class=MoEAgentModule, observation_space=module.observation_space,
                            action_space=module.action_space, model_config=AGENT, inference_only=True)
        torch.manual_seed(7)
        runner = spec.build()
        runner.set_state(module.get_state(inference_only=True))
        obs = torch.from_numpy(rollout_batch(1)[DEFAULT_MODULE_ID][Columns.OBS])
        acting[source] = runner.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(acting["tiered"], acting["local"], rtol=1e-4, atol=1e-5)


def test_gradients_clipped_by_value_match_too(tmp_path):
    local = build_learner("local", tmp_path, grad_clip=1e-3, grad_clip_by="value")
    tiered = build_learner("tiered", tmp_path, grad_clip=1e-3, grad_clip_by="value")
    try:
        assert update(tiered, 0) == pytest.approx(update(local, 0), rel=1e-4, abs=1e-6)
        local_moe = local.module[DEFAULT_MODULE_ID].moe_layers()[0]
        records = stored_records(tiered.expert_backends[DEFAULT_MODULE_ID])
        for key, record in records.items():
            torch.testing.assert_close(record["w_down"], local_moe.w_down[key.expert].detach(), **WEIGHT_TOL)
    finally:
        local.shutdown()
        tiered.shutdown()


@pytest.mark.parametrize("game_heads", [False, True])
def test_with_frozen_shared_parameters_only_the_games_own_parameters_and_the_value_head_train(tmp_path, game_heads):
    """``--shared-training first``: after game 0, an update of game 1 leaves the encoder, the policy head (game 0's
    with ``game_heads``), the shared experts, game 0's experts and their router rows exactly as they were, local
    and tiered alike."""
    # top-2 among 1 shared and 3 own experts: the game's own experts get tokens
    local = build_learner("local", tmp_path, shared_experts=1, game_heads=game_heads)
    tiered = build_learner("tiered", tmp_path, shared_experts=1, game_heads=game_heads)
    try:
        _check_frozen_update(local, tiered, game_heads)
    finally:
        local.shutdown()
        tiered.shutdown()


def _check_frozen_update(local, tiered, game_heads: bool) -> None:
    update(local, 0), update(tiered, 0)
    local_module, tiered_module = local.module[DEFAULT_MODULE_ID], tiered.module[DEFAULT_MODULE_ID]
    groups = local_module.agent_config.groups
    shared = sorted(set(groups[0]) & set(groups[1]))
    local_module.set_active_game(1)
    own = local_module.own_experts()
    assert own == sorted(set(groups[1]) - set(shared)) and shared  # the test needs shared experts to hold
    before = {name: p.detach().clone() for name, p in local_module.named_parameters()}
    before_records = stored_records(tiered.expert_backends[DEFAULT_MODULE_ID])
    for module in (local_module, tiered_module):
        module.freeze_shared(True)
    assert update(tiered, 1) == pytest.approx(update(local, 1), rel=1e-4, abs=1e-6)

    after = dict(local_module.named_parameters())
    held = [e for e in range(NUM_EXPERTS) if e not in own]
    frozen = ("encoder.", "pi_head.0.", "value_head.0.") if game_heads else ("encoder.", "pi_head.")
    for name, value in before.items():
        if name.startswith(frozen):
            assert torch.equal(after[name], value), name
    moe_prefix = "blocks.0.ffn."
    for name in ("router.weight", *EXPERT_PARAMS):
        old, new = before[moe_prefix + name], after[moe_prefix + name].detach()
        assert torch.equal(new[held], old[held]), name
        assert not torch.equal(new[own], old[own]), name  # the game's own experts did learn
    learned = ["value_head.1.weight", "pi_head.1.weight"] if game_heads else ["value_head.0.weight"]
    for name in learned:
        assert not torch.equal(after[name].detach(), before[name]), name
    # The store held the same experts: records (weights, moments, step) of the held ones unchanged.
    records = stored_records(tiered.expert_backends[DEFAULT_MODULE_ID])
    for key, record in records.items():
        if key.expert in held:
            for field, value in record.items():
                torch.testing.assert_close(value, before_records[key][field], rtol=0, atol=0, msg=f"{key} {field}")
        for name in EXPERT_PARAMS:
            torch.testing.assert_close(record[name], getattr(local_module.moe_layers()[0], name)[key.expert].detach(),
                                       **WEIGHT_TOL, msg=f"{key} {name}")
    # The frozen flag travels with the module's state (checkpoints, resumes).
    assert local_module.get_state()["_moe_shared_frozen"] is True
