"""``aios-ray data prepare``: text -> fixed-length token blocks in Parquet shards + ``manifest.json``.

The driver reads every source once, streaming (sha256, UTF-8 check, cut points): the sources are cut into
pieces of about ``piece_mb`` MiB at document boundaries (a blank line in ``.txt``, a newline in ``.jsonl``, a
row group in ``.parquet``), so no document spans two pieces and bad input fails here, before anything is
written. Ray Data then maps the pieces over the cluster (``map_batches`` on an actor pool, one tokenizer per
actor): each piece is read, tokenized with batched encoding, cut into blocks of ``max_seq_len + 1`` tokens and
written as shards of ``--dataset-chunk-size`` blocks; the last ``eval_fraction`` of each piece's blocks goes to
its eval shard. The shards go to a staging directory that becomes ``--out`` only when the manifest is written,
so a failed run leaves ``--out`` as it was.

The manifest's ``key`` hashes the inputs (source sha256s, tokenizer, block length, chunking, split): a re-run
whose key matches the manifest in ``--out`` does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from aios_ray.data.dataset import tokenize_documents
from aios_ray.data.shards import FORMAT, MANIFEST, TOKENIZER_FILE, open_prepared, tokenizer_sha256, write_shard
from aios_ray.data.text import _jsonl_documents, _txt_documents
from aios_ray.data.tokenizer import eos_id, load_tokenizer, train_bpe
from aios_ray.durable import atomic_write_bytes, atomic_write_json
from aios_ray.errors import DataError, UserError, user_error_behind
from aios_ray.tracking.jsonl import format_seconds, say

SOURCE_SUFFIXES = (".txt", ".jsonl", ".parquet")
READ_STEP = 4 << 20  # bytes read at a time while hashing and cutting a source


@dataclass
class PrepareSpec:
    dataset: str
    out: str
    max_seq_len: int = 128
    chunk_blocks: int = 256  # --dataset-chunk-size: blocks per shard
    tokenizer: str | None = None
    vocab_size: int = 4096
    tokenizer_sample_mb: float = 64.0  # the BPE trained here sees at most this much text
    eval_fraction: float = 0.01
    piece_mb: float = 16.0
    use_ray: bool = True
    address: str | None = None
    concurrency: int | None = None  # tokenizer actors; default: the cluster's CPUs
    cache_root: str | None = None  # instead of out: <cache_root>/<input key> (--use-chunked-training)
    verbose: bool = False  # Ray Data's own log lines too (the command prints its own progress)


@dataclass
class Piece:
    index: int
    path: str
    kind: str  # txt | jsonl | parquet
    start: int  # byte offset (txt, jsonl) or row group (parquet)
    end: int
    size: int  # bytes of text (an estimate for parquet: the row group's uncompressed size)


# ---- the driver: sources, pieces, tokenizer -----------------------------------------------------------------


def source_files(path_str: str) -> list[Path]:
    path = Path(path_str)
    if not path.exists():
        raise DataError(f"--dataset-file {path_str}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
        if not files:
            raise DataError(f"--dataset-file {path_str}: folder holds no .txt, .jsonl or .parquet files")
        return files
    if path.suffix not in SOURCE_SUFFIXES:
        raise DataError(f"--dataset-file {path_str}: expected .txt, .jsonl, .parquet or a folder of them")
    return [path]


def plan_pieces(files: list[Path], piece_bytes: int) -> tuple[list[Piece], list[dict[str, Any]]]:
    """The pieces of every source and each source's sha256, reading each source once."""
    pieces: list[Piece] = []
    sources = []
    for file in files:
        cut = _parquet_pieces if file.suffix == ".parquet" else _text_pieces
        digest = cut(file, piece_bytes, pieces)
        sources.append({"file": str(file.resolve()), "sha256": digest, "bytes": file.stat().st_size})
    return pieces, sources


