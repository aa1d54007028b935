"""Token blocks for next-token training: one stream of token ids cut into (T + 1)-token blocks.

A block gives ``input_ids = block[:-1]`` and ``labels = block[1:]``: label t is the token after
input t. The sampler's position is two integers (epoch, batch), so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from aios_ray.errors import DataError


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str], eos: int | None) -> np.ndarray:
    """All documents as one int32 stream, an end-of-text token after each document when there is one."""
    pieces = []
    for encoding in tokenizer.encode_batch(list(documents), add_special_tokens=False):
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
        if eos is not None:
            pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def num_blocks(tokens: np.ndarray, seq_len: int) -> int:
    return max((len(tokens) - 1) // seq_len, 0)


def block_batch(tokens: np.ndarray, block_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = block_ids.astype(np.int64) * seq_len
    rows = np.stack([tokens[s: s + seq_len + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


@dataclass
class SamplerState:
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch (over all ranks)


class BlockSampler:
    """Shuffled non-overlapping blocks, reshuffled each epoch; rank r takes global batches r, r+W, ..."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, state: SamplerState | None = None) -> None:
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.state = state or SamplerState()
        self.blocks = num_blocks(tokens, seq_len)
        self.batches_per_epoch = self.blocks // batch_size // world_size * world_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"training data too small: {len(tokens)} tokens make {self.blocks} blocks of --max-seq-len "
                f"{seq_len}, fewer than --batch-size {batch_size} x {world_size} worker(s)")
        self._order = self._permutation(self.state.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.blocks)

    def next_batch(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch of this rank; ``batch_size`` smaller than the sampler's splits a batch
        (used after an out-of-memory retreat), keeping the data order identical."""
        if self.state.batch >= self.batches_per_epoch:
            self.state = SamplerState(self.state.epoch + 1, 0)
            self._order = self._permutation(self.state.epoch)
        index = self.state.batch + self.rank
        ids = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        self.state.batch += self.world_size
        return block_batch(self.tokens, ids, self.seq_len)

    def restore(self, state: SamplerState) -> None:
        self.state = SamplerState(state.epoch, state.batch)
        self._order = self._permutation(self.state.epoch)

    def new_round(self) -> None:
        """--iterate: start the next round on a fresh shuffle."""
        self.state = SamplerState(self.state.epoch + 1, 0)
        self._order = self._permutation(self.state.epoch)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int,
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_batches`` batches of consecutive blocks: the same every evaluation."""
    blocks = num_blocks(tokens, seq_len)
    if blocks == 0:
        raise DataError(f"eval data too small: {len(tokens)} tokens, fewer than --max-seq-len {seq_len} + 1")
    ids = np.arange(min(blocks, batch_size * max_batches))
    return [block_batch(tokens, chunk, seq_len) for chunk in np.array_split(ids, -(-len(ids) // batch_size))]
