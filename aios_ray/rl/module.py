"""The multi-game agent as an RLlib (new API stack) ``TorchRLModule`` for PPO.

Observation -> encoder (Nature CNN for 84x84x4 uint8 Atari frames, a small conv net for 10x10xC
MinAtar-sized grids) -> feature vector -> ``moe_layers`` residual blocks ``x + FFN(rms_norm(x))`` ->
policy logits and a value. FFN is the project's ``MoEFeedForward`` (one token per observation) or,
with ``dense``, a SwiGLU whose width is ``num_experts_per_tok * expert_hidden``: the same expert
parameters per step as the MoE, which only adds its router.

Routing per game: ``model_config["groups"][g]`` lists the experts game g may use (its own group plus
the shared experts). Observations do not say which game they come from, so the module is told:
``set_active_game(g)`` restricts every MoE layer to game g's group (``routing="free"`` records the
game and restricts nothing, the ablation). The active game is part of the module state, so a
weight sync or a checkpoint carries it; ``set_active_game_everywhere(algo, g)`` switches the learners
and pushes the new group's experts to every env runner at once.

Env runners build the module with ``inference_only=True`` (no value head) and receive
``get_state(inference_only=True)``, which holds only the active group's expert weights: a switch
to another game must therefore go through ``set_active_game_everywhere``, never through the env
runners alone, or they would act with experts the learner never sent.

With ``--experts tiered`` the learner hands the module's experts to the tiered store
(``use_expert_source``, see ``aios_ray.rl.tiered``): they stop being module parameters, and
``get_state`` reads the ones it ships from the store (under ``expert_reads``, the store's leases).

The MoE balance loss (summed over layers) leaves ``_forward_train`` under ``LB_LOSS_KEY``;
``aios_ray.rl.learner.MoEPPOLearner`` adds ``lb_coef`` times it to the PPO loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from aios_ray.model.layers import SwiGLU, rms_norm, trunc_normal_
from aios_ray.model.moe import MoEFeedForward, MoEStats

LB_LOSS_KEY = "moe_lb_loss"  # forward_train output: the balance loss summed over the MoE layers
ACTIVE_GAME_KEY = "_moe_active_game"  # module state: the game whose expert group is active (-1: none)
SHARED_FROZEN_KEY = "_moe_shared_frozen"  # module state: only the active game's own parameters train
GROUP_EXPERTS_KEY = "_moe_group_experts"  # inference-only state: ids of the experts it carries
GROUP_SUFFIX = ":group"  # inference-only state: an expert tensor holding only the active group's rows
EXPERT_PARAMS = ("w_gate_up", "w_down")


@dataclass(frozen=True)
class AgentConfig:
    """What the module reads from ``model_config`` (other keys, e.g. RLlib's defaults, are ignored)."""

    hidden: int = 128  # feature width: the encoder's output and the residual stream
    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_hidden: int = 128
    moe_layers: int = 1  # residual FFN blocks (MoE, or SwiGLU with ``dense``)
    dense: bool = False
    # Dropless by default: capacity drops depend on the batch, and env runners act on a few envs while the
    # learner scores minibatches, so with drops PPO's probability ratio would compare two different policies.
    dropless: bool = True
    capacity_factor: float = 1.25
    lb_coef: float = 0.01
    routing: str = "groups"  # "groups": restrict to the active game's group; "free": the ablation
    # One policy head and one value head per game, the active game's in use (as its expert group is): a
    # game's logits and values then keep their own scale, and no later game moves its head.
    game_heads: bool = False
    groups: tuple[tuple[int, ...], ...] | None = None  # per game: the expert ids it may use
    active_game: int = 0
    moe_impl: str = "fast"

    @staticmethod
    def from_model_config(model_config: dict[str, Any] | None) -> AgentConfig:
        mc = dict(model_config or {})
        known = {f: mc[f] for f in AgentConfig.__dataclass_fields__ if f in mc and f != "groups"}
        num_experts = int(mc.get("num_experts", AgentConfig.num_experts))
        groups = mc.get("groups")
        if groups is None and mc.get("num_games"):
            groups = expert_groups(num_experts, int(mc["num_games"]), int(mc.get("shared_experts", 0)))
        cfg = AgentConfig(**known, groups=None if groups is None else tuple(tuple(int(e) for e in g) for g in groups))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.routing not in ("groups", "free"):
            raise ValueError(f"routing must be 'groups' or 'free', not {self.routing!r}")
        if min(self.hidden, self.num_experts, self.num_experts_per_tok, self.expert_hidden, self.moe_layers) <= 0:
            raise ValueError("hidden, num_experts, num_experts_per_tok, expert_hidden and moe_layers must be > 0")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} > num_experts {self.num_experts}")
        for game, group in enumerate(self.groups or ()):
            if len(set(group)) < self.num_experts_per_tok or not all(0 <= e < self.num_experts for e in group):
                raise ValueError(f"group of game {game} {list(group)}: needs >= {self.num_experts_per_tok} "
                                 f"distinct experts in 0..{self.num_experts - 1}")

    @property
    def restricts(self) -> bool:
        return self.routing == "groups" and self.groups is not None and not self.dense


