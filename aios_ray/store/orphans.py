"""Hot-tier slab files whose owner is gone, found and removed.

A ``Slab`` file in ``/dev/shm`` is RAM until someone unlinks it. A run unlinks its own when it ends; a run killed
with ``kill -9``, by the OOM killer or by a lost node never gets to. A slab file is *live* while some process
holds its ``flock`` (every ``Slab`` takes one, and the kernel drops it however the process ends) or maps it
(``/proc/<pid>/maps``, which also covers a process that maps it without the lock, e.g. one running older code).
Anything else is an *orphan*: ``sweep`` removes it, ``aios-ray store gc`` sweeps every store's slabs, and a new
store sweeps its own before it creates its slab.

Deciding and removing are race-free against the slab's own users: the sweep takes each candidate's lock
exclusively (a live holder's shared lock makes that fail at once), and a process that opens the file meanwhile
waits on the lock and then finds the file unlinked (``slab._open_held``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aios_ray.store import slab as slab_module
from aios_ray.store.slab import SLAB_PREFIX, SLAB_SUFFIX, store_digest
from aios_ray.tracking.jsonl import say

FileId = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class SlabFile:
    path: Path
    size: int  # bytes the file spans
    resident: int  # bytes of RAM it takes (a slab is sparse until its slots are written)
    holders: tuple[int, ...]  # pids that map it or hold its lock; empty for an orphan
    removed: bool = False

    @property
    def orphan(self) -> bool:
        return not self.holders


def slab_files(store_root: str | None = None) -> list[Path]:
    """Every slab file in the shared-memory folder, or only those of the store at ``store_root``."""
    middle = f"*-{store_digest(store_root)}" if store_root is not None else "*"
    return sorted(slab_module.SHM_DIR.glob(f"{SLAB_PREFIX}{middle}{SLAB_SUFFIX}"))


def sweep(store_root: str | None = None, remove: bool = True) -> list[SlabFile]:
    """Every slab file (of one store, with ``store_root``), each with the pids that hold it; the orphans among
    them are unlinked unless ``remove`` is False (``removed`` says which were)."""
    with _locked_exclusively(slab_files(store_root)) as candidates:
        mapped, locked = _by_file(_mapped_files()), _by_file(_locked_files())
        found = []
        for path, fd, free in candidates:
            stat = os.fstat(fd)
            pids = mapped.get(_file_id(stat), set())
            if not free:  # another open file holds its lock (when this sweep got it, the lock listed is its own)
                pids = pids | locked.get(_file_id(stat), {-1})  # -1: a holder this process cannot see
            removed = remove and not pids and _unlink_if_same(path, stat)
            found.append(SlabFile(path, stat.st_size, stat.st_blocks * 512, tuple(sorted(pids)), removed))
        return found


def reclaim_store_orphans(store_root: str) -> list[SlabFile]:
    """Remove the orphaned slabs of the store at ``store_root`` (runs of it that died without cleaning up) and
    say so; called by a store before it creates its own slab."""
    removed = [s for s in sweep(store_root) if s.removed]
    if removed:
        say(f"expert store: removed {len(removed)} orphaned hot-tier slab(s) of {store_root} "
            f"({sum(s.resident for s in removed) / 2**20:.1f} MB of RAM) left by run(s) that did not end cleanly: "
            + ", ".join(s.path.name for s in removed))
    return removed


@contextlib.contextmanager
def _locked_exclusively(paths: list[Path]) -> Iterator[list[tuple[Path, int, bool]]]:
    """Open each file and try its lock exclusively: (path, fd, got the lock). A lock got is kept until the end
    of the block, so no process can start holding the file while the sweep decides on it."""
    opened: list[tuple[Path, int, bool]] = []
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # its owner removed it meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                opened.append((path, fd, True))
            except BlockingIOError:
                opened.append((path, fd, False))
        yield opened
    finally:
        for _path, fd, _free in opened:
            os.close(fd)


def _by_file(pairs: Iterator[tuple[FileId, int]]) -> dict[FileId, set[int]]:
    found: dict[FileId, set[int]] = {}
    for file_id, pid in pairs:
        found.setdefault(file_id, set()).add(pid)
    return found


def _mapped_files() -> Iterator[tuple[FileId, int]]:
    """(file, pid) for every file mapping of every process this one may read."""
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text(encoding="utf-8", errors="replace")
        except OSError:  # gone meanwhile, or another user's
            continue
        pid = int(maps.parent.name)
        for line in text.splitlines():
            # address perms offset dev inode path: dev is "major:minor" in hex, inode 0 for anonymous memory
            fields = line.split(maxsplit=5)
            if len(fields) >= 5 and fields[4] != "0":
                yield (_device(fields[3]), int(fields[4])), pid


def _locked_files() -> Iterator[tuple[FileId, int]]:
    """(file, pid) for every lock in ``/proc/locks`` (``1: FLOCK ADVISORY READ <pid> <maj>:<min>:<ino> ...``)."""
    try:
        lines = Path("/proc/locks").read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":  # a waiter, not a holder
            continue
        major, minor, inode = fields[5].split(":")
        yield (_device(f"{major}:{minor}"), int(inode)), int(fields[4])


def _device(text: str) -> int:
    major, minor = text.split(":")
    return os.makedev(int(major, 16), int(minor, 16))


def _file_id(stat: os.stat_result) -> FileId:
    return stat.st_dev, stat.st_ino


def _unlink_if_same(path: Path, stat: os.stat_result) -> bool:
    """Unlink ``path`` if it is still the file that was examined (not one a new run put there since). Another
    user's file in the sticky /dev/shm is theirs to remove."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        if _file_id(os.stat(path)) == _file_id(stat):
            path.unlink()
            return True
    return False


def new_store_slab(namespace: str, name: str, store_root: str, num_slots: int, numel: int) -> slab_module.Slab:
    """The hot slab of a store that starts (a run, or a restarted cache actor), after removing the orphans of
    earlier runs of the same store: a crashed run's slab is reclaimed by the next run, without anyone asking."""
    reclaim_store_orphans(store_root)
    path = slab_module.slab_path(namespace, name, store_root)
    return slab_module.Slab(path, num_slots, numel, create=True)
