"""``--experts tiered`` inside the training loop: one object that the Trainer calls at a few points.

Per step: lease the predicted experts -> forward/backward on shared slots -> AdamW in place ->
release, record which experts were used, prefetch what the usage history predicts for the next
step. At a checkpoint: flush (every update durable on NVMe) and export full weights into the
bundle. After a tier actor restarts (its incarnation changed), everything cached is dropped and the
Trainer replays from the last checkpoint, which is the last flush.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aios_ray.config import Config
from aios_ray.model.hrm import HRMACTv1
from aios_ray.store.control import StoreControl
from aios_ray.store.export import expert_keys, expert_layout, experts_state_dict, local_expert_records
from aios_ray.store.policy import AccessHistory
from aios_ray.store.record import ExpertKey
from aios_ray.train.bundle import atomic_write_json
from aios_ray.train.optim import BETAS, EPS

HISTORY_STEPS = 4  # the usage-history predictor looks this many steps back


class TieredRun:
    def __init__(self, model: HRMACTv1, store: StoreControl, cfg: Config, store_path: Path, resumed: bool) -> None:
        self.model, self.store, self.cfg, self.store_path = model, store, cfg, store_path
        self.keys = expert_keys(model)
        self.history = AccessHistory(HISTORY_STEPS)
        self.step = 0
        if not store.keys():
            store.seed(local_expert_records(model))  # a new store starts from the model's initial experts
        elif resumed:
            store.reset()  # caches may hold updates newer than the checkpoint we resume from: NVMe is the truth
        self.experts = store.experts_client()
        model.use_expert_source(self.experts)
        self.incarnations = store.incarnations()
        self.lease_calls_at_last_stats = 0

    @staticmethod
    def plan_capacities(model: HRMACTv1, cfg: Config) -> tuple[int, int]:
        total = len(expert_keys(model))
        return cfg.train.capacity_gpu or total, cfg.train.capacity_dram or total

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

    def apply_optimizer(self, lr: float) -> int:
        return self.experts.apply_optimizer(lr, self.cfg.train.weight_decay, BETAS, EPS)

    def end_step(self, step: int) -> None:
        used: dict[int, list[int]] = {}
        for key in self.experts.used:
            used.setdefault(key.layer, []).append(key.expert)
        for layer, experts in used.items():
            self.history.record(step, layer, experts)
        self.experts.end_step()
        if self.cfg.train.prefetch:
            for layer in used:
                self.store.prefetch(layer, self.history.predict(layer))
        self.step = step

    def abort_step(self) -> None:
        """A step that failed (out of memory) gives its leases back and drops its gradients."""
        for leaf in self.experts.parameters():
            leaf.grad = None
        self.experts.end_step()

    # ---- durability ----------------------------------------------------------------------------
    def export_weights(self) -> dict[str, torch.Tensor]:
        """Flush, then read every expert back from NVMe: the bundle's weights are complete and portable."""
        self.store.flush()
        return experts_state_dict(self.model, self.keys, self.store.read_all(self.keys))

    def failed(self) -> bool:
        """A tier actor restarted since we last looked: whatever it had not flushed is gone."""
        return self.store.incarnations() != self.incarnations

    def recover(self) -> None:
        """Drop every cached record (NVMe's last flush is the truth) and map the hot slab again."""
        self.store.reset()
        self.experts = self.store.experts_client()
        self.model.use_expert_source(self.experts)
        self.history = AccessHistory(HISTORY_STEPS)
        self.incarnations = self.store.incarnations()

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

