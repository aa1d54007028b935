"""Thin Ray actors around the tier classes of ``aios_ray.store.tiers``, and the one function that
creates (or finds again) the whole store from a config.

Names: ``<store>-nvme``, ``<store>-dram``, ``<store>-gpu<i>`` in the given namespace. Every actor
restarts on failure (``max_restarts=-1``) and rebuilds from the tier below: the NVMe store from its
manifest, the DRAM cache empty, the hot cache with a fresh slab file (the old file is unlinked, so a
process that still maps it keeps valid memory until it re-maps).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.nvme_store import create_nvme_store
from aios_ray.config import NODE_KEY_LENGTH, StoreConfig
from aios_ray.errors import DataError, UserError
from aios_ray.store.control import revert_counts
from aios_ray.store.orphans import new_store_slab, reclaim_store_orphans
from aios_ray.store.policy import TierCounters
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.slab import CudaSlab, HotSlab, open_shared_slab, slab_path
from aios_ray.store.tiered_experts import TieredExperts
from aios_ray.store.tiers import DramTier, HotTier, Item, Record

MAX_CONCURRENCY = 4
# A GPU cache actor created without a training worker's GPU to follow asks Ray for this share of a GPU: on a
# node with one GPU it lands beside a worker there, which CUDA IPC needs (``open_shared_slab`` checks it).
GPU_CACHE_SHARE = 0.05


def actor_name(config: StoreConfig, tier: str) -> str:
    """The one place store actor names are made: ``<store>-nvme``, ``<store>-dram``, ``<store>-gpu<i>``."""
    return f"{config.name}-{tier}"


def hot_tier_name(index: int) -> str:
    """Hot tier ``index`` of a store: one per node (``gpu0``), or one per worker on the node (``gpu<local rank>``)."""
    return f"gpu{index}"


_TIER_PATTERN = rf"(?:-(?P<node>[0-9a-f]{{{NODE_KEY_LENGTH}}}))?-(?P<tier>nvme|dram|gpu\d+)"


def store_actors(config: StoreConfig) -> list[tuple[str, str, StoreConfig]]:
    """The live actors of the store ``config`` names as (name, tier, the config of the store it belongs to): the
    run's own store (``<store>-<tier>``) and, for a run over several nodes, each node's (``<store>-<node>-<tier>``)."""
    pattern = re.compile(re.escape(str(config.name)) + _TIER_PATTERN)
    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        match = pattern.fullmatch(actor["name"]) if actor["namespace"] == config.namespace else None
        if match:
            node = match.group("node")
            found.append((actor["name"], match.group("tier"), config.for_node(node) if node else config))
    # per store: its hot tiers in index order, then DRAM, then NVMe (the order of ``store stats``)
    return sorted(found, key=lambda item: (str(item[2].name), _tier_order(item[1])))


def _tier_order(tier: str) -> tuple[int, int]:
    return (0, int(tier[3:])) if tier.startswith("gpu") else (1 if tier == "dram" else 2, 0)


class DramActorTier:
    """The DRAM cache actor as the tier below the hot tier (LowerTier calls, blocking)."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def get_many(self, keys: Sequence[ExpertKey], for_prefetch: bool = False) -> list[tuple[np.ndarray, int]]:
        return ray.get(self.handle.get_many.remote(list(keys), for_prefetch))

    def put_many(self, items: Sequence[Item]) -> None:
        ray.get(self.handle.put_many.remote(list(items)))

    def flush(self) -> int:
        return ray.get(self.handle.flush.remote())