def _text_pieces(file: Path, piece_bytes: int, pieces: list[Piece]) -> str:
    separators = (b"\n",) if file.suffix == ".jsonl" else (b"\n\n", b"\r\n\r\n")
    digest = hashlib.sha256()
    offset, pending = 0, b""
    try:
        with file.open("rb") as handle:
            while True:
                chunk = handle.read(READ_STEP)
                digest.update(chunk)
                pending += chunk
                while len(pending) >= piece_bytes or (not chunk and pending):
                    cut = _cut_point(pending, separators, piece_bytes) if chunk else len(pending)
                    if cut == 0:
                        break  # no separator yet: read on
                    _check_text(file, offset, pending[:cut])
                    pieces.append(Piece(len(pieces), str(file), file.suffix[1:], offset, offset + cut, cut))
                    offset, pending = offset + cut, pending[cut:]
                if not chunk:
                    break
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    if offset == 0:
        raise DataError(f"{file}: empty file")
    return digest.hexdigest()


def _cut_point(data: bytes, separators: tuple[bytes, ...], piece_bytes: int) -> int:
    """Just after the last separator before ``piece_bytes`` (or after the first one past it); 0: none yet."""
    best = max(data.rfind(sep, 0, piece_bytes) + len(sep) if data.rfind(sep, 0, piece_bytes) >= 0 else 0
               for sep in separators)
    if best:
        return best
    found = [data.find(sep, piece_bytes) for sep in separators]
    found = [i + len(sep) for i, sep in zip(found, separators, strict=True) if i >= 0]
    return min(found) if found else 0


def _check_text(file: Path, offset: int, data: bytes) -> None:
    if b"\0" in data:
        raise DataError(f"{file}: binary file (NUL bytes), expected UTF-8 text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text (invalid byte at offset {offset + exc.start})") from None


def _parquet_pieces(file: Path, piece_bytes: int, pieces: list[Piece]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(file)
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{file}: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
    if "text" not in schema.names or not pa.types.is_string(schema.field("text").type) and \
            not pa.types.is_large_string(schema.field("text").type):
        raise DataError(f"{file}: expected a string column 'text'")
    for group in range(meta.num_row_groups):
        size = meta.row_group(group).total_byte_size
        pieces.append(Piece(len(pieces), str(file), "parquet", group, group + 1, size))
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(READ_STEP), b""):
            digest.update(chunk)
    return digest.hexdigest()


def piece_documents(piece: Piece) -> list[str]:
    if piece.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(piece.path).read_row_group(piece.start, columns=["text"])
        return [t for t in table.column("text").to_pylist() if t and t.strip()]
    with open(piece.path, "rb") as handle:
        handle.seek(piece.start)
        text = handle.read(piece.end - piece.start).decode("utf-8")
    docs = _jsonl_documents(Path(piece.path), text) if piece.kind == "jsonl" else _txt_documents(text)
    return [d for d in docs if d.strip()]


def sample_documents(pieces: list[Piece], budget_bytes: int) -> Iterator[str]:
    """Documents spread over the whole corpus, at most ``budget_bytes`` of text: every k-th piece."""
    total = sum(p.size for p in pieces)
    step = max(1, math.ceil(total / max(budget_bytes, 1)))
    used = 0
    for piece in pieces[::step]:
        for doc in piece_documents(piece):
            if used >= budget_bytes:
                return
            used += len(doc)
            yield doc


def resolve_tokenizer(spec: PrepareSpec, pieces: list[Piece]) -> tuple[Tokenizer, dict[str, Any]]:
    if spec.tokenizer:
        return load_tokenizer(spec.tokenizer, "--tokenizer"), {"source": str(Path(spec.tokenizer).resolve())}
    budget = int(spec.tokenizer_sample_mb * (1 << 20))
    started = time.perf_counter()
    tokenizer = train_bpe(sample_documents(pieces, budget), spec.vocab_size)
    total = sum(p.size for p in pieces)
    say(f"prepare: trained a byte-level BPE ({tokenizer.get_vocab_size()} tokens) on a sample of at most "
        f"{spec.tokenizer_sample_mb:g} MiB of the {total / (1 << 20):.1f} MiB in "
        f"{format_seconds(time.perf_counter() - started)}")
    return tokenizer, {"source": "byte-level BPE trained here", "vocab_size": spec.vocab_size,
                       "sample": f"at most {spec.tokenizer_sample_mb:g} MiB of text, every k-th piece of the corpus"}


