"""The training process's side of the tiered store: expert weights straight from leased hot slots.

Per step: a MoE call that needs experts not yet held this step acquires them (one call per miss set:
only what the step uses is ever pinned; prefetching is the store's business, between steps); forward
and backward compute on views of the shared slots (no copy); ``apply_optimizer`` runs the same AdamW
arithmetic as local experts on the slot's weights and moments in place and marks them dirty;
``end_step`` releases the lease.

A hot tier smaller than the step's experts does not stop the step: the experts that find no free slot
come as copies of their records (streamed past the tier, counted there as misses and stall), are
computed on and updated here, and go back with ``write_back``. Slower, same arithmetic.
No ray import: the client is anything with ``acquire``, ``write_back``, ``release`` and ``mark_dirty``
(a ``HotTier`` in-process, or a handle on the cache actor).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from aios_ray.adamw import adamw_update_
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.slab import HotSlab

_holders = itertools.count()


class HotClient(Protocol):
    def acquire(self, keys: Sequence[ExpertKey], holder: str) -> tuple[dict[ExpertKey, int],
                                                                       dict[ExpertKey, tuple[np.ndarray, int]]]: ...
    def write_back(self, items: Sequence[tuple[ExpertKey, np.ndarray, int]]) -> None: ...
    def release(self, holder: str) -> int: ...
    def mark_dirty(self, keys: Sequence[ExpertKey]) -> None: ...


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
        self.streamed: dict[ExpertKey, tuple[torch.Tensor, int]] = {}  # copies this step computes on, and versions
        self.leaves: dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lease_calls = 0
        self.used: set[ExpertKey] = set()
        self._slot_views = _slot_weight_views(slab.tensor, layout)

    # ---- step lifecycle ------------------------------------------------------------------------
    def begin_step(self) -> None:
        self.used.clear()

    def end_step(self) -> None:
        self.client.release(self.holder)
        self.slots.clear()
        self.streamed.clear()
        self.leaves.clear()

    def acquire(self, keys: list[ExpertKey]) -> None:
        """Hold ``keys`` for this step: hot slots where there is room, streamed copies otherwise."""
        self.lease_calls += 1
        slots, streamed = self.client.acquire(keys, self.holder)
        self.slots.update(slots)
        device = self.slab.tensor.device
        for key, (flat, version) in streamed.items():
            self.streamed[key] = (torch.from_numpy(np.array(flat, copy=True)).to(device), version)

    # ---- what the MoE layer calls --------------------------------------------------------------
    def weights(self, layer: int, experts: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """(w_gate_up, w_down) of each expert: leaf tensors on the shared slot, or on the streamed copy when the
        hot tier had no room (gradients land in .grad)."""
        keys = [ExpertKey(layer, e) for e in experts]
        missing = [k for k in keys if k not in self.slots and k not in self.streamed]
        if missing:
            self.acquire(missing)
        self.used.update(keys)
        return {k.expert: self._leaf(k) for k in keys}

    def slots_of(self, layer: int, experts: Sequence[int]) -> list[int] | None:
        """The slots of experts leased by ``weights``; None when any of them is a streamed copy (no slot)."""
        keys = [ExpertKey(layer, e) for e in experts]
        if any(k not in self.slots for k in keys):
            return None
        return [self.slots[k] for k in keys]

    def _row(self, key: ExpertKey) -> torch.Tensor:
        """The flat record the step computes on: its hot slot, or its streamed copy."""
        slot = self.slots.get(key)
        return self.slab.row(slot) if slot is not None else self.streamed[key][0]

    def slot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's w_gate_up (S, C, 2F) and w_down (S, F, C): strided views of the slab, no copy."""
        return self._slot_views

    def _leaf(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.leaves:
            views = self.layout.views(self._row(key))
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
        in_slots = [key for key in touched if key in self.slots]
        if in_slots:
            self.client.mark_dirty(in_slots)
        for key in touched:
            self._adamw(key, lr, weight_decay, betas, eps)
        streamed = [key for key in touched if key not in self.slots]
        if streamed:  # the updated copies go back to the store, each one version newer
            self.client.write_back([(key, self.streamed[key][0].cpu().numpy(), self.streamed[key][1] + 1)
                                    for key in streamed])
        self.drop_gradients()
        return len(touched)

    def _adamw(self, key: ExpertKey, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
        w_gate_up, w_down = self.leaves[key]
        views = self.layout.views(self._row(key))
        step = views["step"]
        for name, grad in zip(("w_gate_up", "w_down"), (w_gate_up.grad, w_down.grad), strict=True):
            local_step = step.clone()  # both weights take the same step number, as in the local optimizer
            adamw_update_(views[name], grad, views[f"exp_avg.{name}"], views[f"exp_avg_sq.{name}"],
                          local_step, lr, weight_decay, betas, eps)
        step.add_(1)

    def drop_gradients(self) -> None:
        for pair in self.leaves.values():
            for leaf in pair:
                leaf.grad = None
