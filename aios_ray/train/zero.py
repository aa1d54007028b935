"""DeepSpeed ZeRO (``--zero-stage zero1|zero2|zero3``) behind the training loop's optimizer step.

The loop keeps its one code path: it builds the model and its own optimizer (``build_optimizer``), then hands
both to ``open_zero``, which wraps them in a DeepSpeed engine and returns a ``ZeroStep``. The loop calls that
object for backward, the optimizer step (which reports the global gradient norm), checkpoint snapshots and
their restore; the learning rate is still set on the loop's optimizer's groups, which DeepSpeed keeps (with
their ``lr_scale``) around its flat partitions. Ray Train has set up the process group already:
``deepspeed.initialize`` joins it. ``deepspeed`` is imported only here, and only when ZeRO is on (slow import).

Checkpoints keep the bundle format: ``model.safetensors`` holds the full, plain weights (ZeRO-3 gathers them),
so evaluation and a resume without ZeRO read them as always; the partitioned optimizer state is DeepSpeed's own
checkpoint in the ``deepspeed/`` folder of the checkpoint, written by every rank (a collective), which a resume
with the same stage and worker count continues from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aios_ray.config import CONFIGS_DIR, Config
from aios_ray.errors import ConfigError
from aios_ray.tracking.jsonl import say
from aios_ray.train.bundle import TRAINER_STATE_FILE, read_json

TEMPLATES = CONFIGS_DIR / "deepspeed"
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint, inside a checkpoint directory
TAG = "zero"  # the one tag under DEEPSPEED_DIR: a checkpoint directory holds one step
STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The template ``configs/deepspeed/<stage>.json`` with its ``"auto"`` values taken from the run.

    The run decides them whatever the template says: the micro-batch and the accumulation must be the loop's
    (DeepSpeed checks its batch arithmetic against them), clipping is ``--grad-clip`` (0 = off in both) and bf16
    follows ``--amp``. Everything else (bucket sizes, overlap, offload) is the template's, for a user to edit."""
    stage = cfg.cluster.zero_stage
    path = TEMPLATES / f"{stage}.json"
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable DeepSpeed config ({str(exc).splitlines()[0]})") from None
    zero = template.get("zero_optimization", {})
    if zero.get("stage", STAGES[stage]) != STAGES[stage]:
        raise ConfigError(f"{path}: zero_optimization.stage is {zero.get('stage')}, expected {STAGES[stage]}")
    tc = cfg.train
    return {
        **template,
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "bf16": {**template.get("bf16", {}), "enabled": tc.amp},
        # the loop's own AdamW (parameter groups with their LR scale) is not one DeepSpeed lists as tested
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {**zero, "stage": STAGES[stage]},
    }


@dataclass
class ZeroSnapshot:
    """What a checkpoint gets from ZeRO: the full weights (on the chief only), the engine's own checkpoint
    (a staged directory to move into the checkpoint) and the fields that say how it was written."""

    weights: dict[str, torch.Tensor] | None
    staged: Path
    state: dict[str, Any] = field(default_factory=dict)