class NvmeActorTier:
    """The NVMe store actor as the tier below DRAM: write-backs are staged, ``flush`` commits them."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def get_many(self, keys: Sequence[ExpertKey], for_prefetch: bool = False) -> list[tuple[np.ndarray, int]]:
        return ray.get(self.handle.read_many.remote(list(keys)))

    def put_many(self, items: Sequence[Item]) -> None:
        ray.get(self.handle.write_many.remote(list(items), False))

    def flush(self) -> int:
        return ray.get(self.handle.commit.remote())


class _CacheActorBase:
    """What both cache actors answer: flush, revert (recovery), incarnation, counters, config."""

    tier: Any
    metrics: TierMetrics
    config: StoreConfig
    layout: ExpertLayout

    def store_config(self) -> tuple[StoreConfig, ExpertLayout]:
        return self.config, self.layout

    def flush(self) -> int:
        return self.tier.flush()

    def revert(self, committed: dict[ExpertKey, int]) -> tuple[int, int]:
        return self.tier.revert(committed)

    def incarnation(self) -> str:
        return self.tier.incarnation

    def stats(self) -> dict[str, Any]:
        stats = self.tier.stats()
        self.metrics.update(stats)
        return stats


@ray.remote(max_concurrency=MAX_CONCURRENCY)
class DramCacheActor(_CacheActorBase):
    def __init__(self, config: StoreConfig, layout: ExpertLayout, nvme: ray.actor.ActorHandle) -> None:
        self.config, self.layout = config, layout
        self.tier = DramTier(config.capacity_dram * layout.nbytes, layout, NvmeActorTier(nvme))
        self.prefetcher = ThreadPoolExecutor(1, thread_name_prefix="dram-prefetch")
        self.metrics = TierMetrics("dram", config.name or "")

    def get_many(self, keys: Sequence[ExpertKey], for_prefetch: bool = False) -> list[tuple[np.ndarray, int]]:
        return self.tier.get_many(keys, for_prefetch)

    def put_many(self, items: Sequence[Item]) -> None:
        self.tier.put_many(items)

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Returns at once; the records are pulled from NVMe in the background."""
        self.prefetcher.submit(self.tier.prefetch, [ExpertKey(layer, e) for e in expert_ids])



@ray.remote(max_concurrency=MAX_CONCURRENCY)
class GpuCacheActor(_CacheActorBase):
    """The hot tier: its slots in GPU memory (``device="cuda"``, shared by CUDA IPC), or without a GPU in a
    shared-memory file (same rules)."""

    def __init__(self, config: StoreConfig, layout: ExpertLayout, tier: str, dram: ray.actor.ActorHandle) -> None:
        self.config, self.layout = config, layout
        self.slab: HotSlab
        if config.device == "cuda":  # Ray made the GPU it assigned visible as device 0
            self.slab = CudaSlab.allocate(config.capacity_gpu, layout.numel, torch.device("cuda", 0))
        else:  # a previous incarnation's file is replaced, never truncated: a process still mapping it would fault
            self.slab = new_store_slab(config.namespace, actor_name(config, tier), str(config.path),
                                       config.capacity_gpu, layout.numel)
        self.tier = HotTier(self.slab, layout, DramActorTier(dram))
        self.metrics = TierMetrics("gpu", config.name or "")

    def slab_info(self) -> dict[str, Any]:
        """What a training process needs to map the slots (``open_shared_slab``)."""
        return self.slab.share()

    def lease(self, keys: Sequence[ExpertKey], holder: str) -> dict[ExpertKey, int]:
        return self.tier.lease(keys, holder)

    def acquire(self, keys: Sequence[ExpertKey], holder: str) -> tuple[dict[ExpertKey, int], dict[ExpertKey, Record]]:
        return self.tier.acquire(keys, holder)

    def write_back(self, items: Sequence[Item]) -> None:
        self.tier.write_back(items)

    def release(self, holder: str) -> int:
        return self.tier.release(holder)

    def mark_dirty(self, keys: Sequence[ExpertKey]) -> None:
        self.tier.mark_dirty(keys)

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> int:
        return self.tier.prefetch([ExpertKey(layer, e) for e in expert_ids])

    def resident(self) -> dict[ExpertKey, int]:
        return self.tier.resident()

    def __ray_shutdown__(self) -> None:
        self.slab.unlink()


# Every counter a tier reports (the same names and numbers as ``store stats`` and the JSONL's store_stats).
GAUGES = (*(f.name for f in dataclasses.fields(TierCounters)), "hit_rate", "used_bytes", "entries")


class TierMetrics:
    """The tier's counters as Ray metrics (``ray_aios_store_*`` on the dashboard's metrics port), tagged with the
    tier and the run: the store's name, which is the brain name unless --store-name says otherwise."""

    def __init__(self, tier: str, run: str) -> None:
        from ray.util.metrics import Gauge

        self.tier, self.run = tier, run
        self.gauges = {name: Gauge(f"aios_store_{name}", description=f"tiered expert store: {name}",
                                   tag_keys=("tier", "run"))
                       for name in GAUGES}
        self.lock = threading.Lock()

    def update(self, stats: dict[str, Any]) -> None:
        with self.lock:
            for name, gauge in self.gauges.items():
                if name in stats:
                    gauge.set(float(stats[name]), tags={"tier": self.tier, "run": self.run})


