"""The order a worker streams a prepared directory's training blocks in, and the two readers that stream it.

**The order** is a function of (seed, epoch, rank, world size) alone. Each epoch the shards are permuted and dealt
round robin to the ranks; each shard's blocks are permuted within it; every rank takes the same number of batches
(the fewest any rank's shards give). ``stream_items`` turns a position (epoch, global batch) into the list of
shard reads that continue from it, ``StreamItem(epoch, shard, skip, take)``, by arithmetic over the manifest's block
counts: a resumed run reads nothing it skips.

**The readers** turn those items into batches of blocks, the same batches either way:
- on Ray (``ray_batches``): a Ray Data stream (``read_datasource`` over ``ShardBlocks``, a read task per few
  MiB of items, order preserved, on the worker's own node) consumed with ``iter_torch_batches``. Memory is Ray
  Data's window: ``prefetch_batches`` fetches and at most ``window_bytes`` of blocks in flight, and one
  execution's statistics on at most ``SEGMENT_BYTES`` of blocks, whatever the corpus size;
- without Ray (``local_batches_of``): the same items read in process, the next one prefetched on a thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aios_ray.errors import DataError

COLUMN = "tokens"
LEAST_ITEMS = 512  # a stream plans at least this many shard reads (whole epochs) before it is planned again
WINDOW_BYTES = 32 << 20  # Ray Data's object-store budget for one worker's stream: blocks read ahead of training
PREFETCH_BATCHES = 2  # fetches of FETCH_BYTES that iter_torch_batches readies ahead of the one in use
FETCH_BYTES = 1 << 20  # what Ray Data hands the worker at a time (int64: twice the int32 on disk)
TASK_BYTES = 4 << 20  # a read task reads shards until it has about this many bytes of blocks
PIECE_BYTES = 64 << 10  # a block Ray Data moves: under Ray's 100 KiB limit for objects sent inline
SEGMENT_BYTES = 256 << 20  # blocks one Ray Data execution streams before the next one takes over


@dataclass(frozen=True)
class StreamItem:
    """One shard read: blocks ``skip : skip + take`` of shard ``shard`` as permuted in ``epoch``."""

    epoch: int
    shard: int
    skip: int
    take: int


@dataclass(frozen=True)
class ShardSet:
    """Where a stream's shards are: the prepared directory, the training shards' files and block counts."""

    root: str
    files: tuple[str, ...]
    counts: tuple[int, ...]
    block_len: int
    seed: int

    def load(self, item: StreamItem) -> np.ndarray:
        """The item's blocks, (take, block_len) int32."""
        return load_item(*self.read_of(item))

    def read_of(self, item: StreamItem) -> tuple[str, int, int, int, StreamItem]:
        """What reading ``item`` needs, and only that (a Ray read task carries it: not every shard's name)."""
        return str(Path(self.root) / self.files[item.shard]), self.counts[item.shard], self.block_len, self.seed, item


def load_item(path: str, count: int, block_len: int, seed: int, item: StreamItem) -> np.ndarray:
    """Blocks ``skip : skip + take`` of the shard at ``path`` (``count`` blocks) as permuted in ``item.epoch``."""
    from aios_ray.data.shards import read_blocks

    blocks = read_blocks(Path(path), block_len)
    if len(blocks) != count:
        raise DataError(f"{path}: {len(blocks)} blocks, the manifest says {count}")
    order = np.random.default_rng([seed, item.epoch, item.shard]).permutation(len(blocks))
    return blocks[order[item.skip:item.skip + item.take]]


# ---- the order ----------------------------------------------------------------------------------------------


