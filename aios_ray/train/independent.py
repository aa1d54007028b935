"""``--parallel-independent``: every worker trains its own copy of the model on its own chunks of the dataset,
with no gradient exchange; at the end the copies are merged into the bundle's model.

Chunks: the training sequences (the ``--max-seq-len`` blocks of the token stream, in data order) are cut into
chunks of ``--dataset-chunk-size``. A pass over the data deals the chunks not yet finished in that pass round
robin by rank; a worker draws its batches from its chunks one after another (each chunk's sequences shuffled by
seed, pass and chunk). Every worker runs the same ``--steps``, so their per-step collectives stay aligned: one
that has drawn every chunk dealt to it starts the next pass (its chunks ``rank::world_size`` of all chunks)
while the others finish theirs.

The chunk tracker (``<bundle>/chunk_tracker_state.json``) records the finished chunks of each pass. Only the
chief writes it, atomically, and only after a checkpoint that holds the training of those chunks is published;
each worker's own state (weights, optimizer, chunk position, the chunks it finished, the tokens it routed to each
expert) goes into that checkpoint under ``workers/rank_<r>/``. A resumed run takes the tracker together with the
finished chunks its checkpoint records, so tracker and weights never disagree: a finished chunk is never trained
again in its pass, and a half-drawn one goes on from where it was (same worker count) or is dealt again from its
start (another worker count). Delete the tracker file to start the chunks afresh.

The merge (on the driver, after the last checkpoint): every parameter and buffer is the plain mean of the
workers' copies, except the experts: expert e of a layer is the mean of the workers' copies of expert e weighted
by the tokens each worker routed to it over the run (plain mean when no worker routed any).
This module is pure Python and torch: no Ray.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aios_ray.config import Config
from aios_ray.data.dataset import SamplerState, block_batch, eval_batches, num_blocks
from aios_ray.durable import atomic_write_bytes, atomic_write_json
from aios_ray.errors import BundleError, DataError
from aios_ray.model.hrm import HRMACTv1, ReasoningModule
from aios_ray.model.moe import MoEFeedForward
from aios_ray.model.routing_log import RoutingLog
from aios_ray.tracking.jsonl import MetricsLog, say
from aios_ray.train.bundle import MODEL_FILE, Bundle, load_tensors, read_json, save_tensors
from aios_ray.train.evaluate import evaluate_loss
from aios_ray.train.plan import RunPlan, TrainData

TRACKER_FILE = "chunk_tracker_state.json"
WORKERS_DIR = "workers"
WORKER_STATE_FILE = "worker_state.json"
TRACKER_VERSION = 1
_EXPERT_KEY = re.compile(r"^(?P<layer>.+\.ffn)\.(?:w_gate_up|w_down)$")


# ---- chunks ------------------------------------------------------------------------------------------------
def count_chunks(blocks: int, chunk_size: int) -> int:
    return -(-blocks // chunk_size)


def deal(chunks: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Round robin: rank r takes the r-th, (r + W)-th, ... of ``chunks``."""
    return list(chunks[rank::world_size])


def tracker_identity(cfg: Config, train_tokens: np.ndarray, dataset_sha256: str) -> dict[str, Any]:
    """What the chunk numbers mean: the same data cut the same way. A tracker of another identity is refused."""
    blocks = num_blocks(train_tokens, cfg.model.max_seq_len)
    return {"dataset_sha256": dataset_sha256, "max_seq_len": cfg.model.max_seq_len,
            "chunk_size": cfg.cluster.dataset_chunk_size, "sequences": blocks,
            "num_chunks": count_chunks(blocks, cfg.cluster.dataset_chunk_size)}


def check_chunks(cfg: Config, bundle_root: Path, train_tokens: np.ndarray, dataset_sha256: str) -> None:
    """Driver, before anything is written: the bundle's tracker is readable and fits this data, and there is
    at least one chunk per worker."""
    identity = tracker_identity(cfg, train_tokens, dataset_sha256)
    ChunkTracker.load(bundle_root / TRACKER_FILE, identity)
    if identity["num_chunks"] < cfg.cluster.num_workers:
        raise DataError(f"--parallel-independent: {identity['sequences']} training sequences make "
                        f"{identity['num_chunks']} chunk(s) of --dataset-chunk-size {cfg.cluster.dataset_chunk_size}, "
                        f"fewer than --num-workers {cfg.cluster.num_workers}")


