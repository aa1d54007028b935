"""The one training function: local runs, Ray Train workers and Tune trials all call ``train_worker``.

Per optimizer step (nanoGPT shape): schedule -> micro-batches (forward, backward) -> clip -> step
-> log -> stop file? -> eval / expert usage / checkpoint when due. Ray is reached only through the
``WorkerContext`` passed in, so this module never imports ray.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from aios_ray.config import Config
from aios_ray.data.dataset import BlockSampler, SamplerState, eval_batches
from aios_ray.model.hrm import HRMACTv1, count_parameters
from aios_ray.model.routing_log import RoutingLog
from aios_ray.store.control import StoreControl
from aios_ray.tracking.jsonl import MetricsLog, Progress, say
from aios_ray.train.bundle import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
    Bundle,
    checkpoint_name,
    load_model_weights,
    load_tensors,
    now,
    read_json,
)
from aios_ray.train.optim import build_optimizer, lr_at, optimizer_from_tensors, optimizer_to_tensors
from aios_ray.train.tiered import StoreSpec, TieredRun, Workers


class WorkerContext(Protocol):
    """What the loop needs from its surroundings (plain process, Ray Train worker, Tune trial)."""

    rank: int
    world_size: int
    device: torch.device

    def wrap_model(self, model: nn.Module) -> nn.Module: ...
    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...
    def any_rank(self, flag: bool) -> bool: ...
    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def open_expert_store(self, spec: StoreSpec) -> StoreControl: ...


class LocalContext:
    """A single process without Ray (tests, --no-ray)."""

    rank, world_size = 0, 1

    def __init__(self, use_gpu: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        return None

    def any_rank(self, flag: bool) -> bool:
        return flag

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        yield None

    def open_expert_store(self, spec: StoreSpec) -> StoreControl:
        """Without Ray the same tier classes run in this process."""
        from aios_ray.store.control import LocalStore

        device = str(self.device) if spec.device == "cuda" else "cpu"
        return LocalStore(spec.path, spec.layout, spec.capacity_gpu, spec.capacity_dram, spec.name, device)


@dataclass
class TrainData:
    """Everything tokenised on the driver; shipped to workers once (Ray's object store, zero-copy)."""

    train_tokens: np.ndarray
    eval_tokens: np.ndarray | None
    tokenizer_json: str
    dataset: dict[str, Any]  # description recorded in the bundle's dataset history


@dataclass
class RunPlan:
    """The resolved run: config (vocab size filled in), where the bundle lives, what to resume."""

    config: Config
    bundle_root: str
    log_file: str
    stop_file: str
    resume_from: str | None = None  # checkpoint directory
    metadata: dict[str, Any] = field(default_factory=dict)  # existing bundle metadata when resuming


@dataclass
class TrainerState:
    step: int = 0  # cumulative optimizer steps of the brain
    round: int = 0  # --iterate rounds completed
    round_step: int = 0  # steps into the current round (drives the LR schedule)
    micro_batch: int = 0  # sequences per forward; halves on out-of-memory
    sampler: SamplerState = field(default_factory=SamplerState)


class TierRestarted(RuntimeError):
    """A tier actor of the expert store restarted during a step: the step must be replayed."""


def _store_snapshot(checkpoint: Path | None) -> str | None:
    """The expert store snapshot a checkpoint was written with (None: no checkpoint, or one without)."""
    if checkpoint is None:
        return None
    return read_json(checkpoint / TRAINER_STATE_FILE).get("expert_store_snapshot")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Trainer:
    def __init__(self, plan: RunPlan, data: TrainData, ctx: WorkerContext) -> None:
        self.plan, self.data, self.ctx = plan, data, ctx
        self.cfg = plan.config
        tc = self.cfg.train
        self.is_chief = ctx.rank == 0
        torch.manual_seed(tc.seed)
        self.model = HRMACTv1(self.cfg.model).to(ctx.device)
        self.state = TrainerState(micro_batch=tc.batch_size)
        self.tiered: TieredRun | None = None
        with self.ctx.restored_checkpoint() as ray_checkpoint:
            source = ray_checkpoint or (Path(plan.resume_from) if plan.resume_from else None)
            if source is not None:
                load_model_weights(self.model, source / MODEL_FILE)  # complete weights, experts included
            if tc.experts == "tiered":
                self.tiered = self._open_tiered(source)
            self.optimizer = build_optimizer(self.model, tc)
            if source is not None:
                self.load_training_state(source)
        self.resumed = source is not None
        self.train_model = ctx.wrap_model(self.model)
        self.sampler = BlockSampler(data.train_tokens, self.cfg.model.max_seq_len, tc.batch_size, tc.seed,
                                    ctx.rank, ctx.world_size, self.state.sampler)
        self.eval_data = (eval_batches(data.eval_tokens, self.cfg.model.max_seq_len, tc.batch_size,
                                       tc.eval_batches) if data.eval_tokens is not None and tc.eval_batches
                          else [])
        self.bundle = Bundle(Path(plan.bundle_root))
        self.metadata = dict(plan.metadata)
        self.log = MetricsLog(Path(plan.log_file) if self.is_chief else None)
        self.usage = RoutingLog()
        self.last_eval: dict[str, float] = {}

    # ---- state ---------------------------------------------------------------------------------
    def _open_tiered(self, checkpoint: Path | None) -> TieredRun:
        spec = StoreSpec.for_run(self.cfg, self.plan.bundle_root)
        return TieredRun(self.model, self.ctx.open_expert_store(spec), self.cfg, spec.path,
                         resumed=checkpoint is not None, snapshot=_store_snapshot(checkpoint),
                         workers=Workers(self.ctx.rank, self.ctx.world_size))

    def load_training_state(self, path: Path) -> None:
        """Optimizer, RNG, schedule and data position of a checkpoint (weights are loaded separately)."""
        tensors = load_tensors(path / OPTIMIZER_FILE)
        state = read_json(path / TRAINER_STATE_FILE)
        optimizer_from_tensors(self.optimizer, tensors, state["param_groups"])
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda" in tensors and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.ctx.device)
        trainer = state["trainer"]
        self.state = TrainerState(step=trainer["step"], round=trainer["round"], round_step=trainer["round_step"],
                                  micro_batch=min(trainer["micro_batch"], self.cfg.train.batch_size),
                                  sampler=SamplerState(**trainer["sampler"]))

    def checkpoint_files(self) -> dict[str, bytes]:
        from safetensors.torch import save as to_bytes

        tensors, groups = optimizer_to_tensors(self.optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.ctx.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        self.state.sampler = self.sampler.state
        trainer_state = {"trainer": asdict(self.state), "param_groups": groups, "saved_at": now()}
        model_state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.tiered is not None:
            trainer_state["expert_store_snapshot"] = checkpoint_name(self.state.step)
            model_state.update(self.tiered.export_weights(checkpoint_name(self.state.step)))
        return {
            MODEL_FILE: to_bytes(model_state),
            OPTIMIZER_FILE: to_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
            TRAINER_STATE_FILE: json.dumps(trainer_state, indent=2).encode(),
        }

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        path = None
        if self.is_chief:
            path = self.bundle.write_checkpoint(self.state.step, self.checkpoint_files(),
                                                self.cfg.train.keep_checkpoints)
            self.metadata["total_steps"] = self.state.step
            self.metadata["dataset_history"][-1]["steps_end"] = self.state.step
            self.bundle.publish(path, self.metadata)
            self.log.write("checkpoint", step=self.state.step, path=str(path))
        self.ctx.report({**metrics, "step": self.state.step}, path)

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        tc = self.cfg.train
        batches = [self.sampler.next_batch() for _ in range(tc.grad_accum)]
        while True:
            try:
                return self._optimize(batches)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or self.state.micro_batch == 1:
                    raise
                self._retreat_from_oom(exc)

    def _retreat_from_oom(self, exc: BaseException) -> None:
        """Halve the micro-batch (more accumulation, same effective batch) and try the step again."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        old = self.state.micro_batch
        self.state.micro_batch = max(old // 2, 1)
        accum = self.cfg.train.grad_accum * -(-self.cfg.train.batch_size // self.state.micro_batch)
        message = (f"out of memory at step {self.state.step + 1} with micro-batch {old}: retrying with "
                   f"micro-batch {self.state.micro_batch} ({accum} micro-batches per step)")
        say(f"[rank {self.ctx.rank}] {message}")
        self.log.write("oom", step=self.state.step + 1, old_micro_batch=old,
                       micro_batch=self.state.micro_batch, micro_batches_per_step=accum,
                       error=str(exc).splitlines()[0][:200])

    def _optimize(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        tc = self.cfg.train
        started = time.perf_counter()
        lr = tc.lr * lr_at(self.state.round_step, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        total_sequences = sum(len(ids) for ids, _ in batches)
        if self.tiered is not None:
            self.tiered.begin_step()
        try:
            sums = self._forward_backward(batches, total_sequences)
            if self.tiered is not None:
                self.tiered.synchronize_gradients()  # experts are not DDP parameters: averaged here
            params = list(self.model.parameters()) + (self.tiered.parameters() if self.tiered else [])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or math.inf)
            self.optimizer.step()
            if self.tiered is not None:
                self.tiered.apply_optimizer(lr)  # the same AdamW arithmetic, in the leased slots
        except BaseException as exc:
            if self.tiered is not None:
                self.tiered.abort_step()
                if self.tiered.failed():  # a tier actor restarted under this step
                    raise TierRestarted(str(exc)[:200]) from exc
            raise
        if self.tiered is not None:
            self.tiered.end_step(self.state.step + 1)
        elapsed = time.perf_counter() - started
        tokens = total_sequences * self.cfg.model.max_seq_len * self.ctx.world_size
        return {
            "train_loss": sums["train_loss"], "lm_loss": sums["lm_loss"], "q_loss": sums["q_loss"],
            "lb_loss": sums["lb_loss"], "lr": lr, "grad_norm": float(grad_norm),
            "tokens_per_sec": tokens / elapsed, "sec_per_step": elapsed,
            "mean_halt_steps": sums["halt"] / total_sequences,
        }

    def _forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]],
                          total_sequences: int) -> dict[str, float]:
        """Micro-batches of the current size; only the last one all-reduces gradients under DDP."""
        mb, device = self.state.micro_batch, self.ctx.device
        chunks = [(ids[i:i + mb], labels[i:i + mb]) for ids, labels in batches for i in range(0, len(ids), mb)]
        sums = dict.fromkeys(("train_loss", "lm_loss", "q_loss", "lb_loss", "halt"), 0.0)
        usage = RoutingLog()
        for index, (ids, labels) in enumerate(chunks):
            last = index == len(chunks) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.train_model, "no_sync") \
                else self.train_model.no_sync()
            with sync:
                with self._autocast():
                    out = self.train_model(ids.to(device), labels.to(device))
                scale = len(ids) / total_sequences
                (out.loss * scale).backward()
            for key, value in (("train_loss", out.loss), ("lm_loss", out.lm_loss), ("q_loss", out.q_loss),
                               ("lb_loss", out.lb_loss)):
                sums[key] += float(value.detach()) * scale
            sums["halt"] += float(out.halt_steps.sum())
            usage.merge_usage(out.routing)
        self.usage.merge_usage(usage)
        return sums

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.amp)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over the fixed eval batches, every ACT segment run."""
        if self.tiered is not None:
            self.tiered.experts.begin_step()
        try:
            loss = evaluate_loss(self.model, self.eval_data, self.ctx.device, self.cfg.train.amp)
        finally:
            if self.tiered is not None:
                self.tiered.experts.end_step()
        result = {"eval_loss": loss, "ppl": math.exp(min(loss, 50.0))}
        self.log.write("eval", step=self.state.step, **result)
        if self.is_chief:
            self.metadata.setdefault("eval_history", []).append({"step": self.state.step, **result, "time": now()})
            say(f"eval  step {self.state.step:>6d} | eval_loss {loss:.4f} | ppl {result['ppl']:.2f}")
        self.last_eval = result
        return result

    def log_expert_usage(self) -> None:
        for event in self.usage.events():
            self.log.write(event.pop("event"), step=self.state.step, **event)
        self.usage = RoutingLog()

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        tc = self.cfg.train
        self._start()
        if self.state.round_step >= tc.steps:  # resumed at the end of a round: begin a new one
            self._next_round()
        steps_this_run = tc.steps - self.state.round_step
        progress = Progress(steps_this_run)
        if self.eval_data and not self.resumed:
            self.evaluate()  # step-0 baseline
        if self.tiered is not None and not self.resumed:
            self.save_checkpoint({})  # the first flush: a tier failure before the next one replays from here
        metrics: dict[str, float] = {}
        while True:
            try:
                metrics = self.train_step()
                # every worker must take the same branch: one that recovers alone would wait forever
                restarted = self.tiered is not None and self.ctx.any_rank(self.tiered.failed())
            except TierRestarted:
                restarted = True
            if restarted:
                self._recover_store()
                continue
            self.state.step += 1
            self.state.round_step += 1
            self.log.write("train", step=self.state.step, **metrics)
            if self.is_chief and (self.state.step % tc.log_interval == 0 or self.state.round_step == tc.steps):
                progress.update(self.state.step, metrics)
            elif self.is_chief:
                progress.done += 1
            stop = self.ctx.any_rank(Path(self.plan.stop_file).exists())
            end_of_round = self.state.round_step >= tc.steps
            final = stop or (end_of_round and not tc.iterate)
            if self.eval_data and (self.state.step % tc.eval_interval == 0 or final):
                metrics.update(self.evaluate())
            if self.cfg.model.use_moe and (self.state.step % tc.expert_usage_interval == 0 or final):
                self.log_expert_usage()
            if self.tiered is not None and (self.state.step % tc.store_stats_interval == 0 or final):
                self.log.write("store_stats", **self.tiered.stats(self.state.step))
            if self.state.step % tc.checkpoint_interval == 0 or final or end_of_round:
                self.save_checkpoint(metrics)
            if final:
                break
            if end_of_round:
                self._next_round()
                progress = Progress(tc.steps)
        return self._finish(stop, metrics)

    def _recover_store(self) -> None:
        """A tier actor restarted: its unflushed updates are gone. Roll back to the last flush (= the last
        checkpoint) and replay the steps since, which see the same data, schedule and RNG as before."""
        assert self.tiered is not None
        lost_at = self.state.step + 1
        checkpoint = self.bundle.latest_checkpoint()
        counts = self.tiered.recover(_store_snapshot(checkpoint))
        load_model_weights(self.model, checkpoint / MODEL_FILE, skip_experts=True)
        self.load_training_state(checkpoint)
        self.sampler.restore(self.state.sampler)
        replayed = lost_at - self.state.step
        say(f"expert store: a tier actor restarted during step {lost_at}; resumed from the flush at step "
            f"{self.state.step}, replaying {replayed} step(s)")
        self.log.write("store_recovery", step=self.state.step, failed_step=lost_at, steps_replayed=replayed,
                       **counts)

    def _start(self) -> None:
        params = count_parameters(self.model)
        if self.is_chief:
            history = self.metadata.setdefault("dataset_history", [])
            history.append({**self.data.dataset, "steps_start": self.state.step, "steps_end": self.state.step,
                            "started_at": now()})
            self.metadata.setdefault("created_at", now())
            self.metadata["parameters"] = params
            self.bundle.write_header(asdict(self.cfg.model), self.data.tokenizer_json, self.cfg.to_dict())
            say(f"model: {params['total']:,} parameters ({params['active_per_token']:,} active per token); "
                f"{'resuming at step ' + str(self.state.step) if self.resumed else 'fresh start'}; "
                f"{self.ctx.world_size} worker(s) on {self.ctx.device}")
        self.log.write("run_start", step=self.state.step, resumed=self.resumed, parameters=params,
                       world_size=self.ctx.world_size, config=self.cfg.to_dict(), bundle=self.plan.bundle_root)
        reopened = self.tiered.reopened if self.tiered is not None else None
        if reopened is not None and self.is_chief:
            say(f"expert store: resumed at the flush of step {self.state.step}; {reopened['hot_kept']} expert(s) "
                f"still hot at that version were re-mapped, {reopened['hot_dropped']} newer one(s) dropped")
            self.log.write("store_reopen", step=self.state.step, **reopened)
        self.model.train()

    def _next_round(self) -> None:
        self.state.round += 1
        self.state.round_step = 0
        self.sampler.new_round()
        if self.is_chief:
            say(f"--iterate: round {self.state.round} begins on a fresh shuffle")

    def _finish(self, stopped: bool, metrics: dict[str, float]) -> dict[str, Any]:
        if stopped and self.is_chief:
            Path(self.plan.stop_file).unlink(missing_ok=True)  # consumed: the next run is not stopped by it
            say(f"stop file {self.plan.stop_file} found: checkpointed at step {self.state.step} and stopped")
        self.log.write("run_end", step=self.state.step, stopped=stopped, **self.last_eval)
        self.log.close()
        return {"step": self.state.step, "stopped": stopped, **metrics, **self.last_eval}


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  amp: bool) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, labels in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(ids.to(device), labels.to(device))
        total += float(out.lm_loss) * len(ids)
        count += len(ids)
    model.train(was_training)
    return total / count


def train_worker(plan: RunPlan, data: TrainData, ctx: WorkerContext) -> dict[str, Any]:
    """Train from a plan: the function that every entry point (local, Ray Train, Tune) runs."""
    return Trainer(plan, data, ctx).run()