def expert_groups(num_experts: int, num_games: int, shared_experts: int = 0) -> list[list[int]]:
    """Experts 0..shared-1 are shared by every game; the rest split evenly, game g owning the g-th slice."""
    per_game = (num_experts - shared_experts) // num_games if num_games > 0 else 0
    if shared_experts < 0 or per_game <= 0:
        raise ValueError(f"{num_experts} experts cannot give {num_games} games a group each "
                         f"beside {shared_experts} shared ones")
    shared = list(range(shared_experts))
    return [shared + list(range(shared_experts + g * per_game, shared_experts + (g + 1) * per_game))
            for g in range(num_games)]


class NatureCNN(nn.Module):
    """Mnih et al. (2015) encoder: (B, 84, 84, 4) uint8 frames -> (B, out) features."""

    def __init__(self, in_channels: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, out), nn.ReLU(),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.permute(0, 3, 1, 2).float() / 255.0)


class GridCNN(nn.Module):
    """MinAtar-style encoder (Young & Tian 2019): one 3x3 conv over an (H, W, C) grid of 0/1 floats."""

    def __init__(self, shape: tuple[int, int, int], out: int, filters: int = 16) -> None:
        super().__init__()
        height, width, channels = shape
        self.net = nn.Sequential(
            nn.Conv2d(channels, filters, 3, stride=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(filters * (height - 2) * (width - 2), out), nn.ReLU(),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.permute(0, 3, 1, 2).float())


def make_encoder(space: gym.Space, out: int) -> nn.Module:
    """Nature CNN for 84x84 frames (uint8, scaled by 1/255), the grid CNN for small (H, W, C) grids."""
    shape = tuple(space.shape or ())
    if len(shape) != 3:
        raise ValueError(f"observations must be (H, W, C) images, not shape {shape}")
    if shape[:2] == (84, 84):
        return NatureCNN(shape[2], out)
    if min(shape[:2]) < 3 or max(shape[:2]) > 32:
        raise ValueError(f"no encoder for observations of shape {shape}: 84x84xC frames or grids up to 32x32")
    return GridCNN(shape, out)  # type: ignore[arg-type]


class FFNBlock(nn.Module):
    """x + FFN(rms_norm(x)); the FFN is an MoE layer or its dense baseline."""

    def __init__(self, cfg: AgentConfig) -> None:
        super().__init__()
        self.ffn: nn.Module
        if cfg.dense:
            self.ffn = SwiGLU(cfg.hidden, cfg.num_experts_per_tok * cfg.expert_hidden)
            for linear in (self.ffn.gate_up, self.ffn.down):
                trunc_normal_(linear.weight, std=linear.in_features**-0.5)
        else:
            self.ffn = MoEFeedForward(cfg.hidden, cfg.expert_hidden, cfg.num_experts, cfg.num_experts_per_tok,
                                      cfg.capacity_factor, impl=cfg.moe_impl, dropless=cfg.dropless)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        if isinstance(self.ffn, MoEFeedForward):
            out, stats = self.ffn(rms_norm(x))
            return x + out, stats
        return x + self.ffn(rms_norm(x)), None


class MoEAgentModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    """PPO agent: encoder -> residual MoE (or dense) blocks -> policy logits and value."""

    def setup(self) -> None:
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(f"the agent needs a Discrete action space, not {self.action_space}")
        self.agent_config = cfg = AgentConfig.from_model_config(self.model_config)  # type: ignore[arg-type]
        self.encoder = make_encoder(self.observation_space, cfg.hidden)
        self.blocks = nn.ModuleList(FFNBlock(cfg) for _ in range(cfg.moe_layers))
        num_heads = len(cfg.groups) if cfg.game_heads and cfg.groups is not None else 1
        if cfg.game_heads and cfg.groups is None:
            raise ValueError("game_heads needs the games (model_config 'groups' or 'num_games')")
        self.pi_head = nn.ModuleList(_head(cfg.hidden, int(self.action_space.n), 0.01) for _ in range(num_heads))
        self.value_head = nn.ModuleList(_head(cfg.hidden, 1, 1.0) for _ in range(num_heads))
        for index, moe in enumerate(self.moe_layers()):
            moe.layer_index = index
        self.active_game = -1
        self.shared_frozen = False  # see freeze_shared
        self.last_moe_stats: list[MoEStats] = []  # the latest forward's per-layer routing stats (for metrics)
        # Around reads of experts that live in a store (set with the store: its backend's ``evaluating``).
        self.expert_reads: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        if cfg.groups is not None:
            self.set_active_game(cfg.active_game)

    def _head_index(self) -> int:
        return max(self.active_game, 0) if self.agent_config.game_heads else 0

    def policy_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.pi_head[self._head_index()](features)

    # --- routing -------------------------------------------------------------------------------------------

    def moe_layers(self) -> list[MoEFeedForward]:
        """The MoE layers in order (their ``layer_index`` is 0..L-1: the store's address of their experts)."""
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def use_expert_source(self, source: Any) -> None:
        """Every MoE layer's experts come from ``source`` (a tiered store's client) from now on."""
        for moe in self.moe_layers():
            moe.use_expert_source(source)

    def experts_in_store(self) -> bool:
        return any(moe.expert_source is not None for moe in self.moe_layers())

    def set_active_game(self, game: int) -> None:
        """Route every MoE layer among game ``game``'s expert group (with ``routing="free"``: among all)."""
        cfg = self.agent_config
        if cfg.groups is not None and not 0 <= game < len(cfg.groups):
            raise ValueError(f"game {game} has no expert group: {len(cfg.groups)} groups configured")
        self.active_game = game
        group = list(cfg.groups[game]) if cfg.restricts else None  # type: ignore[index]
        for moe in self.moe_layers():
            moe.restrict_to(group)

    def active_experts(self) -> list[int] | None:
        """The expert ids the router may pick now; None when it may pick any."""
        if not self.agent_config.restricts or self.active_game < 0:
            return None
        return sorted(set(self.agent_config.groups[self.active_game]))  # type: ignore[index]

    def own_experts(self) -> list[int]:
        """The active game's own experts: its group less the experts another game may use too."""
        groups = self.agent_config.groups
        if not self.agent_config.restricts or self.active_game < 0:
            raise ValueError("only a module routing per game group has experts of its own")
        others = {e for g, group in enumerate(groups) if g != self.active_game for e in group}  # type: ignore[arg-type]
        return sorted(set(groups[self.active_game]) - others)  # type: ignore[index]

    def freeze_shared(self, frozen: bool) -> None:
        """Frozen: from now on an update trains only what belongs to the active game (its own experts, their
        router rows, its heads with ``game_heads``) and the value head; the encoder, a shared policy head, the
        shared experts and the other games' router rows keep their weights. Why: the routing groups keep an old
        game's experts unchanged, but its policy is encoder -> its experts -> policy head, and a later game that
        moved the encoder or the head would change it all the same. A shared value head stays free: it does not
        act."""
        if frozen and not self.agent_config.restricts:
            raise ValueError("freezing the shared parameters needs routing per game group")
        self.shared_frozen = frozen

    def held_experts(self) -> list[int]:
        """Experts an update must leave as they are: with frozen shared parameters, all but the active game's own."""
        if not self.shared_frozen:
            return []
        own = set(self.own_experts())
        return [e for e in range(self.agent_config.num_experts) if e not in own]

    def drop_shared_gradients(self) -> list[nn.Parameter]:
        """After a backward pass with frozen shared parameters (else nothing): zero the held experts' rows of the
        routers and of local stacked expert tensors (the per-expert optimizer leaves an all-zero row, weights and
        moments, as it is), and drop the encoder's and policy head's gradients (their ``grad`` is None). Returns
        the parameters whose gradients were dropped. Experts in a store are the expert backend's to hold."""
        held = self.held_experts()
        if not held:
            return []
        for moe in self.moe_layers():
            for param in moe.parameters():  # the router (E, C) and, when local, the experts (E, ...): row = expert
                if param.grad is not None:
                    param.grad[held] = 0
        dropped = [*self.encoder.parameters(), *([] if self.agent_config.game_heads else self.pi_head.parameters())]
        for param in dropped:
            param.grad = None
        return dropped

    def full_sync_nbytes(self, group_sync_nbytes: int) -> int:
        """Bytes an env runner would receive if a sync carried every expert, from what a group-only sync carries:
        the experts left out, in the module's float32 (3 * hidden * expert_hidden values each, per MoE layer),
        less the list of expert ids (int64) a group-only sync carries."""
        experts = self.active_experts()
        if experts is None:
            return group_sync_nbytes
        left_out = (self.agent_config.num_experts - len(experts)) * len(self.moe_layers())
        per_expert = 3 * self.agent_config.hidden * self.agent_config.expert_hidden * 4
        return group_sync_nbytes + left_out * per_expert - len(experts) * 8

    def active_parameter_count(self) -> int:
        """Parameters one observation's forward pass uses: all but the experts the router did not pick."""
        total = sum(p.numel() for p in self.parameters())
        for heads in (self.pi_head, self.value_head):  # one game's heads act at a time
            total -= sum(p.numel() for head in heads[1:] for p in head.parameters())
        per_expert = 3 * self.agent_config.hidden * self.agent_config.expert_hidden  # (C, 2F) and (F, C)
        for moe in self.moe_layers():
            if moe.expert_source is not None:  # experts in a store are no module parameters, yet they count
                total += moe.num_experts * per_expert
            total -= (moe.num_experts - moe.top_k) * per_expert
        return total

    # --- forward passes ------------------------------------------------------------------------------------

    def _trunk(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features after the blocks, balance loss summed over the MoE layers)."""
        x = self.encoder(batch[Columns.OBS])
        lb_loss = x.new_zeros(())
        stats = []
        for block in self.blocks:
            x, block_stats = block(x)
            if block_stats is not None:
                lb_loss = lb_loss + block_stats.lb_loss
                stats.append(block_stats)
        self.last_moe_stats = stats
        return rms_norm(x), lb_loss

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        features, _ = self._trunk(batch)
        return {Columns.ACTION_DIST_INPUTS: self.policy_logits(features)}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # The embeddings let PPO's value loss reuse this pass instead of running the MoE again.
        features, lb_loss = self._trunk(batch)
        out = {Columns.ACTION_DIST_INPUTS: self.policy_logits(features), Columns.EMBEDDINGS: features}
        if self.last_moe_stats:  # the dense baseline has no balance loss to add
            out[LB_LOSS_KEY] = lb_loss
        return out

    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None) -> torch.Tensor:
        if embeddings is None:
            embeddings, _ = self._trunk(batch)
        return self.value_head[self._head_index()](embeddings).squeeze(-1)

    def get_non_inference_attributes(self) -> list[str]:
        return ["value_head"]

    # --- state: the active game travels with it; env runners get only the active group's experts ----------

    def get_state(self, components: Any = None, *, not_components: Any = None, inference_only: bool = False,
                  **kwargs: Any) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, inference_only=inference_only,
                                  **kwargs)
        state[ACTIVE_GAME_KEY] = self.active_game
        state[SHARED_FROZEN_KEY] = self.shared_frozen
        experts = self.active_experts()
        if inference_only and experts is not None:
            ids = np.asarray(experts, dtype=np.int64)
            rows = (self._stored_experts(experts) if self.experts_in_store()
                    else {key: state.pop(key)[ids] for key in _expert_keys(state)})
            for key, value in rows.items():
                state[key + GROUP_SUFFIX] = np.ascontiguousarray(value)
            state[GROUP_EXPERTS_KEY] = ids
        elif self.experts_in_store():  # a complete state: every expert, as a local module's state has them
            state.update(self._stored_experts(range(self.agent_config.num_experts)))
        return state

    def _check_stored_experts(self, experts: dict[str, Any]) -> None:
        """A state restored into a module whose experts live in a store (a resumed run): the store went back to the
        checkpoint's snapshot, so it must hold exactly the experts the checkpoint's state has."""
        if not experts:
            return
        stored = self._stored_experts(range(self.agent_config.num_experts))
        for key, value in experts.items():
            if key not in stored or not np.array_equal(stored[key], np.asarray(value)):
                raise ValueError(f"expert store does not hold the checkpoint's {key}: the store's snapshot and the "
                                 "checkpoint disagree")

    def _stored_experts(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        """State-dict name -> the experts ``ids`` of that MoE layer, stacked, read from the store (copies)."""
        ids = list(ids)
        out = {}
        with self.expert_reads():
            for prefix, moe in self.named_modules():
                if not isinstance(moe, MoEFeedForward):
                    continue
                leaves = moe.expert_source.weights(moe.layer_index, ids)
                for index, param in enumerate(EXPERT_PARAMS):
                    out[f"{prefix}.{param}"] = np.stack([leaves[e][index].detach().cpu().numpy() for e in ids])
        return out

    def set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        game = state.pop(ACTIVE_GAME_KEY, None)
        frozen = state.pop(SHARED_FROZEN_KEY, None)
        ids = state.pop(GROUP_EXPERTS_KEY, None)
        if ids is not None:  # a group-only sync: the other experts keep their local rows
            own = self.state_dict()
            for key in [k for k in state if k.endswith(GROUP_SUFFIX)]:
                name = key[: -len(GROUP_SUFFIX)]
                full = own[name].detach().clone()
                full[torch.as_tensor(ids)] = torch.as_tensor(state.pop(key), dtype=full.dtype)
                state[name] = full
        if self.experts_in_store():
            self._check_stored_experts({key: state.pop(key) for key in _expert_keys(state)})
        super().set_state(state)
        if game is not None and int(game) >= 0:
            self.set_active_game(int(game))
        if frozen is not None:
            self.shared_frozen = bool(frozen)


def _head(features: int, out: int, gain: float) -> nn.Linear:
    """A linear head: near-uniform initial policy (gain 0.01), unit-scale values (1.0), CleanRL's PPO init."""
    head = nn.Linear(features, out)
    nn.init.orthogonal_(head.weight, gain=gain)
    nn.init.zeros_(head.bias)
    return head


def _expert_keys(state: dict[str, Any]) -> list[str]:
    return [k for k in state if k.rpartition(".")[2] in EXPERT_PARAMS]


def state_nbytes(state: dict[str, Any]) -> int:
    """Bytes of the arrays in a module state (what a weight sync ships, before pickling)."""
    return sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))


