"""Checkpoints of a training run: what one holds, writing it, reading it back, and which one to resume.

A checkpoint directory holds the complete weights (experts included, whatever backend held them),
the optimizer state with the RNG states, and ``trainer_state.json`` (schedule position, data position,
micro-batch, the expert store snapshot it was written with, and the run's id).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as to_bytes
from torch import nn

from aios_ray.data.dataset import SamplerState
from aios_ray.errors import BundleError
from aios_ray.store.backend import ExpertBackend, ExpertCheckpoint
from aios_ray.store.export import tensors_to_records
from aios_ray.store.tiers import Item
from aios_ray.train.bundle import (
    EXPERT_RECORDS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
    Bundle,
    checkpoint_name,
    load_tensors,
    now,
    read_json,
)
from aios_ray.train.optim import optimizer_from_tensors, optimizer_to_tensors

if TYPE_CHECKING:
    from aios_ray.train.zero import ZeroSnapshot


@dataclass
class TrainerState:
    step: int = 0  # cumulative optimizer steps of the brain
    round: int = 0  # --iterate rounds completed
    round_step: int = 0  # steps into the current round (drives the LR schedule)
    micro_batch: int = 0  # sequences per forward; halves on out-of-memory
    sampler: SamplerState = field(default_factory=SamplerState)


def store_snapshot(checkpoint: Path | None) -> str | None:
    """The expert store snapshot a checkpoint was written with (None: no checkpoint, or one without)."""
    if checkpoint is None:
        return None
    return read_json(checkpoint / TRAINER_STATE_FILE).get("expert_store_snapshot")


def checkpoint_step(checkpoint: Path) -> int:
    return int(read_json(checkpoint / TRAINER_STATE_FILE)["trainer"]["step"])


def checkpoint_experts(backend: ExpertBackend, state: TrainerState) -> ExpertCheckpoint:
    """What the expert backend adds to the checkpoint at ``state.step``. Every worker calls it (each node's store
    flushes and snapshots); the chief gets the experts' weights and records back."""
    return backend.checkpoint(checkpoint_name(state.step))


def checkpoint_files(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                     experts: ExpertCheckpoint, device: torch.device, run_id: str,
                     zero: ZeroSnapshot | None = None) -> dict[str, bytes]:
    """The files of a checkpoint at ``state.step``, with the experts the backend holds (``checkpoint_experts``).

    Under ZeRO (``zero``) the weights are the ones it gathered and the optimizer state is DeepSpeed's own (its
    folder joins the checkpoint): ``optimizer.safetensors`` then holds the RNG states only."""
    tensors, groups = optimizer_to_tensors(optimizer) if zero is None else ({}, [])
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    weights = model.state_dict() if zero is None or zero.weights is None else zero.weights
    model_state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    model_state.update(experts.weights)
    trainer_state = {"trainer": asdict(state), "param_groups": groups, "saved_at": now(), "run_id": run_id,
                     **experts.state, **(zero.state if zero is not None else {})}
    files = {
        MODEL_FILE: to_bytes(model_state),
        OPTIMIZER_FILE: to_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
        TRAINER_STATE_FILE: json.dumps(trainer_state, indent=2).encode(),
    }
    if experts.records:
        files[EXPERT_RECORDS_FILE] = to_bytes(experts.records)
    return files


def expert_records(checkpoint: Path | None) -> Callable[[], list[Item]] | None:
    """The reader of a checkpoint's expert records (None: no checkpoint, or one written without a store)."""
    if checkpoint is None or not (checkpoint / EXPERT_RECORDS_FILE).is_file():
        return None
    return lambda: tensors_to_records(load_tensors(checkpoint / EXPERT_RECORDS_FILE))


def load_training_state(path: Path, optimizer: torch.optim.Optimizer | None, device: torch.device,
                        batch_size: int) -> TrainerState:
    """Optimizer, RNG, schedule and data position of a checkpoint (weights are loaded separately); with
    ``optimizer`` None the optimizer state is left alone (ZeRO's is DeepSpeed's: ``train/zero.py``)."""
    tensors = load_tensors(path / OPTIMIZER_FILE)
    state = read_json(path / TRAINER_STATE_FILE)
    if optimizer is not None:
        optimizer_from_tensors(optimizer, tensors, state["param_groups"])
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available() and "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    trainer = state["trainer"]
    return TrainerState(step=trainer["step"], round=trainer["round"], round_step=trainer["round_step"],
                        micro_batch=min(trainer["micro_batch"], batch_size), sampler=SamplerState(**trainer["sampler"]))


def newest_checkpoint_of_run(bundle: Bundle, run_id: str) -> Path | None:
    """The newest complete checkpoint in the bundle written by run ``run_id`` (None: none yet).

    A checkpoint directory gets its final name only once complete, and its store snapshot is taken before
    it is written, so any directory found here is whole and consistent with the store."""
    if not run_id or not bundle.checkpoints.is_dir():
        return None
    for path in sorted(bundle.checkpoints.glob("step_*"), reverse=True):
        try:
            if read_json(path / TRAINER_STATE_FILE).get("run_id") == run_id and (path / MODEL_FILE).is_file() \
                    and (path / OPTIMIZER_FILE).is_file():
                return path
        except BundleError:  # pruned while we looked, or not ours to judge: skip it
            continue
    return None


def resume_source(restored: Path | None, bundle: Bundle, run_id: str, resume_from: str | None,
                  agree: Callable[[int], int] = lambda step: step) -> Path | None:
    """Where a (re)started worker resumes: the newest of the checkpoint Ray Train restored and this run's own
    newest checkpoint in the bundle (Ray's controller may not have taken in the last report when a worker
    died right after writing it); with neither, the bundle a new run resumes (``--model``), if any.

    ``agree`` takes each worker's newest step and returns the one all workers resume from (the smallest: a
    worker on another node than the bundle sees only Ray's checkpoint, which every worker has)."""
    candidates = [p for p in (restored, newest_checkpoint_of_run(bundle, run_id)) if p is not None]
    newest = max(candidates, key=checkpoint_step) if candidates else None
    step = agree(checkpoint_step(newest) if newest is not None else -1)
    chosen = next((p for p in candidates if checkpoint_step(p) == step), None)
    if chosen is not None:
        return chosen
    if candidates:  # a step no checkpoint here has: the workers cannot agree on a state, so say so
        raise BundleError(f"workers resume from different checkpoints: step {step} is not among "
                          f"{sorted(checkpoint_step(p) for p in candidates)} here")
    return Path(resume_from) if resume_from else None
