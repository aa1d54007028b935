"""Where a training loop's experts live, behind one interface that any loop calls unconditionally.

A loop (the text ``Trainer``, the RL learner) calls, per optimizer step::

    backend.begin_step()
    ... forward / backward ...            # the MoE layers ask the backend for expert weights
    backend.after_backward()              # several workers: expert gradients averaged
    clip over model.parameters() + backend.parameters()
    optimizer.step(); backend.step(lr)    # experts the model does not own are updated here
    backend.end_step(step)                # or backend.abort_step() when the step failed

and at checkpoints ``backend.checkpoint(tag)`` (what to add to the checkpoint), after a failure
``backend.failed()`` / ``backend.recover(snapshot)``, around evaluation ``with backend.evaluating():``.
A loop that trains only part of the experts this step calls ``backend.drop_expert_gradients(held)`` after
``after_backward`` (for local experts it zeroes their rows of the model's gradients itself).

- ``LocalExperts``: the experts are ordinary parameters of the model; every call does nothing.
- ``TieredBackend``: the experts live in the tiered store (hot slab -> DRAM -> NVMe). Per step it leases
  the experts the MoE layers ask for, runs AdamW in their slots, releases, records which experts were used
  and prefetches what the usage history predicts. At a checkpoint it flushes, snapshots the NVMe store
  under the checkpoint's name and exports full weights. After a tier actor restarts, or on resume, the
  store goes back to the checkpoint's snapshot and the loop replays from that checkpoint.

``open_backend`` picks one from a ``StoreConfig``. No ray import: the store itself comes from an opener
the caller passes (``LocalStore`` in-process, or the store's Ray actors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from aios_ray.adamw import BETAS, EPS
from aios_ray.config import StoreConfig
from aios_ray.durable import atomic_write_json
from aios_ray.store.control import StoreControl
from aios_ray.store.export import (
    expert_keys,
    expert_layout,
    experts_state_dict,
    local_expert_records,
    records_to_tensors,
)
from aios_ray.store.policy import AccessHistory
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.tiers import Item

HISTORY_STEPS = 4  # the usage-history predictor looks this many steps back

StoreOpener = Callable[[StoreConfig, ExpertLayout], StoreControl]


@dataclass
class ExpertCheckpoint:
    """What a backend adds to a checkpoint: expert weights for the model file, state for trainer_state.json,
    and the experts' full records (weights, Adam moments, step, version) for a file of their own."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    records: dict[str, torch.Tensor] = field(default_factory=dict)


class ExpertBackend(Protocol):
    """What a training loop calls; see the module docstring for when."""

    #: the backend can only recover to a checkpoint: the loop writes one before its first step
    needs_first_checkpoint: bool

    def begin_step(self) -> None: ...
    def parameters(self) -> list[torch.Tensor]: ...
    def after_backward(self) -> None: ...
    def step(self, lr: float) -> int: ...
    def end_step(self, step: int) -> None: ...
    def abort_step(self) -> None: ...
    def evaluating(self) -> contextlib.AbstractContextManager[None]: ...
    def checkpoint(self, tag: str) -> ExpertCheckpoint: ...
    def failed(self) -> bool: ...
    def recover(self, snapshot: str | None) -> dict[str, int]: ...
    def stats(self, step: int) -> dict[str, Any] | None: ...
    def reopened(self) -> dict[str, int] | None: ...
    def prefetch(self, experts: dict[int, list[int]]) -> None: ...
    def drop_expert_gradients(self, experts: dict[int, list[int]]) -> None: ...


