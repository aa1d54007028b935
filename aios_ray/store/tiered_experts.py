"""The training process's side of the tiered store: expert weights straight from leased hot slots.

Per step: ``begin_step(predicted)`` leases the predicted experts (one call); a MoE call that needs an
expert not yet leased leases it (one call per miss set); forward and backward compute on views of
the shared slots (no copy); ``apply_optimizer`` runs the same AdamW arithmetic as local experts on
the slot's weights and moments in place and marks them dirty; ``end_step`` releases the lease.
No ray import: the client is anything with ``lease``, ``release`` and ``mark_dirty`` (a ``HotTier``
in-process, or a handle on the cache actor).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Protocol

import torch

from aios_ray.adamw import adamw_update_
from aios_ray.errors import UserError
from aios_ray.store.policy import TierFullError
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.slab import HotSlab

_holders = itertools.count()


class HotClient(Protocol):
    def lease(self, keys: Sequence[ExpertKey], holder: str) -> dict[ExpertKey, int]: ...
    def release(self, holder: str) -> int: ...
    def mark_dirty(self, keys: Sequence[ExpertKey]) -> None: ...


class HotTierTooSmall(UserError):
    """Every expert a step uses stays leased until its optimizer step; they must fit the hot tier."""


def _alias(view: torch.Tensor) -> torch.Tensor:
    """A tensor on the same memory with its own autograd version counter. (A view or ``detach()``
    shares the counter of the whole slab, so loading another expert into another slot during the
    step would look like an in-place change of this one to autograd.)"""
    alias = torch.empty(0, dtype=view.dtype, device=view.device)
    return alias.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


def _slot_weight_views(slab: torch.Tensor, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, C, 2F) and (S, F, C) views of a (S, numel) slab: slot s's weights at row s, a record's stride apart.
    Records are padded to 64 bytes, so every slot's weights stay 16-byte aligned, as grouped matmul needs."""
    slots, numel = slab.shape
    C, F = layout.hidden_size, layout.ffn_size
    base = slab.storage_offset()
    w_gate_up = slab.as_strided((slots, C, 2 * F), (numel, 2 * F, 1), base + layout.offsets["w_gate_up"][0])
    w_down = slab.as_strided((slots, F, C), (numel, C, 1), base + layout.offsets["w_down"][0])
    return w_gate_up, w_down


def _received_gradient(leaves: tuple[torch.Tensor, torch.Tensor]) -> bool:
    grads = [leaf.grad for leaf in leaves]
    return all(g is not None for g in grads) and any(bool(g.ne(0).any()) for g in grads)


class TieredExperts:
    def __init__(self, client: HotClient, slab: HotSlab, layout: ExpertLayout) -> None:
        self.client, self.slab, self.layout = client, slab, layout
        self.holder = f"{os.getpid()}-{next(_holders)}"
        self.slots: dict[ExpertKey, int] = {}
        self.leaves: dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lease_calls = 0
        self.used: set[ExpertKey] = set()
        self._slot_views = _slot_weight_views(slab.tensor, layout)

    # ---- step lifecycle ------------------------------------------------------------------------
    def begin_step(self, predicted: Sequence[ExpertKey] = ()) -> None:
        self.used.clear()
        if predicted:
            self._lease(list(predicted))

    def end_step(self) -> None:
        self.client.release(self.holder)
        self.slots.clear()
        self.leaves.clear()

    def _lease(self, keys: list[ExpertKey]) -> None:
        self.lease_calls += 1
        try:
            self.slots.update(self.client.lease(keys, self.holder))
        except TierFullError:
            raise HotTierTooSmall(
                f"the hot expert tier ({self.slab.num_slots} slots) cannot hold the {len(self.slots) + len(keys)}+ "
                f"experts this step uses at once; raise --capacity-gpu") from None

    # ---- what the MoE layer calls --------------------------------------------------------------
    def weights(self, layer: int, experts: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """(w_gate_up, w_down) of each expert: leaf tensors on the shared slot (gradients land in .grad)."""
        keys = [ExpertKey(layer, e) for e in experts]
        missing = [k for k in keys if k not in self.slots]
        if missing:
            self._lease(missing)
        self.used.update(keys)
        return {k.expert: self._leaf(k) for k in keys}

    def slots_of(self, layer: int, experts: Sequence[int]) -> list[int]:
        """The slots of experts leased by ``weights``."""
        return [self.slots[ExpertKey(layer, e)] for e in experts]

    def slot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's w_gate_up (S, C, 2F) and w_down (S, F, C): strided views of the slab, no copy."""
        return self._slot_views

    def _leaf(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.leaves:
            views = self.layout.views(self.slab.row(self.slots[key]))
            self.leaves[key] = (_alias(views["w_gate_up"]).requires_grad_(True),
                                _alias(views["w_down"]).requires_grad_(True))
        return self.leaves[key]

    def parameters(self) -> list[torch.Tensor]:
        """This step's expert leaves (for gradient clipping over the whole model)."""
        return [t for pair in self.leaves.values() for t in pair]

    @torch.no_grad()
    def apply_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> int:
        """AdamW on every expert that received gradient, in the slot, in place; returns how many.

        The experts are marked dirty (a new version) *before* their slots are written: a process that dies
        mid-update then leaves slots whose version no longer matches the last flush, which recovery drops
        (``HotTier.revert``) instead of keeping half-updated weights."""
        touched = [key for key, pair in self.leaves.items() if _received_gradient(pair)]
        if touched:
            self.client.mark_dirty(touched)
        for key in touched:
            w_gate_up, w_down = self.leaves[key]
            grads = (w_gate_up.grad, w_down.grad)
            views = self.layout.views(self.slab.row(self.slots[key]))
            step = views["step"]
            for name, grad in zip(("w_gate_up", "w_down"), grads, strict=True):
                local_step = step.clone()  # both weights take the same step number, as in the local optimizer
                adamw_update_(views[name], grad, views[f"exp_avg.{name}"], views[f"exp_avg_sq.{name}"],
                              local_step, lr, weight_decay, betas, eps)
            step.add_(1)
        self.drop_gradients()
        return len(touched)

    def drop_gradients(self) -> None:
        for pair in self.leaves.values():
            for leaf in pair:
                leaf.grad = None