@dataclass
class StoreHandles:
    config: StoreConfig
    layout: ExpertLayout
    nvme: ray.actor.ActorHandle
    dram: ray.actor.ActorHandle
    gpu: list[ray.actor.ActorHandle]

    def flush(self) -> int:
        """Every update made so far becomes durable on NVMe."""
        return sum(ray.get([g.flush.remote() for g in self.gpu])) + ray.get(self.dram.flush.remote())

    def stats(self) -> list[dict[str, Any]]:
        return ray.get([*(g.stats.remote() for g in self.gpu), self.dram.stats.remote(),
                        self.nvme.stats.remote()])

    def keys(self) -> list[ExpertKey]:
        return ray.get(self.nvme.keys.remote())

    def seed(self, items: Sequence[Item]) -> None:
        ray.get(self.nvme.write_many.remote(list(items)))

    def read_all(self, keys: Sequence[ExpertKey]) -> list[tuple[np.ndarray, int]]:
        return ray.get(self.nvme.read_many.remote(list(keys)))

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Fire and forget: the GPU cache fills free room, the DRAM cache pulls from NVMe."""
        for gpu in self.gpu:
            gpu.prefetch.remote(layer, list(expert_ids))

    def incarnations(self) -> tuple[str, ...]:
        return tuple(ray.get([*(g.incarnation.remote() for g in self.gpu), self.dram.incarnation.remote(),
                              self.nvme.incarnation.remote()]))

    def revert(self, snapshot: str | None = None) -> dict[str, int]:
        """Back to the last flush, or to ``snapshot``: NVMe records staged since then discarded, cached
        records at any other version dropped; what is cached at the flushed version stays."""
        ray.get(self.nvme.discard_staged.remote() if snapshot is None else self.nvme.restore.remote(snapshot))
        committed = ray.get(self.nvme.committed_versions.remote())

        def hot(versions: dict[ExpertKey, int]) -> tuple[int, int]:
            kept, dropped = zip(*ray.get([g.revert.remote(versions) for g in self.gpu]), strict=True)
            return sum(kept), sum(dropped)

        return revert_counts(committed, hot, lambda versions: ray.get(self.dram.revert.remote(versions)))

    def snapshot(self, tag: str, keep: int) -> None:
        """Flush, tag the NVMe store's state, and keep only the newest ``keep`` tags."""
        self.flush()
        ray.get(self.nvme.snapshot.remote(tag, keep))

    def shutdown(self) -> None:
        """End the store's actors (no restart) and remove the hot slabs' shared-memory files; what was flushed
        stays on NVMe. A process that still maps a slab keeps valid memory until it unmaps."""
        shutdown_store(self.config)

    def experts_client(self, index: int = 0) -> TieredExperts:
        """The compute process's side: map the slab of GPU cache ``index`` and lease through it."""
        try:
            slab = open_shared_slab(ray.get(self.gpu[index].slab_info.remote()))
        except FileNotFoundError as exc:
            raise UserError(f"{exc}: the GPU cache actor's slab is not on this node; --experts tiered needs the "
                            "training workers on the node of the store's actors") from None
        return TieredExperts(ActorHotClient(self.gpu[index]), slab, self.layout)


class ActorHotClient:
    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def lease(self, keys: Sequence[ExpertKey], holder: str) -> dict[ExpertKey, int]:
        return ray.get(self.handle.lease.remote(list(keys), holder))

    def acquire(self, keys: Sequence[ExpertKey], holder: str) -> tuple[dict[ExpertKey, int], dict[ExpertKey, Record]]:
        return ray.get(self.handle.acquire.remote(list(keys), holder))

    def write_back(self, items: Sequence[Item]) -> None:
        ray.get(self.handle.write_back.remote(list(items)))

    def release(self, holder: str) -> int:
        return ray.get(self.handle.release.remote(holder))

    def mark_dirty(self, keys: Sequence[ExpertKey]) -> None:
        ray.get(self.handle.mark_dirty.remote(list(keys)))


