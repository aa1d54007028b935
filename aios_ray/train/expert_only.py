"""Expert-only training: ``aios-ray train --expert-id ID --model BASE --dataset-file F [--default-goal TEXT]``.

The base brain is read, never written. The run trains a copy of it with one expert more in every MoE layer (index
``E`` = the base's ``num_experts``): the *expert brain* ``<registry dir>/ID/brain/``, a bundle that ``generate``
and ``eval`` take (for inference: its checkpoints are dropped at the end). Only the new expert's FFN rows and
router rows train (``freeze_all_but_expert``; the optimizer steps them row by row, so every base row keeps its
bits). The same training loop as any run: this module only prepares the plan (weights to start from, the trained
index, the goal bias) and finishes it.

The new expert starts as a copy of each layer's most-used expert on the given data (FFN rows, router row x1.01):
it then gets the tokens its source got from the first step, so it learns at once, and starts from a function the
base already uses for this data; the 1.01 makes it win the tie where its source's logit is positive (its top-k
tokens, in practice). An expert the registry already holds weights for is continued from them instead.

At the end: ``<registry dir>/ID/expert.safetensors`` (the expert's rows per layer plus the base's identity and
shapes in the safetensors metadata), the registry entry with the eval loss on the data of the base alone, of the
base + untrained expert and after training, and, with ``--default-goal``, the goal linked to the expert.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from aios_ray.config import Config, ConfigError
from aios_ray.data.dataset import eval_batches, tokenize_documents
from aios_ray.data.text import read_documents
from aios_ray.data.tokenizer import eos_id, load_tokenizer
from aios_ray.durable import atomic_write_bytes, atomic_write_json
from aios_ray.errors import BundleError, RegistryError
from aios_ray.experts.registry import CHECKPOINT_NAME, ExpertRegistry, utc_now, validate_expert_id
from aios_ray.model.expert_surgery import append_expert, changed_base_tensors, expert_misfit, moe_prefixes, take_expert
from aios_ray.model.hrm import HRMACTv1
from aios_ray.model.moe import MoEFeedForward
from aios_ray.tracking.jsonl import read_metrics
from aios_ray.train.bundle import (
    MODEL_FILE,
    Bundle,
    is_bundle,
    load_model_weights,
    load_tensors,
    read_model_config,
    save_tensors,
)
from aios_ray.train.evaluate import evaluate_loss
from aios_ray.train.goal_routing import ATTACHED_EXPERTS, for_active_goals, goals_at, registry_at
from aios_ray.train.plan import RunPlan, TrainData
from aios_ray.train.prepare import _check_sizes, _describe

EXPERT_FORMAT = "aios-ray-expert/1"
BRAIN_DIR = "brain"  # <registry dir>/<id>/brain: the base + this expert, trained by the run
INIT_FILE = ".init.safetensors"  # the run's starting weights, removed when it ends
ROUTER_TIE_BREAK = 1.01
HELD_OUT = 0.1  # share of the tokens held out for evaluation when no --eval-file is given


@dataclass
class ExpertJob:
    """What the driver knows about an expert-only run, from preparation to the registry entry."""

    expert_id: str
    base_root: Path
    base_sha256: str
    expert_dir: Path
    index: int  # the expert's index in every MoE layer of the expert brain
    eval_tokens: np.ndarray
    losses: dict[str, float]
    init: str  # how the expert started (a copy of which experts, or continued)


# ---- preparation -------------------------------------------------------------------------------------------------

def prepare_expert_run(cfg: Config) -> tuple[RunPlan, TrainData, ExpertJob]:
    """Validate everything, then write only under ``<registry dir>/ID/``: the plan of a fresh run on the brain."""
    tc = cfg.train
    expert_id = validate_expert_id(tc.expert_id)
    base_root = _base_bundle(cfg)
    base_cfg = read_model_config(base_root)
    if not base_cfg.use_moe:
        raise ConfigError(f"--expert-id: the brain {base_root} has no MoE layers to add an expert to")
    registry = registry_at(tc.registry)
    entry = _registry_entry(registry, expert_id)
    goals_at(tc.goals_db).check()  # a goals DB that is not ours fails now, not after the training
    tokenizer = load_tokenizer(str(base_root), "--model")
    base_bytes = (base_root / MODEL_FILE).read_bytes() if (base_root / MODEL_FILE).is_file() else b""
    base = HRMACTv1(base_cfg)
    base_state = _fit_weights(base, base_root / MODEL_FILE)
    prefixes = moe_prefixes(base)
    continued = _continued_expert(registry, entry, base_state, prefixes)

    train_docs = read_documents(tc.dataset_file, "--dataset-file", tc.ascii_only)
    eos = eos_id(tokenizer)
    train_tokens = tokenize_documents(tokenizer, train_docs, eos)
    if tc.eval_file:
        eval_tokens = tokenize_documents(tokenizer, read_documents(tc.eval_file, "--eval-file", tc.ascii_only), eos)
    else:  # the held-out tail of the expert's own data
        held = max(int(len(train_tokens) * HELD_OUT), base_cfg.max_seq_len + 1)
        train_tokens, eval_tokens = train_tokens[:-held], train_tokens[-held:]
    model_cfg = dataclasses.replace(base_cfg, num_experts=base_cfg.num_experts + 1)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    _check_sizes(cfg, train_tokens, eval_tokens)

    batches = eval_batches(eval_tokens, base_cfg.max_seq_len, tc.batch_size, max(tc.eval_batches, 1))
    losses = {"eval_loss_base": evaluate_loss(base, batches, torch.device("cpu"), tc.amp)}
    if continued is None:
        sources = most_used_experts(base, eval_batches(train_tokens, base_cfg.max_seq_len, tc.batch_size, 4))
        expert = take_expert(base_state, prefixes, sources)
        for i in range(len(prefixes)):
            expert[f"layers.{i}.router"] *= ROUTER_TIE_BREAK
        init = f"copy of the most-used expert per MoE layer {sources}"
    else:
        expert, init = continued, "continued from its expert.safetensors"
    start = append_expert(base_state, prefixes, expert)
    grown = HRMACTv1(model_cfg)
    grown.load_state_dict(start)
    losses["eval_loss_before"] = evaluate_loss(grown, batches, torch.device("cpu"), tc.amp)

    expert_dir = registry.expert_dir(expert_id)
    brain_root = (expert_dir / BRAIN_DIR).resolve()
    if brain_root.exists():  # the previous run's expert brain: this run rebuilds it from the base
        shutil.rmtree(brain_root)
    brain_root.mkdir(parents=True)
    init_file = expert_dir / INIT_FILE
    save_tensors(init_file, start)
    base_meta = Bundle(base_root).metadata()
    attached = {**base_meta.get(ATTACHED_EXPERTS, {}), expert_id: base_cfg.num_experts}
    metadata = {"name": f"{base_meta.get('name', base_root.name)}+{expert_id}", "base_model": str(base_root),
                ATTACHED_EXPERTS: attached}
    plan = RunPlan(
        config=cfg, bundle_root=str(brain_root),
        log_file=str(Path(tc.log_file).resolve()) if tc.log_file else str(brain_root / "metrics.jsonl"),
        stop_file=str(Path(tc.stop_file).resolve()) if tc.stop_file else str(brain_root / "STOP"),
        metadata=metadata, run_id=hashlib.sha256(f"{expert_id}{utc_now()}".encode()).hexdigest()[:32],
        init_weights=str(init_file.resolve()), expert_index=base_cfg.num_experts,
        goal_bias=for_active_goals(tc.goal_bias_strength, tc.goals_db, attached, model_cfg.num_experts,
                                   also={expert_id: base_cfg.num_experts}))
    data = TrainData(train_tokens, eval_tokens, tokenizer.to_str(),
                     _describe(tc.dataset_file, train_docs, train_tokens, tc.eval_file))
    job = ExpertJob(expert_id, base_root, hashlib.sha256(base_bytes).hexdigest(), expert_dir, base_cfg.num_experts,
                    eval_tokens, losses, init)
    return plan, data, job


def _base_bundle(cfg: Config) -> Path:
    tc = cfg.train
    if tc.default_goal is not None and not tc.default_goal.strip():
        raise ConfigError("--default-goal is empty")
    if not tc.model:
        raise ConfigError("--expert-id needs --model BUNDLE: the base brain the expert joins")
    if not tc.dataset_file:
        raise ConfigError("--expert-id needs --dataset-file: the text the expert is trained on")
    root = Path(tc.model)
    if not root.is_dir() or not is_bundle(root):
        raise BundleError(f"--model {tc.model}: not a brain bundle (config.json and metadata.json expected)")
    for flag, refused in (("--tokenizer", tc.tokenizer), ("--experts tiered", cfg.store.tiered),
                          ("--parallel-independent", cfg.cluster.parallel_independent),
                          (f"--zero-stage {cfg.cluster.zero_stage}", cfg.cluster.zero_stage != "none")):
        if refused:
            raise ConfigError(f"--expert-id with {flag}: expert-only training keeps the base brain's tokenizer and "
                              "trains one local expert")
    return root.resolve()


def _registry_entry(registry: ExpertRegistry, expert_id: str) -> dict[str, Any] | None:
    if expert_id not in registry.ids():  # also reads (and so checks) the registry file
        return None
    entry = registry.get(expert_id)
    if entry["is_frozen"]:
        raise RegistryError(f"expert {expert_id!r} is frozen: `aios-ray experts unfreeze {expert_id}` to train it")
    return entry


def _fit_weights(model: HRMACTv1, path: Path) -> dict[str, torch.Tensor]:
    """Load a bundle's weights into ``model`` (BundleError if they do not fit) and return them."""
    load_model_weights(model, path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _continued_expert(registry: ExpertRegistry, entry: dict[str, Any] | None, base_state: dict[str, torch.Tensor],
                      prefixes: list[str]) -> dict[str, torch.Tensor] | None:
    """The registry expert's weights to continue from (None: it has none yet); refused if they do not fit."""
    if entry is None:
        return None
    path = registry.checkpoint_file(entry["expert_id"])
    if not path.is_file():
        return None
    expert, _ = read_expert(path)
    misfit = expert_misfit(expert, base_state, prefixes)
    if misfit:
        raise BundleError(f"expert {entry['expert_id']!r} ({path}) does not fit this brain: {misfit}")
    return expert


@torch.no_grad()
def most_used_experts(model: HRMACTv1, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Per MoE layer, the expert the most (token, expert) assignments went to on ``batches`` (eval mode)."""
    layers = model.moe_layers()
    counts = [torch.zeros(m.num_experts, dtype=torch.long) for m in layers]

    def counter(i: int):
        def hook(_module: MoEFeedForward, _inputs: Any, output: Any) -> None:
            counts[i] += output[1].token_counts.cpu()
        return hook

    handles = [m.register_forward_hook(counter(i)) for i, m in enumerate(layers)]
    try:
        model.eval()
        for ids, labels in batches:
            model(ids, labels)
    finally:
        for handle in handles:
            handle.remove()
    return [int(c.argmax()) for c in counts]


# ---- the expert file ---------------------------------------------------------------------------------------------

def write_expert(path: Path, expert: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in expert.items()}
    atomic_write_bytes(path, save_safetensors_bytes(cpu, metadata={"format": EXPERT_FORMAT, **metadata}))


def read_expert(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An expert file's tensors and metadata; BundleError (one line) when missing, corrupt or not an expert."""
    if not path.is_file():
        raise BundleError(f"{path}: missing (train the expert first: aios-ray train --expert-id ...)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{path}: corrupt or truncated expert file ({str(exc)[:100]})") from None
    if metadata.get("format") != EXPERT_FORMAT:
        raise BundleError(f"{path}: not an aios-ray expert file (format {metadata.get('format')!r})")
    return tensors, metadata


# ---- the end of the run ------------------------------------------------------------------------------------------

def finish_expert_run(job: ExpertJob, plan: RunPlan, data: TrainData, default_goal: str | None,
                      registry_path: str | None, db: str | None) -> dict[str, Any]:
    """Check the base rows, write the expert file, record the losses in the registry, link the default goal."""
    cfg = plan.config
    brain = HRMACTv1(cfg.model)
    trained = _fit_weights(brain, Path(plan.bundle_root) / MODEL_FILE)
    base = load_tensors(job.base_root / MODEL_FILE)
    prefixes = moe_prefixes(brain)
    changed = changed_base_tensors(trained, base, prefixes)
    if changed:  # a bug, never a user error: the freeze must hold
        raise RuntimeError(f"expert-only training changed base weights: {changed[:3]}")
    batches = eval_batches(job.eval_tokens, cfg.model.max_seq_len, cfg.train.batch_size,
                           max(cfg.train.eval_batches, 1))
    losses = {**job.losses, "eval_loss_after": evaluate_loss(brain, batches, torch.device("cpu"), cfg.train.amp)}
    path = job.expert_dir / CHECKPOINT_NAME
    write_expert(path, take_expert(trained, prefixes, job.index), {
        "expert_id": job.expert_id, "base_model": str(job.base_root), "base_sha256": job.base_sha256,
        "base_num_experts": str(job.index), "num_layers": str(len(prefixes)),
        "hidden_size": str(cfg.model.hidden_size), "ffn_size": str(cfg.model.ffn_size)})
    (job.expert_dir / INIT_FILE).unlink(missing_ok=True)
    _inference_only(Bundle(Path(plan.bundle_root)))
    registry = registry_at(registry_path)
    _record(registry, job, plan, data, losses)
    goal_id = _link_default_goal(goals_at(db, registry), default_goal, job.expert_id)
    return {"expert_file": str(path), "expert_brain": plan.bundle_root, "goal_id": goal_id, **losses}


def _inference_only(brain: Bundle) -> None:
    """The expert brain keeps its weights, not its checkpoints: their optimizer holds only the expert's rows, so
    resuming it as an ordinary run could not work. Without a checkpoint, ``train --model`` on it says so in one
    line; the expert trains on with ``--expert-id``."""
    metadata = brain.metadata()
    metadata.pop("latest_checkpoint", None)
    atomic_write_json(brain.root / "metadata.json", metadata)
    shutil.rmtree(brain.checkpoints, ignore_errors=True)


def _record(registry: ExpertRegistry, job: ExpertJob, plan: RunPlan, data: TrainData,
            losses: dict[str, float]) -> None:
    tc = plan.config.train
    fields = {
        "last_trained": utc_now(),
        "checkpoint_path": f"{job.expert_id}/{CHECKPOINT_NAME}",
        "performance_metrics": {**{k: round(v, 6) for k, v in losses.items()},
                                "eval_tokens": int(len(job.eval_tokens))},
        "training_config": {"base_model": str(job.base_root), "base_sha256": job.base_sha256,
                            "expert_index": job.index, "init": job.init, "steps": tc.steps, "lr": tc.lr,
                            "batch_size": tc.batch_size, "goal_bias_strength": tc.goal_bias_strength},
    }
    dataset = {"dataset": data.dataset["dataset"], "sha256": data.dataset["sha256"],
               "tokens": data.dataset["tokens"], "trained_at": fields["last_trained"]}
    if job.expert_id in registry.ids():
        history = registry.get(job.expert_id)["training_datasets"]
        registry.update(job.expert_id, training_datasets=[*history, dataset], **fields)
    else:
        registry.add(job.expert_id, training_datasets=[dataset], **fields)
    routed, mean_prob = _usage(Path(plan.log_file), job.index)

    def count(entry: dict[str, Any]) -> None:  # under the registry's lock: concurrent runs' counts add up
        entry["total_activations"] += routed
        entry["avg_routing_weight"] = round(mean_prob, 6)

    registry.modify(job.expert_id, count)


def _usage(log_file: Path, index: int) -> tuple[int, float]:
    """(assignments routed to expert ``index``, its mean router probability) over this run's expert_usage events
    (each covers the steps since the one before, so the counts add up to the run's)."""
    logged = read_metrics(log_file) if log_file.is_file() else []
    starts = [i for i, e in enumerate(logged) if e["event"] == "run_start"]  # a --log-file may hold earlier runs
    usage = [e for e in logged[starts[-1] if starts else 0:] if e["event"] == "expert_usage"]
    routed = sum(int(e["token_counts"][index]) for e in usage)
    probs = [float(e["avg_routing_prob"][index]) for e in usage]
    return routed, sum(probs) / len(probs) if probs else 0.0


def _link_default_goal(goals: Any, text: str | None, expert_id: str) -> int | None:
    """Link the goal with this text (added when there is none) to the expert; its id, or None without a goal."""
    if not text:
        return None
    for goal in goals.list():
        if goal.text == text.strip():
            return goals.link_expert(goal.goal_id, expert_id).goal_id
    return goals.add(text, expert_id=expert_id).goal_id


def run_expert_training(cfg: Config) -> tuple[RunPlan, dict[str, Any]]:
    """``train --expert-id``: prepare, run the one training loop, finish."""
    from aios_ray.train.run import run_plan

    plan, data, job = prepare_expert_run(cfg)
    print(f"expert {job.expert_id}: index {job.index} of every MoE layer of {job.base_root.name}, {job.init}; "
          f"{len(data.train_tokens):,} training tokens, {len(job.eval_tokens):,} eval tokens; "
          f"eval_loss base {job.losses['eval_loss_base']:.4f}, with the new expert "
          f"{job.losses['eval_loss_before']:.4f}", flush=True)
    try:
        summary = run_plan(plan, data)
    finally:
        (job.expert_dir / INIT_FILE).unlink(missing_ok=True)
    tc = cfg.train
    summary.update(finish_expert_run(job, plan, data, tc.default_goal, tc.registry, tc.goals_db))
    return plan, summary
