"""The RL learner's experts in the tiered expert store, through the same ``ExpertBackend`` the text loop uses.

``model_config["store"]`` (a resolved ``StoreConfig``, or its dict) with ``experts="tiered"`` moves the
agent's experts into the store when the learner builds its module: they stop being module parameters
(RLlib's optimizer never sees them), the MoE layers lease them per minibatch update, and the backend runs
Adam on them in their slots. Without it (or with ``experts="local"``) the backend is ``LocalExperts``, whose
calls do nothing: the learner calls the backend unconditionally either way.

``model_config["store_in_process"]``: True runs the tiers in the learner's process (``LocalStore``: tests,
runs without Ray); False uses the store's Ray actors (``actors.tier_actors.create_store``), as text
training does. Default: the actors when Ray is initialised.

Checkpoints: ``aios_ray.rl.checkpoint.save_checkpoint`` flushes and snapshots the store under the
checkpoint's name before RLlib saves the algorithm; a resumed run sets ``model_config[RESUME_KEY]`` to that
name, and the store goes back to the snapshot (weights, Adam moments and step counts of every expert) when
the learner builds its module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn

from aios_ray.config import StoreConfig
from aios_ray.model.moe import MoEFeedForward
from aios_ray.store.backend import ExpertBackend, ResumePoint, StoreOpener, Workers, open_backend
from aios_ray.store.control import LocalStore, StoreControl
from aios_ray.store.record import ExpertLayout

STORE_KEY = "store"  # model_config: the StoreConfig of the agent's experts
IN_PROCESS_KEY = "store_in_process"  # model_config: tiers in the learner's process instead of Ray actors
RESUME_KEY = "store_resume_snapshot"  # model_config: a resumed run's store goes back to this snapshot first
KEEP_SNAPSHOTS = 2  # store snapshots kept at checkpoints (RL checkpoints flush the store under their name)


@dataclass(frozen=True)
class ExpertShape:
    hidden_size: int
    ffn_size: int


class AgentAsModel:
    """The agent as the store's helpers read a model (``aios_ray.store.export``): ``cfg`` with the expert
    shape, the MoE layers in order, its named modules (for checkpoint names), and where to hand the experts."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.cfg = ExpertShape(module.agent_config.hidden, module.agent_config.expert_hidden)

    def moe_layers(self) -> list[MoEFeedForward]:
        return self.module.moe_layers()

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        return self.module.named_modules()

    def use_expert_source(self, source: Any) -> None:
        self.module.use_expert_source(source)


def store_config(model_config: dict[str, Any] | None) -> StoreConfig:
    """The module's store config; ``experts="local"`` when it names none."""
    raw = (model_config or {}).get(STORE_KEY)
    if raw is None:
        return StoreConfig()
    return raw if isinstance(raw, StoreConfig) else StoreConfig(**raw)


def open_agent_experts(module: Any, *, betas: tuple[float, float], eps: float) -> ExpertBackend:
    """The expert backend of one learner module: ``LocalExperts`` for local experts or a module without MoE
    layers, else the tiered store, seeded from the module's initial experts, whose Adam uses ``betas`` and
    ``eps`` (the learner's optimizer's) and no weight decay (RLlib's Adam has none)."""
    config = store_config(getattr(module, "model_config", None))
    if not config.tiered or not hasattr(module, "moe_layers") or not module.moe_layers():
        return open_backend(module, StoreConfig(), _no_store, weight_decay=0.0, keep_checkpoints=0)
    snapshot = module.model_config.get(RESUME_KEY)
    resume = ResumePoint(resumed=True, snapshot=str(snapshot)) if snapshot else ResumePoint()
    backend = open_backend(AgentAsModel(module), config, _opener(module.model_config),  # type: ignore[arg-type]
                           weight_decay=0.0, keep_checkpoints=KEEP_SNAPSHOTS - 1, workers=_workers(),
                           betas=betas, eps=eps, resume=resume)
    module.expert_reads = backend.evaluating  # state reads lease like an evaluation: no optimizer, nothing dirty
    return backend


def close_agent_experts(backend: ExpertBackend) -> None:
    """An in-process store's hot slab is a shared-memory file: remove it. Actors outlive the learner."""
    store = getattr(backend, "store", None)
    if isinstance(store, LocalStore):
        store.close()


def _opener(model_config: dict[str, Any]) -> StoreOpener:
    import ray

    in_process = model_config.get(IN_PROCESS_KEY)
    if in_process if in_process is not None else not ray.is_initialized():
        return LocalStore
    return _ray_store


def _ray_store(config: StoreConfig, layout: ExpertLayout) -> StoreControl:
    """The store's actors, found again by name or created on this node (where the learner maps the hot slab)."""
    import ray

    from actors.tier_actors import create_store

    return create_store(config, layout, node_id=ray.get_runtime_context().get_node_id())  # type: ignore[return-value]


def _no_store(config: StoreConfig, layout: ExpertLayout) -> StoreControl:
    raise AssertionError("local experts open no store")


def _workers() -> Workers:
    """Several learners (DDP): their expert gradients are averaged like DDP's, the leader writes the slots."""
    if dist.is_available() and dist.is_initialized():
        return Workers(dist.get_rank(), dist.get_world_size())
    return Workers()