class LocalExperts:
    """Experts are parameters of the model, updated by the loop's own optimizer: nothing to do."""

    needs_first_checkpoint = False

    def begin_step(self) -> None:
        return None

    def parameters(self) -> list[torch.Tensor]:
        return []

    def after_backward(self) -> None:
        return None

    def step(self, lr: float) -> int:
        return 0

    def end_step(self, step: int) -> None:
        return None

    def abort_step(self) -> None:
        return None

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def checkpoint(self, tag: str) -> ExpertCheckpoint:
        return ExpertCheckpoint()

    def failed(self) -> bool:
        return False

    def recover(self, snapshot: str | None) -> dict[str, int]:
        return {}

    def stats(self, step: int) -> dict[str, Any] | None:
        return None

    def reopened(self) -> dict[str, int] | None:
        return None

    def prefetch(self, experts: dict[int, list[int]]) -> None:
        return None

    def drop_expert_gradients(self, experts: dict[int, list[int]]) -> None:
        return None  # the experts are model parameters: the loop drops their gradients with the rest


class Workers:
    """The run's training workers as ``torch.distributed`` sees them (just this process without it), and where
    each one stands towards the stores: one store per node (NVMe, DRAM and hot tiers), its hot tier shared by
    the node's workers or one per worker (one per GPU).

    Every worker computes on its hot tier's slots and the expert gradients are averaged across all workers (as
    DDP averages the other parameters). Each hot tier has one writer, which runs AdamW in its slots: the node's
    first worker for a shared tier, each worker for its own. Writers apply the same averaged gradients to the
    same weights, so every copy stays identical. The node's first worker (the store leader) also seeds,
    prefetches, snapshots and reverts its node's store. Everyone meets at a barrier after a step, so that
    nobody reads a slot while it is being written.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int | None = None,
                 local_world_size: int | None = None, per_worker_hot_tier: bool = False) -> None:
        self.rank, self.world_size = rank, world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.local_world_size = world_size if local_world_size is None else local_world_size
        self.per_worker_hot_tier = per_worker_hot_tier

    @property
    def leader(self) -> bool:
        """The run's first worker (the chief)."""
        return self.rank == 0

    @property
    def store_leader(self) -> bool:
        """The first worker of its node: it speaks for the node's store."""
        return self.local_rank == 0

    @property
    def writes_slots(self) -> bool:
        """This worker runs the optimizer in its hot tier's slots (its own tier, or the node's shared one)."""
        return self.per_worker_hot_tier or self.store_leader

    @property
    def hot_tier(self) -> int:
        """The index of the node's hot tier this worker computes on."""
        return self.local_rank if self.per_worker_hot_tier else 0

    @property
    def hot_tiers(self) -> int:
        """How many hot tiers the node's store has."""
        return self.local_world_size if self.per_worker_hot_tier else 1

    @property
    def many(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    @property
    def nodes_many(self) -> bool:
        """The workers span more than one node: each node has a store of its own."""
        return self.local_world_size < self.world_size

    def barrier(self) -> None:
        if self.many:
            dist.barrier()

    def union(self, keys: set[ExpertKey]) -> list[ExpertKey]:
        """Every key any worker used, in one order that all workers share."""
        if not self.many:
            return sorted(keys)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, sorted((k.layer, k.expert) for k in keys))
        return sorted({ExpertKey(*pair) for part in gathered for pair in part})

    def average_(self, flat: torch.Tensor) -> None:
        if self.many:
            dist.all_reduce(flat)
            flat.div_(self.world_size)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: fresh (``resumed`` False), or from a checkpoint whose flush the store snapshot
    ``snapshot`` holds (None for a checkpoint without one: the store's last flush)."""

    resumed: bool = False
    snapshot: str | None = None
    #: the checkpoint's expert records, read only when this node has no store yet (it is rebuilt from them)
    records: Callable[[], list[Item]] | None = None


class TieredBackend:
    def __init__(self, model: nn.Module, store: StoreControl, config: StoreConfig, *, weight_decay: float,
                 keep_snapshots: int, resume: ResumePoint = ResumePoint(), workers: Workers | None = None,
                 betas: tuple[float, float] = BETAS, eps: float = EPS) -> None:
        self.model, self.store, self.config = model, store, config
        self.weight_decay, self.keep_snapshots = weight_decay, keep_snapshots
        self.betas, self.eps = betas, eps  # the loop's optimizer's: its other parameters take the same Adam
        self.store_path = Path(str(config.path))
        self.workers = workers or Workers()
        self.keys = expert_keys(model)
        self._reopened: dict[str, int] | None = None  # what a resume found cached at the last flush
        self.history = AccessHistory(HISTORY_STEPS)
        self.step_index = 0
        if self.workers.store_leader:
            if not store.keys():
                # A new store starts from the checkpoint's records when resuming (a worker on a node that has no
                # store yet rebuilds it), otherwise from the model's initial experts.
                records = resume.records() if resume.records is not None else None
                store.seed(records or local_expert_records(model))
                if records:
                    self._reopened = {"hot_kept": 0, "hot_dropped": 0, "rebuilt_from_checkpoint": len(records)}
            elif resume.resumed:
                # The caches may hold updates newer than the checkpoint we resume from (NVMe's last flush);
                # what they hold at its flushed version stays hot for this (possibly restarted) worker.
                self._reopened = store.revert(resume.snapshot)
        self.workers.barrier()
        self.experts = store.experts_client(self.workers.hot_tier)
        model.use_expert_source(self.experts)
        self.incarnations = store.incarnations()
        self.lease_calls_at_last_stats = 0

    needs_first_checkpoint = True  # recovery rolls back to a checkpoint's flush: there must be one

    # ---- per step -------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Nothing is leased ahead: the MoE layers acquire what the step uses (demand accesses, the only ones
        the hit rate counts), and the predicted experts were prefetched after the last step."""
        self.experts.begin_step()

    def parameters(self) -> list[torch.Tensor]:
        return self.experts.parameters()

    def after_backward(self) -> None:
        """Average the expert gradients over the workers (before clipping, like DDP's): every worker leases
        the experts any worker used and holds the same gradients for them afterwards."""
        if not self.workers.many:
            return
        keys = self.workers.union(self.experts.used)
        for layer in sorted({k.layer for k in keys}):
            self.experts.weights(layer, [k.expert for k in keys if k.layer == layer])
        leaves = [leaf for key in keys for leaf in self.experts.leaves[key]]
        for leaf in leaves:
            if leaf.grad is None:
                leaf.grad = torch.zeros_like(leaf)
        flat = torch.cat([leaf.grad.reshape(-1) for leaf in leaves])
        self.workers.average_(flat)
        offset = 0
        for leaf in leaves:
            leaf.grad.copy_(flat[offset:offset + leaf.numel()].view_as(leaf))
            offset += leaf.numel()

    def step(self, lr: float) -> int:
        """AdamW in the slots by their writer; the others wait until the slots hold the new weights."""
        updated = 0
        if self.workers.writes_slots:
            updated = self.experts.apply_optimizer(lr, self.weight_decay, self.betas, self.eps)
        else:
            self.experts.drop_gradients()
        self.workers.barrier()
        return updated

    def end_step(self, step: int) -> None:
        used: dict[int, list[int]] = {}
        for key in self.experts.used:
            used.setdefault(key.layer, []).append(key.expert)
        for layer, experts in used.items():
            self.history.record(step, layer, experts)
        self.experts.end_step()
        if self.config.prefetch and self.workers.store_leader:  # into free or unpinned room, counted as prefetch
            for layer in used:
                self.store.prefetch(layer, self.history.predict(layer))
        self.step_index = step

    def drop_expert_gradients(self, experts: dict[int, list[int]]) -> None:
        """After backward: these experts (layer -> ids) take no step this time; their weights, moments and
        step count stay as they are (held, e.g. because they belong to another task)."""
        for key, leaves in self.experts.leaves.items():
            if key.expert in experts.get(key.layer, ()):
                for leaf in leaves:
                    leaf.grad = None

    def abort_step(self) -> None:
        """A step that failed (out of memory) gives its leases back and drops its gradients."""
        for leaf in self.experts.parameters():
            leaf.grad = None
        self.experts.end_step()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Evaluation leases like a step and releases at the end (no optimizer, nothing dirty)."""
        self.experts.begin_step()
        try:
            yield
        finally:
            self.experts.end_step()

    # ---- durability ----------------------------------------------------------------------------
    def checkpoint(self, tag: str) -> ExpertCheckpoint:
        """Every worker calls this: each node's store is flushed and snapshotted under the checkpoint's name (a
        resume or a recovery on that node restores it). The chief then reads every record back from NVMe: the
        checkpoint's weights are complete and portable, and its records (weights, moments, step, version) let a
        node without a store rebuild one. One snapshot more than the checkpoints kept stays, since Ray Train may
        resume from one checkpoint behind the bundle."""
        if self.workers.store_leader:
            self.store.snapshot(tag, keep=self.keep_snapshots)
        self.workers.barrier()
        if not self.workers.leader:
            return ExpertCheckpoint(state={"expert_store_snapshot": tag})
        records = self.store.read_all(self.keys)
        return ExpertCheckpoint(weights=experts_state_dict(self.model, self.keys, records),
                                state={"expert_store_snapshot": tag}, records=records_to_tensors(self.keys, records))

    def failed(self) -> bool:
        """A tier actor restarted since we last looked: whatever it had not flushed is gone."""
        return self.store.incarnations() != self.incarnations

    def recover(self, snapshot: str | None) -> dict[str, int]:
        """Back to the checkpoint's snapshot (cached records at other versions are dropped) and map the hot
        slab again."""
        counts = self.store.revert(snapshot) if self.workers.store_leader else {}
        self.workers.barrier()
        self.experts = self.store.experts_client(self.workers.hot_tier)
        self.model.use_expert_source(self.experts)
        self.history = AccessHistory(HISTORY_STEPS)
        self.incarnations = self.store.incarnations()
        return counts

    def reopened(self) -> dict[str, int] | None:
        return self._reopened

    def prefetch(self, experts: dict[int, list[int]]) -> None:
        """Bring these experts (per MoE layer) toward the hot tier ahead of need, e.g. the group of a game a
        detector announced; counted as prefetch issued/used/wasted, never as demand."""
        if self.workers.store_leader:
            for layer, ids in experts.items():
                self.store.prefetch(layer, ids)

    # ---- observability -------------------------------------------------------------------------
    def stats(self, step: int) -> dict[str, Any] | None:
        tiers = self.store.stats()
        lease_calls = self.experts.lease_calls - self.lease_calls_at_last_stats
        self.lease_calls_at_last_stats = self.experts.lease_calls
        union = self.history.union_size(step) if step in self.history.steps() else 0
        record = {"step": step, "tiers": tiers, "experts_used_last_step": union, "lease_calls": lease_calls,
                  "record_bytes": expert_layout(self.model).nbytes, "total_experts": len(self.keys)}
        atomic_write_json(self.store_path / "stats.json", record)
        return record


def open_backend(model: nn.Module, config: StoreConfig, open_store: StoreOpener, *, weight_decay: float,
                 keep_checkpoints: int, resume: ResumePoint = ResumePoint(),
                 workers: Workers | None = None, betas: tuple[float, float] = BETAS,
                 eps: float = EPS) -> ExpertBackend:
    """The backend ``config`` asks for. ``open_store`` creates (or finds again) the store for a tiered one.
    ``weight_decay``, ``betas`` and ``eps``: the AdamW the experts get in their slots (the loop's own)."""
    if not config.tiered:
        return LocalExperts()
    if not config.is_resolved:
        raise ValueError(f"store config {config} is not resolved (StoreConfig.resolved fills in its defaults)")
    store = open_store(config, expert_layout(model))  # type: ignore[arg-type]
    # One snapshot more than the checkpoints kept: Ray Train may resume from one checkpoint behind the bundle.
    return TieredBackend(model, store, config, weight_decay=weight_decay, keep_snapshots=keep_checkpoints + 1,
                         resume=resume, workers=workers, betas=betas, eps=eps)
