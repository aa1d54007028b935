"""``aios-ray store stats``: per-tier occupancy, hit rates and bytes moved of a finished store (read from its
directory) and the table for any store; a running store's counters come from its actors
(``actors.tier_actors.live_store_stats``). ``aios-ray store gc``: what an orphan sweep found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aios_ray.config import StoreConfig
from aios_ray.errors import DataError
from aios_ray.store.nvme import SNAPSHOTS
from aios_ray.store.orphans import SlabFile

COLUMNS = ("tier", "entries", "used_MB", "hits", "misses", "hit_rate", "pf_issued", "pf_used", "pf_wasted", "streamed",
           "evictions", "MB_in", "MB_out", "stall_s")


def finished_store_stats(config: StoreConfig) -> dict[str, Any]:
    """The last stats the trainer wrote next to the store of ``config`` (``stats.json``)."""
    store_path = Path(str(config.path))
    path = store_path / "stats.json"
    if not path.is_file():
        raise DataError(f"--store-path {store_path}: no stats.json (is it the expert_store of a tiered run?)")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: corrupt JSON ({exc})") from None
    stats["snapshots"] = sorted(p.stem for p in (store_path / SNAPSHOTS).glob("*.json"))
    return stats


def format_table(stats: dict[str, Any]) -> str:
    rows = [COLUMNS]
    caches = [t for t in stats["tiers"] if t.get("tier") != "nvme"]
    disks = [t for t in stats["tiers"] if t.get("tier") == "nvme"]
    for tier in caches:
        capacity = tier.get("slots")
        entries = f"{tier.get('entries', 0)}" + (f"/{capacity}" if capacity else "")
        rows.append((tier["tier"], entries, f"{tier.get('used_bytes', 0) / 2**20:.1f}", f"{tier['hits']:.0f}",
                     f"{tier['misses']:.0f}", f"{tier['hit_rate']:.3f}", f"{tier['prefetch_issued']:.0f}",
                     f"{tier['prefetch_used']:.0f}", f"{tier['prefetch_wasted']:.0f}", f"{tier['streamed']:.0f}",
                     f"{tier['evictions']:.0f}", f"{tier['bytes_in'] / 2**20:.1f}", f"{tier['bytes_out'] / 2**20:.1f}",
                     f"{tier['stall_seconds']:.3f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    header = f"step {stats['step']}: " if "step" in stats else ""
    extra = (f"{header}{stats.get('experts_used_last_step', '?')} experts used in the last step of "
             f"{stats.get('total_experts', '?')}" if "total_experts" in stats else "")
    for disk in disks:  # the NVMe store has no hits: every read is a load
        extra += (f"\nnvme: {disk['experts']:.0f} experts; {disk['reads']:.0f} reads "
                  f"({disk['bytes_read'] / 2**20:.1f} MB, {disk['read_seconds']:.3f} s), {disk['writes']:.0f} writes "
                  f"({disk['bytes_written'] / 2**20:.1f} MB, {disk['write_seconds']:.3f} s)")
    if "snapshots" in stats:
        extra += (f"\nsnapshots (the checkpoints a resume can return the store to): "
                  f"{', '.join(stats['snapshots']) or 'none'}")
    return "\n".join([*lines, extra.lstrip()] if extra else lines)


def format_sweep(found: list[SlabFile], dry_run: bool) -> str:
    """One line per orphaned slab (its file size and the RAM it takes), then a total; live ones are counted."""
    orphans = [s for s in found if s.orphan]
    gone = orphans if dry_run else [s for s in orphans if s.removed]
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {s.path}  {_size(s.size)} file, {_size(s.resident)} of RAM" for s in gone]
    lines += [f"could not remove {s.path} (another user's, or replaced meanwhile)" for s in orphans if s not in gone]
    live = [s for s in found if not s.orphan]
    pids = ", ".join(str(pid) for pid in sorted({pid for s in live for pid in s.holders if pid > 0}))
    lines.append(f"{verb} {len(gone)} orphaned slab(s), {_size(sum(s.resident for s in gone))} of RAM; "
                 f"{len(live)} in use left alone" + (f" (held by pid {pids})" if pids else ""))
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    """A slab is anything from a test's few kB to a real hot tier's tens of GB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} kB"
