"""Driver-side preparation: every input is read and validated here, before anything is written.

Resolves the tokenizer (a resumed bundle's, a given one, or a BPE trained on the data), tokenises
train and eval text, decides the bundle directory, and checks a bundle to resume by loading it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from aios_ray.config import Config, ConfigError, ModelConfig
from aios_ray.data.dataset import num_blocks, tokenize_documents
from aios_ray.data.text import SAMPLE_EVAL, SAMPLE_TRAIN, read_documents
from aios_ray.data.tokenizer import eos_id, load_tokenizer, train_bpe
from aios_ray.errors import BundleError, DataError
from aios_ray.model.hrm import HRMACTv1
from aios_ray.store.export import count_experts
from aios_ray.train.bundle import MODEL_FILE, Bundle, is_bundle, load_model_weights, read_model_config
from aios_ray.train.goal_routing import ATTACHED_EXPERTS, GoalBias, for_active_goals
from aios_ray.train.independent import check_chunks
from aios_ray.train.plan import RunPlan, TrainData


def prepare_run(cfg: Config) -> tuple[RunPlan, TrainData]:
    tc = cfg.train
    if tc.data or tc.use_chunked_training:  # streamed from Parquet shards: nothing tokenised here
        from aios_ray.train.stream_data import prepare_streamed_run

        return prepare_streamed_run(cfg)
    resume = _resume_bundle(tc.model)
    train_path = tc.dataset_file or str(SAMPLE_TRAIN)
    train_docs = read_documents(train_path, "--dataset-file", tc.ascii_only)
    eval_path = tc.eval_file or (str(SAMPLE_EVAL) if tc.dataset_file is None else None)
    eval_docs = read_documents(eval_path, "--eval-file", tc.ascii_only) if eval_path else None

    if resume is not None:
        if tc.tokenizer:
            raise ConfigError(f"--tokenizer cannot change the tokenizer of the bundle --model {tc.model}")
        tokenizer = load_tokenizer(str(resume.root), "--model")
    else:
        tokenizer = _given_tokenizer(tc.tokenizer, tc.model) or train_bpe(train_docs, tc.tokenizer_vocab_size)
    cfg, bundle_root, checkpoint, metadata = place_bundle(cfg, resume, tokenizer.get_vocab_size())

    eos = eos_id(tokenizer)
    train_tokens = tokenize_documents(tokenizer, train_docs, eos)
    eval_tokens = tokenize_documents(tokenizer, eval_docs, eos) if eval_docs else None
    _check_sizes(cfg, train_tokens, eval_tokens)
    plan = run_plan(cfg, bundle_root, checkpoint, metadata)
    data = TrainData(train_tokens, eval_tokens, tokenizer.to_str(), _describe(train_path, train_docs,
                                                                              train_tokens, eval_path))
    if cfg.cluster.parallel_independent:  # an unreadable or foreign chunk tracker is refused before any write
        check_chunks(cfg, bundle_root, train_tokens, data.dataset["sha256"])
    return plan, data


def place_bundle(cfg: Config, resume: Bundle | None,
                 vocab_size: int) -> tuple[Config, Path, Path | None, dict[str, Any]]:
    """Where the run writes: the bundle it resumes (its model config, newest checkpoint and metadata; both weight
    files checked against the config), or a new bundle that must not exist yet, with ``vocab_size`` tokens. The
    returned config carries the model config, and the store's run-dependent defaults filled in once, here."""
    tc = cfg.train
    if resume is not None:
        model_cfg = read_model_config(resume.root)
        bundle_root, checkpoint = resume.root, resume.latest_checkpoint()
        _check_weights(model_cfg, resume.root / MODEL_FILE)
        _check_weights(model_cfg, checkpoint / MODEL_FILE)
        metadata = resume.metadata()
    else:
        model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_size)
        bundle_root = Path(tc.bundle_dir) / tc.brain_name
        if bundle_root.exists() and any(bundle_root.iterdir()):
            raise ConfigError(f"bundle {bundle_root} already exists: pass --model {bundle_root} to resume it, "
                              f"or choose another --brain-name")
        checkpoint, metadata = None, {"name": tc.brain_name}
    cfg = dataclasses.replace(cfg, model=model_cfg)
    bundle_root = bundle_root.resolve()
    if cfg.store.tiered:
        store = cfg.store.resolved(bundle_root, tc.brain_name, count_experts(model_cfg), cfg.cluster.use_gpu)
        cfg = dataclasses.replace(cfg, store=store)
    return cfg, bundle_root, checkpoint, metadata