# ---- the tracker -------------------------------------------------------------------------------------------
@dataclass
class ChunkTracker:
    """Finished chunks per pass. ``epoch`` is the first pass not complete; complete passes are dropped."""

    path: Path
    identity: dict[str, Any]
    epoch: int = 0
    finished: dict[int, set[int]] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return int(self.identity["num_chunks"])

    @classmethod
    def load(cls, path: Path, identity: dict[str, Any]) -> ChunkTracker:
        """The tracker at ``path`` (a fresh one if there is none); a file that cannot be read as a tracker of
        this data raises a one-line BundleError and is left as it is."""
        if not path.exists():
            return cls(path, identity)
        try:
            data = read_json(path)
        except BundleError as exc:  # unreadable: say so in one line, and how to start afresh; the file stays
            raise BundleError(f"{exc}; delete it to start the chunks afresh") from None
        try:
            if data["version"] != TRACKER_VERSION:
                raise ValueError(f"version {data['version']!r}, expected {TRACKER_VERSION}")
            epoch = int(data["epoch"])
            finished = {int(p): {int(c) for c in chunks} for p, chunks in data["finished"].items()}
            written_for = data["identity"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{path}: not a chunk tracker ({exc}); delete it to start the chunks afresh") from None
        if written_for != identity:
            changed = sorted(k for k in set(identity) | set(written_for) if identity.get(k) != written_for.get(k))
            raise BundleError(f"{path}: written for other data or chunking ({', '.join(changed)} differ); delete it "
                              f"to start the chunks afresh")
        tracker = cls(path, identity, epoch, finished)
        tracker._advance()
        return tracker

    def pending(self, pass_index: int) -> list[int]:
        done = self.finished.get(pass_index, set())
        return [c for c in range(self.num_chunks) if c not in done]

    def add(self, done: Iterable[Sequence[int]]) -> int:
        """Record (pass, chunk) pairs as finished; returns how many were new."""
        new = 0
        for pass_index, chunk in done:
            if pass_index < self.epoch:
                continue  # that pass is complete already
            chunks = self.finished.setdefault(int(pass_index), set())
            new += int(chunk) not in chunks
            chunks.add(int(chunk))
        self._advance()
        return new

    def _advance(self) -> None:
        while len(self.finished.get(self.epoch, ())) >= self.num_chunks:
            self.finished.pop(self.epoch, None)
            self.epoch += 1
        for old in [p for p in self.finished if p < self.epoch]:
            del self.finished[old]

    def to_dict(self) -> dict[str, Any]:
        return {"version": TRACKER_VERSION, "identity": self.identity, "epoch": self.epoch,
                "finished": {str(p): sorted(c) for p, c in sorted(self.finished.items())}}

    def save(self) -> None:
        # One writer (the chief), one atomic rename: a reader sees the old tracker or the new one.
        atomic_write_json(self.path, self.to_dict())


# ---- a worker's sampler ------------------------------------------------------------------------------------
@dataclass
class ChunkPosition:
    """Where a worker is in its chunks; saved in its checkpoint state."""

    pass_index: int
    assigned: list[int]
    index: int = 0  # into ``assigned``
    offset: int = 0  # sequences of ``assigned[index]`` drawn
    batches: int = 0  # batches drawn so far (shown as the sampler's position)
    done: list[list[int]] = field(default_factory=list)  # [pass, chunk] finished since this run started


class ChunkSampler:
    """Batches of ``batch_size`` sequences drawn from the worker's chunks in turn; a batch may span two chunks.

    A chunk is finished once its last sequence is drawn; the chief records it in the tracker at the next
    checkpoint (which holds the step that trained it)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, chunk_size: int,
                 rank: int, world_size: int, position: ChunkPosition) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.chunk_size, self.rank, self.world_size = chunk_size, rank, world_size
        self.blocks = num_blocks(tokens, seq_len)
        self.num_chunks = count_chunks(self.blocks, chunk_size)
        if self.num_chunks < world_size:
            raise DataError(f"--parallel-independent: {self.blocks} training sequences make {self.num_chunks} "
                            f"chunk(s) of --dataset-chunk-size {chunk_size}, fewer than {world_size} workers")
        self.position = position

    @property
    def state(self) -> SamplerState:
        """The trainer's data position: here only informative (the chunk position is the worker's own state)."""
        return SamplerState(self.position.pass_index, self.position.batches)

    def chunk_order(self, pass_index: int, chunk: int) -> np.ndarray:
        start = chunk * self.chunk_size
        ids = np.arange(start, min(start + self.chunk_size, self.blocks))
        return np.random.default_rng([self.seed, pass_index, chunk]).permutation(ids)

    def next_block_ids(self) -> np.ndarray:
        p, taken = self.position, []
        need = self.batch_size
        while need:
            if p.index >= len(p.assigned):  # every chunk of this pass drawn: the next pass, all chunks dealt
                p.pass_index, p.assigned = p.pass_index + 1, deal(range(self.num_chunks), self.rank, self.world_size)
                p.index = p.offset = 0
                continue
            chunk = p.assigned[p.index]
            order = self.chunk_order(p.pass_index, chunk)
            piece = order[p.offset:p.offset + need]
            taken.append(piece)
            need -= len(piece)
            p.offset += len(piece)
            if p.offset >= len(order):
                p.done.append([p.pass_index, chunk])
                p.index, p.offset = p.index + 1, 0
        p.batches += 1
        return np.concatenate(taken)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return block_batch(self.tokens, self.next_block_ids(), self.seq_len)

    def new_round(self) -> None:
        """--iterate: a new round goes on through the chunks (the tracker, not the round, says what is done)."""


def start_position(tracker: ChunkTracker, rank: int, world_size: int) -> ChunkPosition:
    """A worker without a position of its own: the pending chunks of the tracker's pass, dealt again."""
    return ChunkPosition(tracker.epoch, deal(tracker.pending(tracker.epoch), rank, world_size))


