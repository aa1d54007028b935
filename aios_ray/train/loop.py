"""The one training function: local runs and Ray Train workers call ``train_worker``.

Per optimizer step (nanoGPT shape): schedule -> micro-batches (forward, backward) -> clip -> step
-> log -> stop file? -> eval / expert usage / checkpoint when due. Where the experts live is the
expert backend's business (``aios_ray.store.backend``): the loop calls it at the same points whatever
it is. Ray is reached only through the ``WorkerContext`` passed in, so this module never imports ray.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from aios_ray.data.dataset import eval_batches
from aios_ray.model.expert_surgery import freeze_all_but_expert
from aios_ray.model.hrm import HRMACTv1, count_parameters
from aios_ray.model.routing_log import RoutingLog
from aios_ray.store.backend import ExpertBackend, ResumePoint, open_backend
from aios_ray.tracking.jsonl import MetricsLog, Progress, say
from aios_ray.tracking.wandb_mirror import with_wandb
from aios_ray.train.bundle import MODEL_FILE, Bundle, load_model_weights, now
from aios_ray.train.checkpointing import (
    TrainerState,
    checkpoint_experts,
    checkpoint_files,
    checkpoint_step,
    expert_records,
    load_training_state,
    resume_source,
    store_snapshot,
)
from aios_ray.train.context import WorkerContext
from aios_ray.train.evaluate import evaluate_loss
from aios_ray.train.independent import IndependentWorker, own_checkpoint
from aios_ray.train.optim import build_optimizer, lr_at
from aios_ray.train.plan import RunPlan, TrainData
from aios_ray.train.stream_data import first_micro_batch, training_sampler
from aios_ray.train.zero import DEEPSPEED_DIR, open_zero, optimizer_to_restore


class BackendRestarted(RuntimeError):
    """A part of the expert backend (a tier actor of the store) restarted during a step: replay the step."""


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
        self.state = TrainerState(micro_batch=first_micro_batch(self.cfg))
        self.bundle = Bundle(Path(plan.bundle_root))
        with self.ctx.restored_checkpoint() as ray_checkpoint:
            source = resume_source(ray_checkpoint, self.bundle, plan.run_id, plan.resume_from,
                                   agree=ctx.min_over_ranks)
            # --parallel-independent: each worker resumes its own copy (its weights, optimizer and RNG)
            own = own_checkpoint(source, ctx.rank) if self.cfg.cluster.parallel_independent else source
            if own is not None:
                load_model_weights(self.model, own / MODEL_FILE)  # complete weights, experts included
            elif plan.init_weights:  # expert-only training: the base brain + the new expert
                load_model_weights(self.model, Path(plan.init_weights))
            if plan.expert_index is not None:  # expert-only training: every other weight is frozen
                freeze_all_but_expert(self.model, plan.expert_index)
            if plan.goal_bias is not None:  # goal-aware routing (run state, never saved with the weights)
                self.model.set_expert_bias(plan.goal_bias.vector().to(ctx.device))
            self.experts: ExpertBackend = open_backend(
                self.model, self.cfg.store, ctx.open_expert_store, weight_decay=tc.weight_decay,
                keep_checkpoints=tc.keep_checkpoints, workers=ctx.workers(self.cfg.store),
                resume=ResumePoint(source is not None, store_snapshot(source), expert_records(source)))
            self.optimizer = build_optimizer(self.model, tc)
            if own is not None:
                restored = optimizer_to_restore(own, self.optimizer, self.cfg, chief=self.is_chief)
                self.state = load_training_state(own, restored, ctx.device, tc.batch_size)
            self.independent = IndependentWorker(
                self.model, self.cfg, data.train_tokens, data.dataset.get("sha256", ""), self.bundle.root, source,
                ctx.rank, ctx.world_size) if self.cfg.cluster.parallel_independent else None
        self.resumed = source is not None
        self.parameters = count_parameters(self.model)  # before ZeRO-3 partitions the parameters away
        # --zero-stage: a DeepSpeed engine takes the model and the optimizer's step (None without it)
        self.zero = open_zero(self.model, self.optimizer, self.cfg, ctx.device, ctx.rank, ctx.world_size, source)
        # --parallel-independent exchanges no gradients: no DDP wrap, and each worker draws from its own chunks
        self.train_model = self.model if self.independent else self.zero.engine if self.zero \
            else ctx.wrap_model(self.model)
        self.sampler = self.independent.sampler if self.independent else training_sampler(
            data, self.cfg.model.max_seq_len, tc.batch_size, tc.seed, ctx.rank, ctx.world_size,
            self.state.sampler, on_ray=self.cfg.cluster.use_ray)
        self.eval_data = (eval_batches(data.eval_tokens, self.cfg.model.max_seq_len, tc.batch_size,
                                       tc.eval_batches) if data.eval_tokens is not None and tc.eval_batches
                          else [])
        self.metadata = dict(plan.metadata)
        publish = with_wandb(ctx.publish, self.cfg.tracking, Path(plan.log_file), self.cfg.train.brain_name)
        self.log = MetricsLog(Path(plan.log_file), publish=publish) if self.is_chief else MetricsLog(None)
        if self.resumed:
            self._rewind_log(source, "resumed from a checkpoint")
        self.usage = RoutingLog()
        self.last_eval: dict[str, float] = {}

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        path = None
        self.state.sampler = self.sampler.state
        experts = checkpoint_experts(self.experts, self.state)  # every worker: each node's store snapshots
        # every worker: ZeRO-3 gathers the weights, each rank writes its optimizer partition
        zero = self.zero.snapshot(self.bundle.checkpoints, self.state.step) if self.zero else None
        if self.is_chief or self.independent:
            files = checkpoint_files(self.model, self.optimizer, self.state, experts, self.ctx.device,
                                     self.plan.run_id, zero=zero)
        if self.independent:  # every worker's own state goes into the checkpoint as well (workers/rank_<r>/)
            self.independent.stage(files)
            self.ctx.any_rank(False)  # a barrier: every worker has staged its state before the chief collects
        if self.is_chief:
            if self.independent:
                files.update(self.independent.collect())
            path = self.bundle.write_checkpoint(self.state.step, files, self.cfg.train.keep_checkpoints,
                                                moved={DEEPSPEED_DIR: zero.staged} if zero else None)
            self.metadata["total_steps"] = self.state.step
            self.metadata["dataset_history"][-1]["steps_end"] = self.state.step
            self.bundle.publish(path, self.metadata)
            if self.independent:  # chunks count as finished once a published checkpoint holds their training
                self.independent.record(path)
            self.log.write("checkpoint", step=self.state.step, path=str(path))
        self.ctx.report({**metrics, "step": self.state.step}, path)

    def _rewind_log(self, checkpoint: Path, why: str) -> None:
        """Steps after the checkpoint will be run again: their lines go, so the log holds each step once."""
        step = checkpoint_step(checkpoint)
        dropped, last_logged = self.log.rewind(step)
        if dropped:
            self.log.write("restart", step=step, reason=why, checkpoint=str(checkpoint),
                           last_logged_step=last_logged, steps_replayed=last_logged - step, lines_replaced=dropped)
            if self.is_chief:
                say(f"restart: {why} at step {step} ({checkpoint}); steps {step + 1}..{last_logged} run again")

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
        if self.zero:  # the engine's own gradient buffers (ZeRO-2/3 partitions) hold the failed micro-batches' too
            self.zero.zero_grad()
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
        self.experts.begin_step()
        try:
            sums = self._forward_backward(batches, total_sequences)
            self.experts.after_backward()  # experts the model does not own are averaged here, not by DDP
            if self.zero:  # DeepSpeed clips (its gradient_clipping is --grad-clip) and steps the partitions
                grad_norm = self.zero.step()
            else:
                params = list(self.model.parameters()) + self.experts.parameters()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or math.inf)
                self.optimizer.step()
            self.experts.step(lr)  # the same AdamW arithmetic for the experts the backend holds
        except BaseException as exc:
            self.experts.abort_step()
            if self.experts.failed():  # a tier actor restarted under this step
                raise BackendRestarted(str(exc)[:200]) from exc
            raise
        self.experts.end_step(self.state.step + 1)
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
            # (DeepSpeed's engine has a no_sync that ZeRO-2/3 refuse: under ZeRO the boundary says when to reduce)
            sync = contextlib.nullcontext() if last or self.zero or not hasattr(self.train_model, "no_sync") \
                else self.train_model.no_sync()
            with sync:
                with self._autocast():
                    out = self.train_model(ids.to(device), labels.to(device))
                scale = len(ids) / total_sequences
                if self.zero:
                    self.zero.backward(out.loss * scale, last)
                else:
                    (out.loss * scale).backward()
            for key, value in (("train_loss", out.loss), ("lm_loss", out.lm_loss), ("q_loss", out.q_loss),
                               ("lb_loss", out.lb_loss)):
                sums[key] += float(value.detach()) * scale
            sums["halt"] += float(out.halt_steps.sum())
            usage.merge_usage(out.routing)
        self.usage.merge_usage(usage)
        if self.independent:  # the merge weighs each worker's copy of an expert by the tokens it routed there
            self.independent.count_routed(usage)
        return sums

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.amp)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over the fixed eval batches, every ACT segment run."""
        with self.experts.evaluating():
            loss = evaluate_loss(self.model, self.eval_data, self.ctx.device, self.cfg.train.amp)
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
        progress = Progress(tc.steps - self.state.round_step)
        if self.eval_data and not self.resumed:
            self.evaluate()  # step-0 baseline
        if self.experts.needs_first_checkpoint and not self.resumed:
            self.save_checkpoint({})  # the first flush: a backend failure before the next one replays from here
        metrics: dict[str, float] = {}
        while True:
            metrics = self._step_or_recover()
            if not metrics:
                continue
            self.state.step += 1
            self.state.round_step += 1
            self.log.write("train", step=self.state.step, **metrics)
            self._show_progress(progress, metrics)
            stop = self.ctx.any_rank(Path(self.plan.stop_file).exists())
            end_of_round = self.state.round_step >= tc.steps
            final = stop or (end_of_round and not tc.iterate)
            self._after_step(metrics, final, end_of_round)
            if final:
                break
            if end_of_round:
                self._next_round()
                progress = Progress(tc.steps)
        return self._finish(stop, metrics)

    def _step_or_recover(self) -> dict[str, float]:
        """One optimizer step; {} when the backend failed under it and the run went back to a checkpoint."""
        try:
            metrics = self.train_step()
            # every worker must take the same branch: one that recovers alone would wait forever
            if not self.ctx.any_rank(self.experts.failed()):
                return metrics
        except BackendRestarted:
            pass
        self._recover_backend()
        return {}

    def _show_progress(self, progress: Progress, metrics: dict[str, float]) -> None:
        if not self.is_chief:
            return
        if self.state.step % self.cfg.train.log_interval == 0 or self.state.round_step == self.cfg.train.steps:
            progress.update(self.state.step, metrics)
        else:
            progress.done += 1

    def _after_step(self, metrics: dict[str, float], final: bool, end_of_round: bool) -> None:
        """Evaluation, expert usage, store counters and checkpoints, each when it is due."""
        tc, step = self.cfg.train, self.state.step
        if self.eval_data and (step % tc.eval_interval == 0 or final):
            metrics.update(self.evaluate())
        if self.cfg.model.use_moe and (step % tc.expert_usage_interval == 0 or final):
            self.log_expert_usage()
        if step % self.cfg.store.stats_interval == 0 or final:
            stats = self.experts.stats(step)
            if stats is not None:
                self.log.write("store_stats", **stats)
        if step % tc.checkpoint_interval == 0 or final or end_of_round:
            self.save_checkpoint(metrics)

    def _recover_backend(self) -> None:
        """A tier actor restarted: its unflushed updates are gone. Roll back to the last flush (= the last
        checkpoint) and replay the steps since, which see the same data, schedule and RNG as before."""
        lost_at = self.state.step + 1
        checkpoint = self.bundle.latest_checkpoint()
        counts = self.experts.recover(store_snapshot(checkpoint))
        load_model_weights(self.model, checkpoint / MODEL_FILE, skip_experts=True)
        self.state = load_training_state(checkpoint, self.optimizer, self.ctx.device, self.cfg.train.batch_size)
        self.sampler.restore(self.state.sampler)
        replayed = lost_at - self.state.step
        say(f"expert store: a tier actor restarted during step {lost_at}; resumed from the flush at step "
            f"{self.state.step}, replaying {replayed} step(s)")
        self._rewind_log(checkpoint, "an expert store tier restarted")
        self.log.write("store_recovery", step=self.state.step, failed_step=lost_at, steps_replayed=replayed,
                       **counts)

    def _start(self) -> None:
        params = self.parameters
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
        if self.independent:
            self.independent.announce(self.log, self.state.step)
        if self.plan.goal_bias is not None:
            self._announce_goal_bias()
        reopened = self.experts.reopened()
        if reopened is not None:  # said by each node's store leader: with several nodes, each has its story
            where = f"[rank {self.ctx.rank}] " if self.ctx.world_size > 1 else ""
            if "rebuilt_from_checkpoint" in reopened:
                say(f"{where}expert store: this node had none; rebuilt from the records of the step "
                    f"{self.state.step} checkpoint ({reopened['rebuilt_from_checkpoint']} experts)")
            else:
                say(f"{where}expert store: resumed at the flush of step {self.state.step}; {reopened['hot_kept']} "
                    f"expert(s) still hot at that version were re-mapped, {reopened['hot_dropped']} newer one(s) "
                    "dropped")
            self.log.write("store_reopen", step=self.state.step, **reopened)
        self.model.train()

    def _announce_goal_bias(self) -> None:
        bias = self.plan.goal_bias
        assert bias is not None
        self.log.write("goal_bias", step=self.state.step, **bias.event())
        if self.is_chief:
            held = ", ".join(f"{e} (expert {i})" for e, i in sorted(bias.experts.items())) or "none in this brain"
            say(f"goal bias {bias.strength:+g} on the router logits of {held}"
                + (f"; linked but not in this brain: {', '.join(bias.not_in_brain)}" if bias.not_in_brain else ""))

    def _next_round(self) -> None:
        self.state.round += 1
        self.state.round_step = 0
        self.sampler.new_round()
        if self.is_chief:
            say(f"--iterate: round {self.state.round} begins on a fresh shuffle")

    def _finish(self, stopped: bool, metrics: dict[str, float]) -> dict[str, Any]:
        close_stream = getattr(self.sampler, "close", None)
        if close_stream is not None:  # a streamed run's reads ahead (on Ray, its Ray Data execution) end here
            close_stream()
        if stopped and self.is_chief:
            Path(self.plan.stop_file).unlink(missing_ok=True)  # consumed: the next run is not stopped by it
            say(f"stop file {self.plan.stop_file} found: checkpointed at step {self.state.step} and stopped")
        self.log.write("run_end", step=self.state.step, stopped=stopped, **self.last_eval)
        self.log.close()
        return {"step": self.state.step, "stopped": stopped, **metrics, **self.last_eval}


def train_worker(plan: RunPlan, data: TrainData, ctx: WorkerContext) -> dict[str, Any]:
    """Train from a plan: the function that every entry point (local, Ray Train) runs."""
    return Trainer(plan, data, ctx).run()