def shutdown_store(config: StoreConfig) -> int:
    """End the actors of the store ``config`` names (each node's, for a run over several), wherever they run;
    returns how many. The slab files are removed when the actors ran on this node."""
    ended = 0
    for name, tier, store in store_actors(config):
        try:
            ray.kill(ray.get_actor(name, namespace=config.namespace), no_restart=True)
            ended += 1
        except ValueError:  # gone already
            continue
        if tier.startswith("gpu"):
            slab_path(store.namespace, name, str(store.path)).unlink(missing_ok=True)
    # A node store whose node died took its actors along, but on a node that lives on (a simulated one) its slab
    # file would stay: the orphans of every node store of this run on this node go too.
    for node_root in Path(str(config.path)).glob("node-*"):
        reclaim_store_orphans(str(node_root))
    return ended


def create_store(config: StoreConfig, layout: ExpertLayout, node_id: str | None = None,
                 detached: bool = False, hot_tiers: Sequence[int] = (0,),
                 cuda_device: str | None = None) -> StoreHandles:
    """Create the NVMe, DRAM and hot-tier actors of a store, or find them again by name.

    ``config`` must be resolved (``StoreConfig.resolved``); ``layout`` is the model's expert record layout.
    ``node_id``: place new actors on that node (the training worker's: the hot slab must be mapped where the
    compute runs). ``detached``: they outlive the process that created them (a training worker that dies
    and is restarted finds them again); whoever runs the whole job then ends them (``shutdown_store``).
    ``hot_tiers``: the indices of the hot tiers to create or find (``gpu<i>``). ``cuda_device``: the GPU (its
    UUID) that hot tiers created now put their slots on, the creating worker's own, since CUDA IPC shares
    memory only on one GPU; such a tier takes no GPU from Ray (the worker holds it) and sees only that GPU.
    """
    if not config.is_resolved:
        raise ValueError(f"store config {config} is not resolved (StoreConfig.resolved fills in its defaults)")
    # num_cpus=0: the tiers wait on memory copies, disks and other actors, and must not take the CPUs that
    # training workers reserve (an actor given any resource, num_gpus=0 included, would hold one CPU for life).
    options: dict[str, Any] = {"namespace": config.namespace, "get_if_exists": True, "max_restarts": -1,
                               "max_task_retries": -1, "num_cpus": 0}
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    if detached:
        options["lifetime"] = "detached"
    nvme = create_nvme_store(str(config.path), layout, name=actor_name(config, "nvme"),
                             namespace=config.namespace, node_id=node_id, detached=detached)
    dram = DramCacheActor.options(name=actor_name(config, "dram"), **options).remote(config, layout, nvme)
    gpu = [GpuCacheActor.options(name=actor_name(config, hot_tier_name(i)), **options,
                                 **_hot_tier_device(config, cuda_device)).remote(config, layout,
                                                                                  hot_tier_name(i), dram)
           for i in hot_tiers]
    for actor in (dram, *gpu):  # found by name: it must be this store, not another run's
        existing = ray.get(actor.store_config.remote())
        if existing != (config, layout):
            raise UserError(f"store actors named {config.name!r} already serve {existing}; asked for {config}")
    return StoreHandles(config, layout, nvme, dram, gpu)


def _hot_tier_device(config: StoreConfig, cuda_device: str | None) -> dict[str, Any]:
    """Where a new hot tier's slots go: CPU (a shared-memory file), the given GPU, or a share of one from Ray.
    Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor that asks for no GPU, so the runtime env's value holds."""
    if config.device != "cuda":
        return {"num_gpus": 0}
    if cuda_device is None:
        return {"num_gpus": GPU_CACHE_SHARE}
    return {"num_gpus": 0, "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": cuda_device}}}


def live_store_stats(config: StoreConfig, address: str | None) -> dict[str, Any]:
    """Ask the running store actors of ``config`` (found by name) for their counters."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=config.namespace, log_to_driver=False)
    try:
        handles = [ray.get_actor(name, namespace=config.namespace) for name, tier, _store in store_actors(config)
                   if tier != "nvme"]
        if not handles:
            raise ValueError(config.name)
    except ValueError:
        raise DataError(f"--name {config.name}: no running store actors in namespace {config.namespace!r}") from None
    return {"tiers": ray.get([handle.stats.remote() for handle in handles])}
