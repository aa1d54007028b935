"""``--experts tiered`` inside the training loop: one object that the Trainer calls at a few points.

Per step: lease the predicted experts -> forward/backward on shared slots -> (several workers: average
the expert gradients) -> AdamW in place -> release, record which experts were used, prefetch what the
usage history predicts for the next step. At a checkpoint: flush, snapshot the NVMe store under the
checkpoint's name, and export full weights into the bundle. After a tier actor restarts (its
incarnation changed), or when a run resumes, the store goes back to the checkpoint's snapshot (cached
records at any other version are dropped) and the Trainer replays from that checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aios_ray.config import Config
from aios_ray.model.hrm import HRMACTv1
from aios_ray.store.control import StoreControl
from aios_ray.store.export import expert_keys, expert_layout, experts_state_dict, local_expert_records
from aios_ray.store.policy import AccessHistory
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.train.bundle import atomic_write_json
from aios_ray.train.optim import BETAS, EPS

HISTORY_STEPS = 4  # the usage-history predictor looks this many steps back


@dataclass(frozen=True)
class StoreSpec:
    """The expert store a run uses, from its config alone: the driver creates the store's actors from it
    before the workers start (so they outlive a restarted worker), and each worker finds them again."""

    name: str
    path: Path
    layout: ExpertLayout
    capacity_gpu: int  # expert records
    capacity_dram: int
    device: str = "cpu"  # where the hot tier's slots live: "cuda" when the run trains on GPUs

    @classmethod
    def for_run(cls, cfg: Config, bundle_root: str | Path) -> StoreSpec:
        model = cfg.model
        total = model.num_experts * (model.h_layers + model.l_layers)  # every block's FFN is an MoE
        path = Path(cfg.train.store_path or Path(bundle_root) / "expert_store").resolve()
        return cls(cfg.train.brain_name, path, ExpertLayout(model.hidden_size, model.ffn_size),
                   cfg.train.capacity_gpu or total, cfg.train.capacity_dram or total,
                   "cuda" if cfg.cluster.use_gpu else "cpu")


class Workers:
    """The run's training workers as ``torch.distributed`` sees them (just this process without it).

    With several workers on one node they all map the same hot slab: each computes on the shared slots, the
    expert gradients are averaged across workers (as DDP averages the other parameters), and only the leader
    (rank 0) writes the slots and tells the store; the others wait at a barrier so that nobody reads a slot
    while it is being updated.
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

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


class TieredRun:
    def __init__(self, model: HRMACTv1, store: StoreControl, cfg: Config, store_path: Path, resumed: bool,
                 snapshot: str | None = None, workers: Workers | None = None) -> None:
        """``resumed``: the run continues from a checkpoint, whose flush the store snapshot ``snapshot`` holds
        (None for a checkpoint without one: the store's last flush)."""
        self.model, self.store, self.cfg, self.store_path = model, store, cfg, store_path
        self.workers = workers or Workers()
        self.keys = expert_keys(model)
        self.reopened: dict[str, int] | None = None  # what a resume found cached at the last flush
        self.history = AccessHistory(HISTORY_STEPS)
        self.step = 0
        if self.workers.leader:
            if not store.keys():
                store.seed(local_expert_records(model))  # a new store starts from the model's initial experts
            elif resumed:
                # The caches may hold updates newer than the checkpoint we resume from (NVMe's last flush);
                # what they hold at its flushed version stays hot for this (possibly restarted) worker.
                self.reopened = store.revert(snapshot)
        self.workers.barrier()
        self.experts = store.experts_client()
        model.use_expert_source(self.experts)
        self.incarnations = store.incarnations()
        self.lease_calls_at_last_stats = 0

    # ---- per step ------------------------------------------------------------------------------
    def predicted(self) -> list[ExpertKey]:
        if not self.cfg.train.prefetch:
            return []
        layers = sorted({k.layer for k in self.keys})
        return [ExpertKey(layer, e) for layer in layers for e in self.history.predict(layer)]

    def begin_step(self) -> None:
        self.experts.begin_step(self.predicted())

    def parameters(self) -> list[torch.Tensor]:
        return self.experts.parameters()

    def synchronize_gradients(self) -> None:
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

    def apply_optimizer(self, lr: float) -> int:
        """AdamW in the slots by the leader; the others wait until the slots hold the new weights."""
        updated = 0
        if self.workers.leader:
            updated = self.experts.apply_optimizer(lr, self.cfg.train.weight_decay, BETAS, EPS)
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
        if self.cfg.train.prefetch and self.workers.leader:
            for layer in used:
                self.store.prefetch(layer, self.history.predict(layer))
        self.step = step

    def abort_step(self) -> None:
        """A step that failed (out of memory) gives its leases back and drops its gradients."""
        for leaf in self.experts.parameters():
            leaf.grad = None
        self.experts.end_step()

    # ---- durability ----------------------------------------------------------------------------
    def export_weights(self, snapshot: str) -> dict[str, torch.Tensor]:
        """Flush and snapshot the store under the checkpoint's name (a resume restores it), then read every
        expert back from NVMe: the bundle's weights are complete and portable. One snapshot more than the
        bundle keeps checkpoints stays, since Ray Train may resume from one checkpoint behind the bundle."""
        self.store.snapshot(snapshot, keep=self.cfg.train.keep_checkpoints + 1)
        return experts_state_dict(self.model, self.keys, self.store.read_all(self.keys))

    def failed(self) -> bool:
        """A tier actor restarted since we last looked: whatever it had not flushed is gone."""
        return self.store.incarnations() != self.incarnations

    def recover(self, snapshot: str | None) -> dict[str, int]:
        """Back to the checkpoint's snapshot (cached records at other versions are dropped) and map the hot
        slab again."""
        counts = self.store.revert(snapshot) if self.workers.leader else {}
        self.workers.barrier()
        self.experts = self.store.experts_client()
        self.model.use_expert_source(self.experts)
        self.history = AccessHistory(HISTORY_STEPS)
        self.incarnations = self.store.incarnations()
        return counts

    # ---- observability -------------------------------------------------------------------------
    def stats(self, step: int) -> dict[str, Any]:
        tiers = self.store.stats()
        lease_calls = self.experts.lease_calls - self.lease_calls_at_last_stats
        self.lease_calls_at_last_stats = self.experts.lease_calls
        union = self.history.union_size(step) if step in self.history.steps() else 0
        record = {"step": step, "tiers": tiers, "experts_used_last_step": union, "lease_calls": lease_calls,
                  "record_bytes": expert_layout(self.model).nbytes, "total_experts": len(self.keys)}
        atomic_write_json(self.store_path / "stats.json", record)
        return record