# ---- a worker's state in a checkpoint ----------------------------------------------------------------------
def worker_dir(root: Path, rank: int) -> Path:
    return root / WORKERS_DIR / f"rank_{rank}"


def read_worker_state(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    path = worker_dir(checkpoint, rank) / WORKER_STATE_FILE
    return read_json(path) if path.is_file() else None


def checkpoint_worker_states(checkpoint: Path) -> list[dict[str, Any]]:
    """Every worker state a checkpoint holds, by rank."""
    ranks = sorted(int(p.name.split("_")[1]) for p in (checkpoint / WORKERS_DIR).glob("rank_*")
                   if (p / WORKER_STATE_FILE).is_file()) if (checkpoint / WORKERS_DIR).is_dir() else []
    return [state for r in ranks if (state := read_worker_state(checkpoint, r)) is not None]


def own_checkpoint(source: Path | None, rank: int) -> Path | None:
    """The directory a resumed worker loads weights, optimizer and RNG from: its own, else the checkpoint's
    (a worker the interrupted run did not have starts from the chief's model, or the merge)."""
    if source is None:
        return None
    own = worker_dir(source, rank)
    return own if (own / MODEL_FILE).is_file() else source


def expert_layer_names(model: nn.Module) -> dict[str, str]:
    """Routing-log layer name ("H.0") -> state-dict prefix of that MoE layer ("H_level.layers.0.ffn")."""
    names = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ReasoningModule):
            for i, layer in enumerate(module.layers):
                if isinstance(getattr(layer, "ffn", None), MoEFeedForward):
                    names[f"{module.name}.{i}"] = f"{module_name}.layers.{i}.ffn"
    return names