class ZeroStep:
    """The DeepSpeed engine around the loop's model and optimizer: the optimizer-step half of the loop."""

    def __init__(self, engine: Any, cfg: Config, rank: int, world_size: int) -> None:
        self.engine = engine
        self.stage = cfg.cluster.zero_stage
        self.rank, self.world_size = rank, world_size

    # ---- one optimizer step --------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; gradients are reduced across workers at the step's last one.

        The loss comes scaled as the loop scales it (len(micro-batch) / sequences in the step), so DeepSpeed
        must not divide it again by its accumulation count; the step's micro-batch count changes when an
        out-of-memory retreat halves the micro-batch, so the boundary is set here, not counted by the engine."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Clip (DeepSpeed's ``gradient_clipping``) and step; the global gradient norm before clipping, over
        every worker's partition, as ``clip_grad_norm_`` reports it without ZeRO."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    # ---- checkpoints ---------------------------------------------------------------------------
    def snapshot(self, checkpoints: Path, step: int) -> ZeroSnapshot:
        """Every rank must call this (it gathers ZeRO-3 weights and writes each rank's optimizer partition).

        The engine writes into a staging directory next to the checkpoints: the chief moves it into the
        checkpoint it writes, so the checkpoint is still complete before it gets its name. All ranks must see
        the same directory (one node, or a bundle on a shared filesystem)."""
        staged = checkpoints / f".deepspeed-step_{step:08d}"
        if self.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)  # a crashed save's leftovers
            checkpoints.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        weights = self.full_weights()
        self.engine.save_checkpoint(str(staged), tag=TAG, client_state={}, save_latest=False)
        dist.barrier()  # every rank's partition is on disk before the chief moves the folder
        return ZeroSnapshot(weights, staged, {"zero_stage": self.stage, "zero_world_size": self.world_size})

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """The model's complete state dict on the chief (None elsewhere), in float32 as a model without ZeRO
        holds it: ZeRO-1/2 keep whole parameters on every rank; ZeRO-3 gathers each module's own parameters
        in turn (one module's at a time, not the whole model at once)."""
        module: nn.Module = self.engine.module
        if self.stage != "zero3":
            return _plain(module.state_dict()) if self.rank == 0 else None
        import deepspeed

        gathered: dict[str, torch.Tensor] = {}
        for prefix, child in module.named_modules():
            params = list(child.named_parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if self.rank == 0:
                    for name, param in params:
                        gathered[f"{prefix}.{name}" if prefix else name] = param.detach().cpu().clone()
        if self.rank != 0:
            return None
        # buffers are never partitioned; the order is the state dict's, as a plain model writes it
        state = module.state_dict()
        return _plain({key: gathered.get(key, value) for key, value in state.items()})

    def restore(self, checkpoint: Path) -> None:
        """Continue from a checkpoint's DeepSpeed state (optimizer partitions, fp32 master weights) when it
        was written with this stage and worker count; otherwise keep fresh optimizer moments, saying so."""
        written = _written_with(checkpoint)
        here = {"zero_stage": self.stage, "zero_world_size": self.world_size}
        if written != here or not (checkpoint / DEEPSPEED_DIR / TAG).is_dir():
            if self.rank == 0:
                was = (f"--zero-stage {written['zero_stage']} on {written['zero_world_size']} worker(s)"
                       if written["zero_stage"] != "none" else "without ZeRO")
                say(f"warning: {checkpoint} was written {was}: resuming its weights, step and data position "
                    f"with fresh optimizer moments (its optimizer state fits only that layout)")
            return
        loaded, _ = self.engine.load_checkpoint(str(checkpoint / DEEPSPEED_DIR), tag=TAG,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise ConfigError(f"{checkpoint / DEEPSPEED_DIR}: DeepSpeed could not load its checkpoint")


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors; bf16 weights (``--amp`` under DeepSpeed keeps bf16 parameters) as float32."""
    return {key: (value.float() if value.dtype == torch.bfloat16 else value).detach().cpu().contiguous()
            for key, value in state.items()}


def _written_with(checkpoint: Path) -> dict[str, Any]:
    state = read_json(checkpoint / TRAINER_STATE_FILE)
    return {"zero_stage": state.get("zero_stage", "none"), "zero_world_size": state.get("zero_world_size")}


def optimizer_to_restore(checkpoint: Path, optimizer: torch.optim.Optimizer, cfg: Config,
                         chief: bool = True) -> torch.optim.Optimizer | None:
    """The optimizer that takes the checkpoint's ``optimizer.safetensors``, or None when that file holds no
    optimizer state for it: the run is a ZeRO run (``ZeroStep.restore`` loads DeepSpeed's state), or the
    checkpoint was written by one (a run without ZeRO then resumes its weights and position, saying so)."""
    if cfg.cluster.zero_stage != "none":
        return None
    written = _written_with(checkpoint)["zero_stage"]
    if written == "none":
        return optimizer
    if chief:
        say(f"warning: {checkpoint} was written with --zero-stage {written}: without --zero-stage only its "
            f"weights, step and data position are resumed, with fresh optimizer moments")
    return None


def _quiet_deepspeed(logger: logging.Logger) -> None:
    """DeepSpeed's INFO lines only with --verbose; its warnings always, but the one about the optimizer that is
    not on its tested list (the loop's own AdamW, on purpose), and torch's deprecation notice for the collectives
    DeepSpeed calls (one per worker and collective)."""
    logger.setLevel(logging.WARNING)
    logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def open_zero(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
              rank: int, world_size: int, resume_from: Path | None) -> ZeroStep | None:
    """The DeepSpeed engine for ``--zero-stage`` (None without it), restored from ``resume_from`` if given."""
    if cfg.cluster.zero_stage == "none":
        return None
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # explicit: no probing (and its warning) on CPU
    import deepspeed

    if not cfg.cluster.verbose:
        _quiet_deepspeed(deepspeed.utils.logger)
    # ZeRO hands the optimizer one flat partition per group instead of its (experts, ...) tensors: the per-expert
    # group then steps element by element (``optim.masked_adamw_update_``), still leaving unchosen experts alone.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg),
                                           dist_init_required=False)
    zero = ZeroStep(engine, cfg, rank, world_size)
    if resume_from is not None:
        zero.restore(resume_from)
    return zero