def input_key(spec: PrepareSpec, sources: list[dict[str, Any]], tokenizer_spec: str) -> str:
    """What decides the output: a re-run with the same key is a no-op."""
    record = {"format": FORMAT, "sources": [s["sha256"] for s in sources], "tokenizer": tokenizer_spec,
              "block_len": spec.max_seq_len + 1, "chunk_blocks": spec.chunk_blocks,
              "eval_fraction": spec.eval_fraction, "piece_mb": spec.piece_mb}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# ---- one piece: what every Ray Data actor (or the driver with --no-ray) does ---------------------------------


def tokenize_piece(piece: Piece, tokenizer: Tokenizer, block_len: int, chunk_blocks: int, eval_fraction: float,
                   staging: Path, tokenizer_hash: str) -> list[dict[str, Any]]:
    """Tokenize a piece and write its shards; the manifest entries of the shards written."""
    tokens = tokenize_documents(tokenizer, piece_documents(piece), eos_id(tokenizer))
    count = len(tokens) // block_len
    blocks = tokens[:count * block_len].reshape(count, block_len)
    held = math.ceil(count * eval_fraction) if count >= 2 and eval_fraction > 0 else 0
    train, evaluation = blocks[:count - held], blocks[count - held:]
    entries = []
    for k, start in enumerate(range(0, len(train), chunk_blocks)):
        entry = write_shard(staging / f"train-{piece.index:06d}-{k:04d}.parquet", train[start:start + chunk_blocks],
                            tokenizer_hash)
        entries.append({**entry, "split": "train"})
    if held:
        entries.append({**write_shard(staging / f"eval-{piece.index:06d}.parquet", evaluation, tokenizer_hash),
                        "split": "eval"})
    for entry in entries:
        entry["piece"] = piece.index
    # the piece's totals ride on its first entry (or an empty one when the piece made no block)
    first = entries[0] if entries else {"file": "", "blocks": 0, "bytes": 0, "split": "none", "piece": piece.index}
    first.update(text_bytes=piece.size, tokens=int(len(tokens)))
    return entries if entries else [first]


class TokenizePieces:
    """A Ray Data actor: one tokenizer per process, loaded once; one Rayon thread, since Ray runs one actor per
    CPU (a pool per actor would oversubscribe the cores)."""

    def __init__(self, tokenizer_file: str, block_len: int, chunk_blocks: int, eval_fraction: float,
                 staging: str) -> None:
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        tokenizer_json = Path(tokenizer_file).read_text(encoding="utf-8")
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.args = (block_len, chunk_blocks, eval_fraction, Path(staging), tokenizer_sha256(tokenizer_json))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        rows: list[dict[str, Any]] = []
        for values in zip(*(batch[f] for f in Piece.__dataclass_fields__), strict=True):
            piece = Piece(*(v.item() if isinstance(v, np.generic) else v for v in values))
            rows.extend(tokenize_piece(piece, self.tokenizer, *self.args))
        keys = ("file", "blocks", "bytes", "split", "piece", "text_bytes", "tokens")
        out = {k: np.array([r.get(k, 0) for r in rows]) for k in keys}
        out["node"] = np.array([node] * len(rows))
        return out


# ---- the run --------------------------------------------------------------------------------------------------


class PrepareProgress:
    """A line per ~2 s: pieces and MiB done, MiB/s, ETA."""

    def __init__(self, total_bytes: int, total_pieces: int) -> None:
        self.total_bytes, self.total_pieces = total_bytes, total_pieces
        self.bytes = self.pieces = 0
        self.started = self.last = time.perf_counter()

    def add(self, text_bytes: int) -> None:
        self.bytes += text_bytes
        self.pieces += 1
        now = time.perf_counter()
        if now - self.last >= 2.0 or self.pieces == self.total_pieces:
            self.last = now
            rate = self.bytes / max(now - self.started, 1e-9)
            eta = (self.total_bytes - self.bytes) / rate if rate else math.inf
            say(f"prepare: {self.pieces}/{self.total_pieces} pieces | {self.bytes / (1 << 20):,.1f}/"
                f"{self.total_bytes / (1 << 20):,.1f} MiB | {rate / (1 << 20):.1f} MiB/s | ETA {format_seconds(eta)}")