class IndependentWorker:
    """One worker's part of parallel-independent training: its chunk sampler, the tokens it routes to each
    expert, its state in checkpoints, and (chief) the tracker."""

    def __init__(self, model: nn.Module, cfg: Config, train_tokens: np.ndarray, dataset_sha256: str,
                 bundle_root: Path, source: Path | None, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.bundle_root = rank, world_size, bundle_root
        self.layer_names = expert_layer_names(model)
        self.tracker = ChunkTracker.load(bundle_root / TRACKER_FILE, tracker_identity(cfg, train_tokens,
                                                                                     dataset_sha256))
        states = checkpoint_worker_states(source) if source is not None else []
        # Chunks the checkpoint holds as finished count even if the tracker missed them (a stop between the two).
        self.recovered = self.tracker.add(pair for s in states for pair in s["position"]["done"])
        mine = next((s for s in states if s["rank"] == rank), None)
        self.routed = {layer: torch.tensor(counts, dtype=torch.long)
                       for layer, counts in (mine or {}).get("routed_tokens", {}).items()}
        if mine is not None and mine["world_size"] == world_size:
            position = ChunkPosition(**{**mine["position"], "done": []})  # its done chunks are in the tracker now
        else:
            position = start_position(self.tracker, rank, world_size)
        tc = cfg.train
        self.sampler = ChunkSampler(train_tokens, cfg.model.max_seq_len, tc.batch_size, tc.seed,
                                    cfg.cluster.dataset_chunk_size, rank, world_size, position)
        self.resumed_position = mine is not None and mine["world_size"] == world_size

    def count_routed(self, usage: RoutingLog) -> None:
        for layer, counts in usage.usage.items():
            key = self.layer_names.get(layer, layer)
            self.routed[key] = self.routed.get(key, torch.zeros_like(counts.token_counts)) + counts.token_counts

    def state(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "position": asdict(self.sampler.position),
                "routed_tokens": {k: v.tolist() for k, v in sorted(self.routed.items())}}

    def stage(self, files: dict[str, bytes]) -> None:
        """Write this worker's checkpoint files to ``<bundle>/workers/rank_<r>/``, where the chief collects them
        (the bundle is on storage every worker sees). They stay there: each worker's newest weights."""
        files = {**files, WORKER_STATE_FILE: json.dumps(self.state(), indent=2).encode()}
        for name, data in files.items():
            atomic_write_bytes(worker_dir(self.bundle_root, self.rank) / name, data)

    def collect(self) -> dict[str, bytes]:
        """Chief: every worker's staged files, named as they go into the checkpoint directory."""
        collected = {}
        for rank in range(self.world_size):
            staged = worker_dir(self.bundle_root, rank)
            for path in sorted(staged.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    collected[f"{WORKERS_DIR}/rank_{rank}/{path.name}"] = path.read_bytes()
        return collected

    def record(self, checkpoint: Path) -> int:
        """Chief, after the checkpoint is published: its workers' finished chunks go into the tracker."""
        new = self.tracker.add(pair for s in checkpoint_worker_states(checkpoint) for pair in s["position"]["done"])
        if new or self.recovered or not self.tracker.path.exists():
            self.tracker.save()
            self.recovered = 0
        return new

    def describe(self) -> dict[str, Any]:
        """This worker's chunks (the next few of them) and the tracker's count, for the console and the log."""
        p = self.sampler.position
        return {"rank": self.rank, "world_size": self.world_size, "epoch": self.tracker.epoch,
                "num_chunks": self.tracker.num_chunks,
                "finished_in_epoch": len(self.tracker.finished.get(self.tracker.epoch, ())),
                "pass": p.pass_index, "chunks_left": len(p.assigned) - p.index,
                "next_chunks": p.assigned[p.index:p.index + 8], "offset": p.offset,
                "kept_position": self.resumed_position}

    def announce(self, log: MetricsLog, step: int) -> None:
        """Each worker's chunks on the console; the chief also logs its own and writes the tracker that the
        checkpoint it resumed from implies."""
        info = self.describe()
        left = info["next_chunks"]
        more = info["chunks_left"] - len(left)
        say(f"[rank {self.rank}] chunks: pass {info['pass']}, {info['chunks_left']} to train ("
            + ", ".join(map(str, left)) + (f", ... {more} more" if more else "") + ")"
            + (f", resuming chunk {left[0]} at sequence {info['offset']}" if info["offset"] and left else "")
            + f"; {info['finished_in_epoch']}/{info['num_chunks']} finished in pass {info['epoch']}")
        if self.rank == 0:
            log.write("chunks", step=step, **info)
            if self.recovered:
                self.tracker.save()
                self.recovered = 0


# ---- the merge ---------------------------------------------------------------------------------------------
def merge_weights(states: Sequence[dict[str, torch.Tensor]],
                  routed: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The merged state dict: plain mean of every tensor, except expert weights (``<layer>.w_gate_up``,
    ``<layer>.w_down``, experts stacked on dim 0), whose expert e is weighted by ``routed[i][<layer>][e]``."""
    merged = {}
    for key, first in states[0].items():
        stacked = torch.stack([s[key] for s in states]).double()
        match = _EXPERT_KEY.match(key)
        if match is not None:
            weights = _expert_weights([r.get(match["layer"]) for r in routed], first.shape[0])
            view = weights.reshape(*weights.shape, *([1] * (first.dim() - 1)))
            value = (stacked * view).sum(dim=0)
        elif first.is_floating_point():
            value = stacked.mean(dim=0)
        else:
            value = first.double()  # integer buffers are not trained: every copy holds the same
        merged[key] = value.to(first.dtype)
    return merged


def _expert_weights(counts: Sequence[torch.Tensor | None], num_experts: int) -> torch.Tensor:
    """(workers, experts) weights summing to 1 per expert; an expert no worker routed to gets equal weights."""
    table = torch.stack([torch.zeros(num_experts, dtype=torch.float64) if c is None else c.double()
                         for c in counts])
    totals = table.sum(dim=0)
    equal = torch.full_like(table, 1.0 / len(counts))
    return torch.where(totals > 0, table / totals.clamp(min=1e-300), equal)


def token_weights(routed: Sequence[dict[str, torch.Tensor]], num_experts: int) -> dict[str, list[list[float]]]:
    """Per layer, each worker's weight of each expert in the merge (for the log)."""
    layers = sorted({layer for r in routed for layer in r})
    return {layer: [[round(w, 6) for w in row] for row in
                    _expert_weights([r.get(layer) for r in routed], num_experts).tolist()] for layer in layers}


def merge_run(plan: RunPlan, data: TrainData) -> dict[str, Any]:
    """After the run (driver): merge the workers' copies of the bundle's newest checkpoint into its
    model.safetensors and the bundle's, evaluate each copy and the merge, print and log the result."""
    cfg, bundle = plan.config, Bundle(Path(plan.bundle_root))
    checkpoint = bundle.latest_checkpoint()
    states = checkpoint_worker_states(checkpoint)
    if not states:
        raise BundleError(f"{checkpoint}: holds no worker states to merge (written without --parallel-independent)")
    ranks = [int(s["rank"]) for s in states]
    weights = [load_tensors(worker_dir(checkpoint, r) / MODEL_FILE) for r in ranks]
    routed = [{k: torch.tensor(v, dtype=torch.long) for k, v in s["routed_tokens"].items()} for s in states]
    merged = merge_weights(weights, routed)
    batches = (eval_batches(data.eval_tokens, cfg.model.max_seq_len, cfg.train.batch_size, cfg.train.eval_batches)
               if data.eval_tokens is not None and cfg.train.eval_batches else [])
    losses = [_eval_loss(cfg, w, batches) for w in [*weights, merged]]
    save_tensors(checkpoint / MODEL_FILE, merged)  # the checkpoint a later --model resume (--ddp) starts from
    metadata = bundle.metadata()
    step = int(metadata.get("total_steps", 0))
    event = {"step": step, "workers": [{"rank": r, "eval_loss": loss, "routed_tokens": sum(int(t.sum()) for t in
                                                                                           ro.values())}
                                       for r, loss, ro in zip(ranks, losses, routed, strict=False)],
             "merged_eval_loss": losses[-1], "checkpoint": str(checkpoint),
             "token_weights": token_weights(routed, cfg.model.num_experts)}
    metadata["merge"] = {k: v for k, v in event.items() if k != "token_weights"}
    bundle.publish(checkpoint, metadata)  # the merged weights become the bundle's model.safetensors
    log = MetricsLog(Path(plan.log_file))
    log.write("merge", **event)
    log.close()
    say(_merge_line(ranks, losses, Path(plan.bundle_root) / MODEL_FILE))
    return {"merged_eval_loss": losses[-1], "worker_eval_losses": losses[:-1]}


def _eval_loss(cfg: Config, weights: dict[str, torch.Tensor], batches: list) -> float | None:
    if not batches:
        return None
    model = HRMACTv1(cfg.model)
    model.load_state_dict(weights)
    return float(evaluate_loss(model, batches, torch.device("cpu"), cfg.train.amp))


def _merge_line(ranks: list[int], losses: list[float | None], target: Path) -> str:
    if losses[-1] is None:
        return f"merge: {len(ranks)} worker(s) -> {target} (no eval data: no eval loss)"
    each = ", ".join(f"rank {r} {loss:.4f}" for r, loss in zip(ranks, losses, strict=False))
    return f"merge: {len(ranks)} worker(s) -> {target} | eval_loss {each} | merged {losses[-1]:.4f}"