def run_plan(cfg: Config, bundle_root: Path, checkpoint: Path | None, metadata: dict[str, Any]) -> RunPlan:
    """The plan of a run placed by ``place_bundle``: log and stop file, what to resume, a fresh run id."""
    tc = cfg.train
    return RunPlan(
        config=cfg,
        bundle_root=str(bundle_root),
        log_file=str(Path(tc.log_file).resolve()) if tc.log_file else str(bundle_root / "metrics.jsonl"),
        stop_file=str(Path(tc.stop_file).resolve()) if tc.stop_file else str(bundle_root / "STOP"),
        resume_from=str(checkpoint) if checkpoint else None,
        metadata=metadata,
        run_id=uuid.uuid4().hex,
        goal_bias=_goal_bias(cfg, metadata),
    )


def _goal_bias(cfg: Config, metadata: dict) -> GoalBias | None:
    """--goal-bias-strength: the bias towards the experts of the active goals that this brain holds."""
    if not cfg.train.goal_bias_strength:
        return None
    if not cfg.model.use_moe:
        raise ConfigError("--goal-bias-strength biases MoE routers: this brain has none (--no-moe)")
    return for_active_goals(cfg.train.goal_bias_strength, cfg.train.goals_db, metadata.get(ATTACHED_EXPERTS, {}),
                            cfg.model.num_experts)


def _resume_bundle(model: str | None) -> Bundle | None:
    if not model:
        return None
    path = Path(model)
    if not path.exists():
        raise BundleError(f"--model {model}: no such bundle or directory")
    return Bundle(path) if is_bundle(path) else None


def _given_tokenizer(tokenizer: str | None, model: str | None) -> Tokenizer | None:
    if tokenizer:
        return load_tokenizer(tokenizer, "--tokenizer")
    if model:  # a local Hugging Face model/tokenizer directory: use its tokenizer
        return load_tokenizer(model, "--model")
    return None


def _check_weights(model_cfg: ModelConfig, path: Path) -> None:
    """Load the weights into a throw-away model: a corrupt file fails here, before anything is written."""
    load_model_weights(HRMACTv1(model_cfg), path)


def _check_sizes(cfg: Config, train_tokens: np.ndarray, eval_tokens: np.ndarray | None) -> None:
    seq_len, batch, workers = cfg.model.max_seq_len, cfg.train.batch_size, cfg.cluster.num_workers
    blocks = num_blocks(train_tokens, seq_len)
    if blocks < batch * workers:
        raise DataError(f"training data too small: {len(train_tokens)} tokens make {blocks} blocks of "
                        f"--max-seq-len {seq_len}, fewer than --batch-size {batch} x {workers} worker(s)")
    if eval_tokens is not None and num_blocks(eval_tokens, seq_len) == 0:
        raise DataError(f"eval data too small: {len(eval_tokens)} tokens for --max-seq-len {seq_len}")


def _describe(path: str, docs: list[str], tokens: np.ndarray, eval_path: str | None) -> dict:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8"))
    return {"dataset": str(Path(path).resolve()), "documents": len(docs), "tokens": int(len(tokens)),
            "sha256": digest.hexdigest(), "eval_file": str(Path(eval_path).resolve()) if eval_path else None}