def _run_pieces(spec: PrepareSpec, pieces: list[Piece], tokenizer_json: str, staging: Path,
                progress: PrepareProgress) -> list[dict[str, Any]]:
    block_len = spec.max_seq_len + 1
    if not spec.use_ray:
        tokenizer = Tokenizer.from_str(tokenizer_json)
        digest = tokenizer_sha256(tokenizer_json)
        rows = []
        for piece in pieces:
            entries = tokenize_piece(piece, tokenizer, block_len, spec.chunk_blocks, spec.eval_fraction, staging,
                                     digest)
            progress.add(piece.size)
            rows.extend(entries)
        return rows
    return _run_on_ray_data(spec, pieces, tokenizer_json, staging, progress)


def _run_on_ray_data(spec: PrepareSpec, pieces: list[Piece], tokenizer_json: str, staging: Path,
                     progress: PrepareProgress) -> list[dict[str, Any]]:
    import ray

    from aios_ray.train.ray_train import ensure_ray, quiet_ray_data_logs

    ensure_ray(spec.address)
    if not spec.verbose:
        quiet_ray_data_logs()
    actors = spec.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    items = [asdict(p) for p in pieces]
    # the actors read the tokenizer from the staging directory (every node sees it): a few MB of JSON as a
    # constructor argument would sit in the object store for the actors' lifetime
    tokenizer_file = staging / TOKENIZER_FILE
    atomic_write_bytes(tokenizer_file, tokenizer_json.encode("utf-8"))
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        TokenizePieces, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(actors, len(items))), num_cpus=1,
        fn_constructor_kwargs={"tokenizer_file": str(tokenizer_file), "block_len": spec.max_seq_len + 1,
                               "chunk_blocks": spec.chunk_blocks, "eval_fraction": spec.eval_fraction,
                               "staging": str(staging)})  # Ray Data spreads the actors over the nodes
    rows = []
    try:
        for row in dataset.iter_rows():
            rows.append(dict(row))
            if "text_bytes" in row and int(row["text_bytes"]):
                progress.add(int(row["text_bytes"]))
    except Exception as exc:
        user = user_error_behind(exc)
        if user is not None:
            raise user from None
        raise
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in rows]


def prepare_dataset(spec: PrepareSpec) -> dict[str, Any]:
    """Prepare ``spec.dataset`` into ``spec.out``; returns a summary (``"skipped": True`` for a no-op)."""
    _check_spec(spec)
    files = source_files(spec.dataset)
    pieces, sources = plan_pieces(files, max(int(spec.piece_mb * (1 << 20)), 1))
    given = load_tokenizer(spec.tokenizer, "--tokenizer") if spec.tokenizer else None
    tokenizer_spec = tokenizer_sha256(given.to_str()) if given else (
        f"bpe:{spec.vocab_size}:{spec.tokenizer_sample_mb}")
    key = input_key(spec, sources, tokenizer_spec)
    out = (Path(spec.cache_root) / key[:16] if spec.cache_root else Path(spec.out)).resolve()
    if _already_prepared(out, key):
        say(f"prepare: {out} already holds this preparation (key {key[:12]}): nothing to do")
        return {"out": str(out), "skipped": True, "key": key, **_counts(json.loads((out / MANIFEST).read_text()))}
    started = time.perf_counter()
    tokenizer, tokenizer_info = (given, {"source": str(Path(spec.tokenizer).resolve())}) if given else \
        resolve_tokenizer(spec, pieces)
    tokenizer_json = tokenizer.to_str()
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        progress = PrepareProgress(sum(p.size for p in pieces), len(pieces))
        rows = _run_pieces(spec, pieces, tokenizer_json, staging, progress)
        manifest = _manifest(spec, key, sources, tokenizer_json, tokenizer_info, rows, len(pieces))
        atomic_write_bytes(staging / TOKENIZER_FILE, tokenizer_json.encode("utf-8"))
        atomic_write_json(staging / MANIFEST, manifest)
        _publish(staging, out, key)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    return {"out": str(out), "skipped": False, "key": key, "seconds": seconds,
            "nodes": len({r.get("node") for r in rows if r.get("node")}), **_counts(manifest)}