def set_active_game_everywhere(algo: Any, game: int) -> int:
    """Switch the learners' modules to ``game`` and hand every env runner (training and evaluation) the
    learner's inference-only state for it: the new group's experts and the active game. Returns the bytes
    of that state. Why not an ordinary ``sync_weights``: env runners skip a sync whose weights sequence
    number they already have, and a switch between two updates does not bump it."""

    def switch(learner: Any) -> dict[str, Any]:
        module = _single_module(learner.module)
        module.set_active_game(game)
        return module.get_state(inference_only=True)

    # Every learner switches (they keep identical weights); the first one's state goes out.
    state = next(iter(algo.learner_group.foreach_learner(switch))).get()

    def receive(env_runner: Any) -> None:
        _single_module(env_runner.module).set_state(state)

    for group in (algo.env_runner_group, getattr(algo, "eval_env_runner_group", None)):
        if group is not None:
            group.foreach_env_runner(receive)
    return state_nbytes(state)


def freeze_shared_everywhere(algo: Any, frozen: bool) -> None:
    """``MoEAgentModule.freeze_shared`` on every learner (env runners do not train: nothing to tell them)."""
    algo.learner_group.foreach_learner(lambda learner: _single_module(learner.module).freeze_shared(frozen))


def _single_module(module: Any) -> MoEAgentModule:
    """The agent inside a learner's or env runner's (multi-)RLModule (unwrapping DDP)."""
    if isinstance(module, MultiRLModule):
        module = module[DEFAULT_MODULE_ID]
    module = module.unwrapped()
    if not isinstance(module, MoEAgentModule):
        raise TypeError(f"expected a MoEAgentModule, got {type(module).__name__}")
    return module
