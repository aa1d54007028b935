"""A Ray actor in front of one node's ``NvmeStore``.

The actor owns the node's expert files so that writes (which rewrite the manifest) are serialised in one
place, while its read results travel through Ray's shared-memory object store: a record returned from
``read``/``read_many`` is large enough to be placed there, and every reader on the node ``ray.get``s it
as a read-only, zero-copy numpy view.

The actor holds nothing that is not on disk (``stats`` excepted, which are per-incarnation counters),
so ``max_restarts=-1`` is enough to survive a crash: a restarted actor re-opens the manifest, and
``max_task_retries=-1`` replays the calls that were in flight (reads are pure; a replayed ``write_many``
writes the same bytes again).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from aios_ray.errors import UserError
from aios_ray.store.nvme import Item, NvmeStore
from aios_ray.store.record import ExpertKey, ExpertLayout

MAX_CONCURRENCY = 4


@ray.remote(max_concurrency=MAX_CONCURRENCY)
class NvmeStoreActor:
    """Threaded (``max_concurrency=4``): reads overlap each other and a write; the store does the locking."""

    def __init__(self, root: str, layout: ExpertLayout) -> None:
        self.store = NvmeStore(Path(root), layout)
        self._stats_lock = threading.Lock()
        self._stats: dict[str, float] = {"reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0,
                                         "read_seconds": 0.0, "write_seconds": 0.0}

    def describe(self) -> dict[str, Any]:
        """Root and layout, so ``create_nvme_store`` can refuse a name that is taken by another store."""
        return {"root": str(self.store.root), "hidden_size": self.store.layout.hidden_size,
                "ffn_size": self.store.layout.ffn_size}

    def write_many(self, items: Sequence[Item], commit: bool = True) -> None:
        start = time.perf_counter()
        self.store.write_many(items, commit=commit)
        self._count("writes", "bytes_written", "write_seconds", len(items),
                    sum(int(flat.nbytes) for _, flat, _ in items), start)

    def read(self, key: ExpertKey) -> tuple[np.ndarray, int]:
        return self.read_many([key])[0]

    def read_many(self, keys: Sequence[ExpertKey]) -> list[tuple[np.ndarray, int]]:
        start = time.perf_counter()
        records = self.store.read_many(keys)
        self._count("reads", "bytes_read", "read_seconds", len(records),
                    sum(int(flat.nbytes) for flat, _ in records), start)
        return records

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> int:
        """The NVMe tier's prefetch: page-cache read-ahead of these experts' files."""
        return self.store.prefetch([ExpertKey(layer, e) for e in expert_ids])

    def commit(self) -> int:
        return self.store.commit()

    def discard_staged(self) -> int:
        return self.store.discard_staged()

    def committed_versions(self) -> dict[ExpertKey, int]:
        return self.store.committed_versions()

    def snapshot(self, tag: str, keep: int | None = None) -> int:
        return self.store.snapshot(tag, keep)

    def restore(self, tag: str) -> None:
        self.store.restore(tag)

    def incarnation(self) -> str:
        return self.store.incarnation

    def keys(self) -> list[ExpertKey]:
        return self.store.keys()

    def version(self, key: ExpertKey) -> int:
        return self.store.version(key)

    def verify_all(self) -> list[str]:
        return self.store.verify_all()

    def stats(self) -> dict[str, float]:
        """Counters since this incarnation started (``pid`` tells incarnations apart)."""
        with self._stats_lock:
            return {"tier": "nvme", **self._stats, "pid": os.getpid(), "experts": len(self.store)}

    def _count(self, ops: str, nbytes: str, seconds: str, n: int, size: int, start: float) -> None:
        with self._stats_lock:
            self._stats[ops] += n
            self._stats[nbytes] += size
            self._stats[seconds] += time.perf_counter() - start


def create_nvme_store(root: Path | str, layout: ExpertLayout, *, name: str, namespace: str,
                      node_resource: str | None = None, node_id: str | None = None,
                      detached: bool = False) -> ray.actor.ActorHandle:
    """The store actor called ``name`` in ``namespace``: the existing one, or a new one on ``root``.

    ``node_resource`` names a custom resource that only the node owning ``root`` has, to pin the actor
    next to its disk; ``node_id`` pins it to that node. ``detached`` keeps it alive after the creating
    process exits (off by default, so tests clean up after themselves).
    """
    root = Path(os.path.abspath(root))  # one spelling per directory, without touching a remote node's disk
    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError:
        options: dict[str, Any] = {"name": name, "namespace": namespace, "max_restarts": -1,
                                   "max_task_retries": -1, "get_if_exists": True,
                                   "num_cpus": 0}  # I/O bound; training workers need the CPUs
        if detached:
            options["lifetime"] = "detached"
        if node_resource:
            options["resources"] = {node_resource: 0.001}
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        actor = NvmeStoreActor.options(**options).remote(str(root), layout)
    _check_same_store(actor, root, layout, name)
    return actor


def _check_same_store(actor: ray.actor.ActorHandle, root: Path, layout: ExpertLayout, name: str) -> None:
    """Two stores under one name would silently serve the wrong experts; refuse that."""
    got = ray.get(actor.describe.remote())
    want = {"root": str(root), "hidden_size": layout.hidden_size, "ffn_size": layout.ffn_size}
    if got != want:
        raise UserError(f"NVMe store actor {name!r} already serves {got}, asked for {want}")