def _check_spec(spec: PrepareSpec) -> None:
    if spec.max_seq_len < 1 or spec.chunk_blocks < 1:
        raise UserError("--max-seq-len and --dataset-chunk-size must be >= 1")
    if not 0.0 <= spec.eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {spec.eval_fraction}")
    if spec.tokenizer_sample_mb <= 0 or spec.piece_mb <= 0:
        raise UserError("--tokenizer-sample-mb and --piece-mb must be > 0")
    if not spec.tokenizer and spec.vocab_size < 260:
        raise UserError(f"--tokenizer-vocab-size must be >= 260 (256 bytes + specials), got {spec.vocab_size}")


def _already_prepared(out: Path, key: str) -> bool:
    """True when ``out`` holds this preparation (checked against its shards); an error when it holds anything
    else, since nothing is overwritten."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not (out / MANIFEST).is_file():
        raise DataError(f"--out {out}: exists and is not a prepared dataset; choose another --out")
    manifest = open_prepared(str(out))  # a damaged preparation is said, not overwritten
    if manifest.raw["key"] != key:
        raise DataError(f"--out {out}: holds a preparation of other inputs (key {manifest.raw['key'][:12]}); "
                        f"choose another --out")
    return True


def _manifest(spec: PrepareSpec, key: str, sources: list[dict[str, Any]], tokenizer_json: str,
              tokenizer_info: dict[str, Any], rows: list[dict[str, Any]], pieces: int) -> dict[str, Any]:
    shards = sorted(({k: r[k] for k in ("file", "blocks", "bytes", "split")} for r in rows if r["file"]),
                    key=lambda s: s["file"])
    return {
        "format": FORMAT, "key": key, "block_len": spec.max_seq_len + 1, "max_seq_len": spec.max_seq_len,
        "chunk_blocks": spec.chunk_blocks, "dtype": "int32",
        "tokenizer_sha256": tokenizer_sha256(tokenizer_json), "tokenizer": tokenizer_info,
        "vocab_size": Tokenizer.from_str(tokenizer_json).get_vocab_size(),
        "sources": sources, "pieces": pieces, "tokens": int(sum(int(r.get("tokens", 0)) for r in rows)),
        "blocks": int(sum(s["blocks"] for s in shards)),
        "split": {"train_blocks": int(sum(s["blocks"] for s in shards if s["split"] == "train")),
                  "eval_blocks": int(sum(s["blocks"] for s in shards if s["split"] == "eval")),
                  "eval_fraction": spec.eval_fraction, "how": "the last blocks of every piece"},
        "shards": shards,
    }


def _counts(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"blocks": manifest["blocks"], "train_blocks": manifest["split"]["train_blocks"],
            "eval_blocks": manifest["split"]["eval_blocks"], "shards": len(manifest["shards"]),
            "tokens": manifest["tokens"]}


def _publish(staging: Path, out: Path, key: str) -> None:
    """The staging directory becomes ``out`` in one rename (``out`` was absent or empty). Two runs preparing the
    same inputs at once (autotune trials with --use-chunked-training): the second finds the first's and drops
    its own."""
    with contextlib.suppress(OSError):
        out.rmdir()  # empty: replaced below; not empty: another run published meanwhile
    try:
        os.replace(staging, out)
    except OSError:
        if not _already_prepared(out, key):
            raise
        shutil.rmtree(staging, ignore_errors=True)
