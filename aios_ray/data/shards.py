"""Prepared datasets: fixed-length token blocks in Parquet shards, a manifest, and the sampler that streams them.

A prepared directory (``aios-ray data prepare``) holds ``manifest.json``, ``tokenizer.json`` and shards
``train-*.parquet`` / ``eval-*.parquet``. A shard is one row group of ``--dataset-chunk-size`` rows; a row is
one block of ``max_seq_len + 1`` int32 token ids (``input_ids = block[:-1]``, ``labels = block[1:]``). Each
shard's Parquet metadata names the tokenizer (its sha256) and the block length, so a shard copied in from
another preparation is refused by name.

``ShardSampler`` has BlockSampler's interface (``next_batch``, ``state``, ``restore``, ``new_round``) and the
same position (epoch, global batch), so the training loop and its checkpoints do not know which one they have.
Its order (``aios_ray.data.stream``) is a function of (seed, epoch) alone: each epoch the shards are permuted and
dealt round robin to the ranks, and each shard's blocks are permuted within it. A resume therefore skips
``batch * batch_size`` blocks by arithmetic over the manifest's block counts (O(shards), nothing read) and goes on.
In a Ray worker the blocks come through a Ray Data stream (``iter_torch_batches``): memory is its prefetch window,
whatever the corpus size; without Ray, the current shard and the one being prefetched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aios_ray.data.dataset import SamplerState
from aios_ray.data.stream import ShardSet, batches_per_rank, local_batches_of, ray_batches, stream_items
from aios_ray.errors import DataError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "aios-ray-token-blocks/1"
COLUMN = "tokens"
META_TOKENIZER = b"aios_ray.tokenizer_sha256"
META_BLOCK_LEN = b"aios_ray.block_len"


def tokenizer_sha256(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


# ---- writing ------------------------------------------------------------------------------------------------


def write_shard(path: Path, blocks: np.ndarray, tokenizer_hash: str) -> dict[str, Any]:
    """One shard: ``blocks`` (n, block_len) int32 as one row group; returns its manifest entry."""
    n, block_len = blocks.shape
    flat = pa.array(np.ascontiguousarray(blocks, dtype=np.int32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, block_len)
    schema = pa.schema([pa.field(COLUMN, column.type)],
                       metadata={META_TOKENIZER: tokenizer_hash.encode(), META_BLOCK_LEN: str(block_len).encode()})
    # No compression codec beyond Parquet's default dictionary-free plain encoding of ints is worth its CPU here:
    # token ids are high-entropy. Snappy (the default) stays: it is cheap and shrinks repeated boilerplate.
    pq.write_table(pa.table([column], schema=schema), path, row_group_size=max(n, 1))
    return {"file": path.name, "blocks": int(n), "bytes": path.stat().st_size}


# ---- the manifest -------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """What ``manifest.json`` says, checked against the shards on disk (``open_prepared``)."""

    root: Path
    raw: dict[str, Any]

    @property
    def block_len(self) -> int:
        return int(self.raw["block_len"])

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.raw["tokenizer_sha256"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        return [s for s in self.raw["shards"] if s["split"] == split]

    def blocks(self, split: str) -> int:
        return sum(int(s["blocks"]) for s in self.shards(split))

    def tokenizer_json(self) -> str:
        return (self.root / TOKENIZER_FILE).read_text(encoding="utf-8")


def read_manifest(root: Path) -> Manifest:
    file = root / MANIFEST
    if not file.is_file():
        raise DataError(f"--data {root}: no {MANIFEST} there (prepare it with `aios-ray data prepare`)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{file}: unreadable manifest ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{file}: not a manifest of `aios-ray data prepare` (format {FORMAT})")
    missing = [k for k in ("block_len", "tokenizer_sha256", "shards", "blocks", "key") if k not in raw]
    if missing:
        raise DataError(f"{file}: manifest lacks {', '.join(missing)}")
    return Manifest(root, raw)


def open_prepared(path_str: str) -> Manifest:
    """The manifest of a prepared directory after checking it against its shards and tokenizer: every listed
    shard present with its size, row count, block length and tokenizer; no shard the manifest does not list.
    Reads only Parquet footers, so the check costs O(shards), not O(corpus)."""
    root = Path(path_str).resolve()
    manifest = read_manifest(root)
    tokenizer = root / TOKENIZER_FILE
    if not tokenizer.is_file() or tokenizer_sha256(manifest.tokenizer_json()) != manifest.tokenizer_sha256:
        raise DataError(f"{tokenizer}: missing or not the tokenizer the manifest names "
                        f"(sha256 {manifest.tokenizer_sha256[:12]})")
    listed = {s["file"] for s in manifest.raw["shards"]}
    extra = sorted(p.name for p in root.glob("*.parquet") if p.name not in listed)
    if extra:
        raise DataError(f"{root / extra[0]}: a shard the manifest does not list (the manifest does not match its "
                        f"shards)")
    if sum(int(s["blocks"]) for s in manifest.raw["shards"]) != int(manifest.raw["blocks"]):
        raise DataError(f"{root / MANIFEST}: its shards' block counts do not add up to its 'blocks'")
    for shard in manifest.raw["shards"]:
        check_shard(root / shard["file"], shard, manifest)
    return manifest


def check_shard(path: Path, entry: dict[str, Any], manifest: Manifest) -> None:
    if not path.is_file():
        raise DataError(f"{path}: listed in the manifest but missing")
    try:
        meta = pq.read_metadata(path)
        schema_meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
    if schema_meta.get(META_TOKENIZER, b"").decode() != manifest.tokenizer_sha256:
        raise DataError(f"{path}: tokenized with another tokenizer (sha256 "
                        f"{schema_meta.get(META_TOKENIZER, b'?').decode()[:12]}, the manifest's is "
                        f"{manifest.tokenizer_sha256[:12]})")
    if schema_meta.get(META_BLOCK_LEN, b"").decode() != str(manifest.block_len):
        raise DataError(f"{path}: blocks of another length than the manifest's {manifest.block_len}")
    if meta.num_rows != int(entry["blocks"]):
        raise DataError(f"{path}: {meta.num_rows} blocks, the manifest says {entry['blocks']}")
    if path.stat().st_size != int(entry["bytes"]):
        raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or "
                        f"replaced)")


def read_blocks(path: Path, block_len: int) -> np.ndarray:
    """A whole shard as (n, block_len) int32."""
    try:
        table = pq.read_table(path, columns=[COLUMN])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
    column = table.column(COLUMN).combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False).reshape(-1, block_len)


def eval_blocks(manifest: Manifest, most: int) -> np.ndarray | None:
    """The first ``most`` eval blocks in manifest order (the same every evaluation), or None without any."""
    taken: list[np.ndarray] = []
    count = 0
    for shard in manifest.shards("eval"):
        if count >= most:
            break
        blocks = read_blocks(manifest.root / shard["file"], manifest.block_len)[:most - count]
        taken.append(blocks)
        count += len(blocks)
    return np.concatenate(taken) if taken else None


def block_batches(blocks: np.ndarray, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rows = torch.from_numpy(blocks.astype(np.int64))
    return [(chunk[:, :-1], chunk[:, 1:]) for chunk in torch.split(rows, batch_size)]


# ---- streaming ----------------------------------------------------------------------------------------------


class ShardSampler:
    """The training blocks of a prepared directory, streamed shard by shard (see the module docstring): on Ray
    Data (``reader="ray"``, in a Ray worker) or read in process (``reader="local"``), the same batches either way."""

    def __init__(self, manifest: Manifest, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 state: SamplerState | None = None, reader: str = "local") -> None:
        train = manifest.shards("train")
        self.shards = ShardSet(str(manifest.root), tuple(s["file"] for s in train),
                               tuple(int(s["blocks"]) for s in train), manifest.block_len, seed)
        self.counts = np.array(self.shards.counts, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.reader = reader
        self.restore(state or SamplerState())
        if self.batches_per_epoch == 0:
            raise DataError(f"training data too small: {manifest.blocks('train')} blocks in {len(train)} "
                            f"shard(s) give a worker fewer than --batch-size {batch_size} blocks (with "
                            f"{world_size} worker(s))")

    def _per_epoch(self, epoch: int) -> int:
        return batches_per_rank(self.counts, self.seed, epoch, self.world_size, self.batch_size) * self.world_size

    def _open_stream(self) -> None:
        """A stream from the current position: the items that continue it, through the chosen reader."""
        items = stream_items(self.counts, self.seed, self.rank, self.world_size, self.batch_size,
                             self.state.epoch, self.state.batch)
        read = ray_batches if self.reader == "ray" else local_batches_of
        self._stream = read(self.shards, items, self.batch_size)

    def next_batch(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state.batch >= self.batches_per_epoch:
            self.state = SamplerState(self.state.epoch + 1, 0)
            self.batches_per_epoch = self._per_epoch(self.state.epoch)
        batch = next(self._stream, None)
        if batch is None:  # the planned items are used up: plan on from here
            self._open_stream()
            batch = next(self._stream)
        self.state.batch += self.world_size
        return batch[:, :-1], batch[:, 1:]

    def restore(self, state: SamplerState) -> None:
        self.close()
        self.state = SamplerState(state.epoch, state.batch)
        self.batches_per_epoch = self._per_epoch(state.epoch)
        self._open_stream()

    def new_round(self) -> None:
        """--iterate: start the next round on a fresh shuffle."""
        self.restore(SamplerState(self.state.epoch + 1, 0))

    def close(self) -> None:
        """End the current stream (its reads ahead, and on Ray its Ray Data execution)."""
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.close()
            self._stream = None
