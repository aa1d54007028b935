"""What the training loop needs from an expert store, and the in-process store used without Ray.

``LocalStore`` runs the very tier classes the actors wrap (NVMe files, DRAM LRU, hot slab in
/dev/shm) inside the training process: ``--no-ray`` runs and fast tests. The Ray version,
``actors.tier_actors.StoreHandles``, has the same methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from aios_ray.config import StoreConfig
from aios_ray.store.nvme import NvmeStore
from aios_ray.store.orphans import new_store_slab
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.slab import CudaSlab, HotSlab
from aios_ray.store.tiered_experts import TieredExperts
from aios_ray.store.tiers import DramTier, HotTier, Item, NvmeAsLower


class StoreControl(Protocol):
    layout: ExpertLayout

    def experts_client(self, index: int = 0) -> TieredExperts: ...
    def keys(self) -> list[ExpertKey]: ...
    def seed(self, items: Sequence[Item]) -> None: ...
    def read_all(self, keys: Sequence[ExpertKey]) -> list[tuple[np.ndarray, int]]: ...
    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None: ...
    def flush(self) -> int: ...
    def incarnations(self) -> tuple[str, ...]: ...
    def revert(self, snapshot: str | None = None) -> dict[str, int]: ...
    def snapshot(self, tag: str, keep: int) -> None: ...
    def stats(self) -> list[dict[str, Any]]: ...


def revert_counts(committed: dict[ExpertKey, int], hot: Any, dram: Any) -> dict[str, int]:
    """Revert the hot tier, then DRAM, to ``committed``; what each kept and dropped, for the log."""
    hot_kept, hot_dropped = hot(committed)
    dram_kept, dram_dropped = dram(committed)
    return {"hot_kept": hot_kept, "hot_dropped": hot_dropped, "dram_kept": dram_kept, "dram_dropped": dram_dropped}


class LocalStore:
    """The store of a resolved ``StoreConfig`` (see ``StoreConfig.resolved``), all tiers in this process."""

    def __init__(self, config: StoreConfig, layout: ExpertLayout) -> None:
        self.config, self.layout = config, layout
        root = Path(str(config.path))
        self.nvme = NvmeStore(root, layout)
        self.dram = DramTier(config.capacity_dram * layout.nbytes, layout, NvmeAsLower(self.nvme))
        self.slab: HotSlab = (CudaSlab.allocate(config.capacity_gpu, layout.numel, torch.device(config.device))
                              if config.device.startswith("cuda")
                              else new_store_slab("local", str(config.name), str(root), config.capacity_gpu,
                                                  layout.numel))
        self.hot = HotTier(self.slab, layout, self.dram)

    def experts_client(self, index: int = 0) -> TieredExperts:
        """In one process there is one hot tier: ``index`` is always 0."""
        return TieredExperts(self.hot, self.slab, self.layout)

    def keys(self) -> list[ExpertKey]:
        return self.nvme.keys()

    def seed(self, items: Sequence[Item]) -> None:
        self.nvme.write_many(list(items))

    def read_all(self, keys: Sequence[ExpertKey]) -> list[tuple[np.ndarray, int]]:
        return list(self.nvme.read_many(list(keys)))

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        self.hot.prefetch([ExpertKey(layer, e) for e in expert_ids])

    def flush(self) -> int:
        return self.hot.flush()

    def incarnations(self) -> tuple[str, ...]:
        return (self.hot.incarnation, self.dram.incarnation, self.nvme.incarnation)

    def revert(self, snapshot: str | None = None) -> dict[str, int]:
        """Back to the last flush, or to ``snapshot``: NVMe records staged since then discarded, cached
        records at any other version dropped; what is cached at the flushed version stays."""
        if snapshot is None:
            self.nvme.discard_staged()
        else:
            self.nvme.restore(snapshot)
        return revert_counts(self.nvme.committed_versions(), self.hot.revert, self.dram.revert)

    def snapshot(self, tag: str, keep: int) -> None:
        """Flush, tag the NVMe store's state, and keep only the newest ``keep`` tags."""
        self.flush()
        self.nvme.snapshot(tag, keep)

    def stats(self) -> list[dict[str, Any]]:
        return [self.hot.stats(), self.dram.stats()]

    def close(self) -> None:
        """The hot slab's file goes (it is RAM in /dev/shm); what was flushed stays on NVMe. Whoever opened
        the store calls this when its run ends, however it ends."""
        self.slab.unlink()
