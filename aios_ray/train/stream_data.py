"""Training from prepared Parquet shards (``--data DIR``, or ``--use-chunked-training`` on ``--dataset-file``).

The driver checks the prepared directory (manifest against shards, tokenizer against a resumed bundle, block
length against ``--max-seq-len``) before anything is written, and ships the workers only the directory's path:
each worker streams its own shards (``aios_ray.data.shards.ShardSampler``), so no process holds the corpus.
The training loop is the one every run uses; only its sampler differs (``training_sampler``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aios_ray.config import Config, ConfigError
from aios_ray.data.dataset import BlockSampler, SamplerState, tokenize_documents
from aios_ray.data.prepare_shards import PrepareSpec, prepare_dataset
from aios_ray.data.shards import Manifest, ShardSampler, eval_blocks, open_prepared, read_manifest
from aios_ray.data.stream import batches_per_rank
from aios_ray.data.text import SAMPLE_TRAIN, read_documents
from aios_ray.data.tokenizer import eos_id, load_tokenizer
from aios_ray.errors import DataError
from aios_ray.tracking.jsonl import say
from aios_ray.train.plan import RunPlan, TrainData


def streams(cfg: Config) -> bool:
    return bool(cfg.train.data or cfg.train.use_chunked_training)


def first_micro_batch(cfg: Config) -> int:
    """--chunk-size: a streamed run's batch runs in micro-batches of at most that many tokens."""
    tc = cfg.train
    if not streams(cfg):
        return tc.batch_size
    return max(1, min(tc.batch_size, tc.chunk_size // cfg.model.max_seq_len))


def training_sampler(data: TrainData, seq_len: int, batch_size: int, seed: int, rank: int, world_size: int,
                     state: SamplerState | None, on_ray: bool = False) -> BlockSampler | ShardSampler:
    """The loop's sampler: shards streamed from a prepared directory (through Ray Data in a Ray worker), or
    blocks of the tokens in memory."""
    if data.shards:
        return ShardSampler(read_manifest(Path(data.shards)), batch_size, seed, rank, world_size, state,
                            reader="ray" if on_ray else "local")
    return BlockSampler(data.train_tokens, seq_len, batch_size, seed, rank, world_size, state)


def prepare_streamed_run(cfg: Config) -> tuple[RunPlan, TrainData]:
    """``prepare_run`` for a streamed run: the same plan, data that names the shards instead of holding tokens."""
    from aios_ray.train import prepare as base

    tc = cfg.train
    if cfg.cluster.parallel_independent:
        raise ConfigError("--parallel-independent deals chunks of the tokens in memory: train it with "
                          "--dataset-file, not --data / --use-chunked-training")
    resume = base._resume_bundle(tc.model)
    if resume is not None and tc.tokenizer:
        raise ConfigError(f"--tokenizer cannot change the tokenizer of the bundle --model {tc.model}")
    tokenizer_source = str(resume.root) if resume is not None else tc.tokenizer or (
        tc.model if tc.model else None)
    data_dir = tc.data or _prepare_cached(cfg, tokenizer_source)
    manifest = open_prepared(data_dir)
    tokenizer_json = manifest.tokenizer_json()
    _check_manifest(cfg, manifest, tokenizer_source, data_dir)
    cfg, bundle_root, checkpoint, metadata = base.place_bundle(cfg, resume, int(manifest.raw["vocab_size"]))
    plan = base.run_plan(cfg, bundle_root, checkpoint, metadata)
    data = TrainData(np.zeros(0, dtype=np.int32), _eval_tokens(cfg, manifest, tokenizer_json), tokenizer_json,
                     _describe(manifest), shards=str(manifest.root))
    return plan, data


def _prepare_cached(cfg: Config, tokenizer: str | None) -> str:
    """--use-chunked-training on --dataset-file: prepare once into a directory named by the inputs' hash."""
    tc = cfg.train
    cache = Path(tc.bundle_dir).resolve().parent / "datasets"
    spec = PrepareSpec(dataset=tc.dataset_file or str(SAMPLE_TRAIN), out="", cache_root=str(cache),
                       max_seq_len=cfg.model.max_seq_len, chunk_blocks=cfg.cluster.dataset_chunk_size,
                       tokenizer=tokenizer, vocab_size=tc.tokenizer_vocab_size, use_ray=cfg.cluster.use_ray,
                       address=cfg.cluster.address, verbose=cfg.cluster.verbose)
    summary = prepare_dataset(spec)
    say(f"--use-chunked-training: streaming from {summary['out']} ({summary['train_blocks']:,} blocks)")
    return summary["out"]


def _check_manifest(cfg: Config, manifest: Manifest, tokenizer_source: str | None, data_dir: str) -> None:
    tc, seq_len = cfg.train, cfg.model.max_seq_len
    if manifest.block_len != seq_len + 1:
        raise DataError(f"--data {data_dir}: prepared for --max-seq-len {manifest.block_len - 1}, this run has "
                        f"{seq_len} (prepare again with --max-seq-len {seq_len})")
    if tokenizer_source is not None:
        from aios_ray.data.shards import tokenizer_sha256

        mine = tokenizer_sha256(load_tokenizer(tokenizer_source, "--tokenizer").to_str())
        if mine != manifest.tokenizer_sha256:
            raise DataError(f"--data {data_dir}: tokenized with another tokenizer than {tokenizer_source}'s "
                            f"(sha256 {manifest.tokenizer_sha256[:12]} vs {mine[:12]})")
    counts = np.array([int(s["blocks"]) for s in manifest.shards("train")], dtype=np.int64)
    workers = cfg.cluster.num_workers
    if len(counts) < workers or batches_per_rank(counts, tc.seed, 0, workers, tc.batch_size) == 0:
        raise DataError(f"training data too small: {int(counts.sum())} blocks in {len(counts)} shard(s) give a "
                        f"worker fewer than --batch-size {tc.batch_size} blocks with {workers} worker(s) (a worker "
                        f"streams whole shards: prepare with a smaller --dataset-chunk-size)")


def _eval_tokens(cfg: Config, manifest: Manifest, tokenizer_json: str) -> np.ndarray | None:
    """--eval-file when given (tokenized here: it is small), else the manifest's held-out blocks; the blocks of a
    piece are consecutive, so laid end to end they are the piece's token stream again."""
    tc = cfg.train
    if tc.eval_file:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)
        return tokenize_documents(tokenizer, read_documents(tc.eval_file, "--eval-file", tc.ascii_only),
                                  eos_id(tokenizer))
    if not tc.eval_batches:
        return None
    blocks = eval_blocks(manifest, tc.eval_batches * tc.batch_size)
    return None if blocks is None else blocks.reshape(-1)


def _describe(manifest: Manifest) -> dict[str, Any]:
    raw = manifest.raw
    return {"dataset": str(manifest.root), "prepared": True, "tokens": int(raw["tokens"]),
            "train_blocks": int(raw["split"]["train_blocks"]), "sha256": raw["key"],
            "sources": len(raw["sources"]), "eval_file": None}