def dealt_shards(shards: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s shards in ``epoch``, in the order it reads them (the same deal on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(shards)[rank::world_size]


def batches_per_rank(counts: np.ndarray, seed: int, epoch: int, world_size: int, batch_size: int) -> int:
    """Batches per rank in an epoch: the fewest any rank's shards give (every rank steps together)."""
    return min(int(counts[dealt_shards(len(counts), seed, epoch, r, world_size)].sum())
               for r in range(world_size)) // batch_size


def stream_items(counts: np.ndarray, seed: int, rank: int, world_size: int, batch_size: int, epoch: int,
                 batch: int, least: int = LEAST_ITEMS) -> list[StreamItem]:
    """The shard reads that continue rank ``rank``'s stream at global batch ``batch`` of ``epoch``: to the end of
    that epoch and on through whole epochs until there are at least ``least`` of them."""
    items: list[StreamItem] = []
    skip = batch // world_size * batch_size  # blocks this rank has drawn in the epoch
    while True:
        quota = batches_per_rank(counts, seed, epoch, world_size, batch_size) * batch_size - skip
        for shard in dealt_shards(len(counts), seed, epoch, rank, world_size):
            if quota <= 0:
                break
            count = int(counts[shard])
            if skip >= count:
                skip -= count
                continue
            take = min(count - skip, quota)
            items.append(StreamItem(epoch, int(shard), skip, take))
            quota -= take
            skip = 0
        epoch, skip = epoch + 1, 0
        if len(items) >= least:
            return items


# ---- reading in process -------------------------------------------------------------------------------------


def local_batches_of(shards: ShardSet, items: list[StreamItem], batch_size: int) -> Iterator[torch.Tensor]:
    """The items' blocks in batches of ``batch_size`` (int64), read in this process, one item read ahead."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
    try:
        pending: Future | None = pool.submit(shards.load, items[0]) if items else None
        buffer = np.zeros((0, shards.block_len), dtype=np.int32)
        for index in range(len(items)):
            assert pending is not None
            loaded = pending.result()
            pending = pool.submit(shards.load, items[index + 1]) if index + 1 < len(items) else None
            buffer = np.concatenate([buffer, loaded])
            while len(buffer) >= batch_size:
                rows, buffer = buffer[:batch_size], buffer[batch_size:]
                yield torch.from_numpy(rows.astype(np.int64))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---- reading on Ray Data ------------------------------------------------------------------------------------


def read_groups(items: list[StreamItem], least_blocks: int) -> list[list[StreamItem]]:
    """Consecutive items gathered into groups of at least ``least_blocks`` blocks (the last may have fewer): one
    read task per group, so that small shards do not cost a task each."""
    groups: list[list[StreamItem]] = [[]]
    blocks = 0
    for item in items:
        if blocks >= least_blocks:
            groups.append([])
            blocks = 0
        groups[-1].append(item)
        blocks += item.take
    return [group for group in groups if group]


def _shard_blocks_datasource(shards: ShardSet, groups: list[list[StreamItem]]) -> Any:
    """A Ray Data datasource over the groups of items, in their order: a read task per group, its blocks cut into
    pieces of PIECE_BYTES.
    Its reads are not distributed: they run on the node that streams, where the prepared directory is."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockAccessor, BlockMetadata

    class ShardBlocks(Datasource):
        @property
        def supports_distributed_reads(self) -> bool:
            return False

        def estimate_inmemory_data_size(self) -> int:
            return sum(item.take for group in groups for item in group) * shards.block_len * 4

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            def task(group: list[StreamItem]) -> ReadTask:
                reads = [shards.read_of(item) for item in group]  # the task's closure: a few names, not all

                def read() -> Iterator[Any]:
                    for args in reads:
                        blocks = load_item(*args)
                        for start in range(0, len(blocks), piece):
                            yield BlockAccessor.batch_to_block({COLUMN: blocks[start:start + piece]})

                rows = sum(item.take for item in group)
                metadata = BlockMetadata(num_rows=rows, size_bytes=rows * shards.block_len * 4, exec_stats=None,
                                         input_files=tuple(args[0] for args in reads))
                return ReadTask(read, metadata)

            piece = max(1, PIECE_BYTES // (shards.block_len * 4))
            return [task(group) for group in groups]

    return ShardBlocks()


def ray_batches(shards: ShardSet, items: list[StreamItem], batch_size: int, window_bytes: int = WINDOW_BYTES,
                prefetch_batches: int = PREFETCH_BATCHES) -> Iterator[torch.Tensor]:
    """The items' blocks in batches of ``batch_size`` (int64), streamed by Ray Data: the shards are read by tasks
    on this node, in order, at most ``window_bytes`` of blocks in flight, one segment of about SEGMENT_BYTES of
    blocks after another."""
    least_blocks = max(1, TASK_BYTES // (shards.block_len * 4))
    segment_blocks = max(least_blocks, SEGMENT_BYTES // (shards.block_len * 4))
    # Ray Data hands over batches of about FETCH_BYTES, cut here into training batches: its cost per batch it hands
    # over (~1 ms) would otherwise be paid for every small batch.
    fetch = max(1, FETCH_BYTES // (batch_size * shards.block_len * 8)) * batch_size
    # A segment's last training batch may continue into the next segment: its first rows wait here.
    carried = torch.zeros((0, shards.block_len), dtype=torch.int64)
    for segment in read_groups(items, segment_blocks):
        for fetched in _segment_fetches(shards, segment, least_blocks, fetch, window_bytes, prefetch_batches):
            rows = torch.cat([carried, fetched]) if len(carried) else fetched
            whole = len(rows) - len(rows) % batch_size
            yield from torch.split(rows[:whole], batch_size)
            carried = rows[whole:]
    # every epoch's items are a whole number of training batches
    assert not len(carried), f"{len(carried)} blocks left over from a stream of whole batches"


def _segment_fetches(shards: ShardSet, items: list[StreamItem], least_blocks: int, fetch: int, window_bytes: int,
                     prefetch_batches: int) -> Iterator[torch.Tensor]:
    """One Ray Data execution over the items: their blocks in fetches of ``fetch`` rows (the last may be short).
    Ray Data keeps its metadata and statistics on every block (here a PIECE_BYTES piece) an execution produces
    until the execution ends (measured with tracemalloc: ~1 KiB of Python objects a piece, ~30 MiB over the
    33,000 pieces of a 2 GiB corpus's epoch, ten times that at 20 GiB): executions of at most SEGMENT_BYTES
    keep that bounded as well."""
    import ray.data
    from ray.data import ExecutionResources

    # The read tasks take no CPU: a training worker holds its CPU for the whole run, and on a machine whose CPUs
    # the workers hold all of, reads that waited for one would never start. Two at a time keep the window full.
    groups = read_groups(items, least_blocks)
    dataset = ray.data.read_datasource(_shard_blocks_datasource(shards, groups), num_cpus=0,
                                       concurrency=min(2, len(groups)), override_num_blocks=len(groups))
    context = dataset.context
    context.execution_options.preserve_order = True  # the order is the stream: a resume relies on it
    context.execution_options.resource_limits = ExecutionResources(object_store_memory=window_bytes)
    # Blocks of PIECE_BYTES, never merged: Ray passes an object that small inside the message that announces it,
    # so a block reaches the worker's heap and leaves it once batched, instead of a page of the node's shared
    # object store that stays mapped into the worker (measured: 200 MB of it with 4 MB blocks, 68 MB with these).
    context.target_max_block_size = PIECE_BYTES
    context.enable_progress_bars = False  # the run's own progress line says how training goes
    context.print_on_execution_start = False
    for fetched in dataset.iter_torch_batches(batch_size=fetch, dtypes=torch.int64, device="cpu",
                                              prefetch_batches=prefetch_batches):
        yield fetched[COLUMN]
