"""The NVMe tier: the durable home of every expert record.

```
<root>/manifest.json                               layout + per expert: file, checksum, version, bytes
<root>/experts/L003-E00017.000000042.safetensors   the record's named parts (``ExpertLayout`` order)
<root>/snapshots/step_00000010.json                a manifest kept under a tag (a training checkpoint)
```
Only safetensors and JSON are read back, never pickle. Every write goes to a new file (the number is
a store-wide write generation): a file the manifest names is never overwritten. Each file is written to
a temporary name, fsynced and renamed, then the directory is fsynced; the manifest is written last, so
a manifest on disk only names files that are complete on disk.

Committed and staged writes: ``write_many(..., commit=False)`` (a DRAM cache writing back an evicted
record between flushes) stages the new file; reads see it, the manifest does not. ``commit()`` (the
store's flush) makes every staged record part of the manifest in one atomic rename;
``discard_staged()`` (recovery after a cache actor died) drops them. So the manifest is always exactly
the last flush: a crash at any point, even in the middle of a flush, leaves the previous flush intact,
and files no manifest names are removed when the store is opened again. A read verifies every byte of
the file against the manifest's checksum, so a torn, truncated or bit-flipped file raises
``StoreCorruptError`` instead of handing a trainer wrong weights.

Checksums: XXH3-128 (``xxhash``), the kind of checksum storage engines use for this (RocksDB's default is
XXH3): it detects torn, truncated, swapped and bit-flipped files like sha256 does, at ~24 GiB/s on an idle
core here instead of sha256's ~1.4 GiB/s, which was slower than the disk and the largest cost of a read. It is
not a defence against someone who can write the store's files (neither was sha256 next to a manifest
they can rewrite). Format 2 manifests (written since) hold ``"xxh3_128"`` per entry; format 1 manifests
and snapshots hold ``"sha256"``. Old entries are not migrated: an entry is verified with the checksum it
was written with, so opening an old store stays a read of one JSON file (a migration would read every
record once at open), a format-1 snapshot restores as is, and an old record moves to XXH3 when its
expert is next written. The next manifest write (a commit, snapshot or restore) makes it format 2 (old
entries keep their ``"sha256"``); code from before this change refuses a format-2 manifest by name
rather than misreading it.

Reads are the hot path (a cache miss in the DRAM tier), so a read does one pass over the file: it
``readinto``s each tensor straight into its slot of the flat record and feeds the same memory to the
checksum; no intermediate ``bytes`` object and no second copy (benchmarks/nvme_read.py measures the
alternatives).

Snapshots: ``snapshot(tag)`` commits and keeps a copy of the manifest under ``tag``; ``restore(tag)`` makes
it the manifest again. Files are never overwritten, so a snapshot costs one small JSON file, and a file is
deleted only once neither the manifest nor any snapshot names it. Why: a training checkpoint and the
store's flush must describe the same moment, and Ray Train may resume from a checkpoint older than the
last flush (a report still in flight when the worker died); the trainer tags each checkpoint's flush and
restores that tag on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xxhash
from safetensors.numpy import save as save_safetensors_bytes

from aios_ray.durable import atomic_write_bytes, fsync_dir
from aios_ray.errors import UserError
from aios_ray.store.record import PARTS, ExpertKey, ExpertLayout

MANIFEST = "manifest.json"
EXPERTS = "experts"
SNAPSHOTS = "snapshots"
FORMAT = 2  # the format this code writes; it reads READ_FORMATS
READ_FORMATS = {1: ("sha256",), 2: ("xxh3_128", "sha256")}  # format -> checksums its entries may carry
CHECKSUM = "xxh3_128"  # what new files get
HEX_DIGITS = {"xxh3_128": 32, "sha256": 64}
MAX_HEADER = 1 << 20  # a record's safetensors header is < 2 KiB; anything near this is garbage

Item = tuple[ExpertKey, np.ndarray, int]  # (key, flat fp32 record, version): one element of a write batch


class StoreCorruptError(UserError):
    """A store file (an expert or the manifest) that is missing, truncated, torn or altered."""


class StoreLayoutError(UserError):
    """A store opened with an expert layout other than the one it was written with."""


@dataclass(frozen=True)
class Entry:
    """What the manifest says about one expert file; ``checksum`` names the algorithm of ``digest``."""

    file: str
    checksum: str
    digest: str
    version: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, self.checksum: self.digest, "version": self.version, "bytes": self.bytes}


def new_hasher(checksum: str) -> Any:
    """A fresh incremental hasher (``update``/``hexdigest``) of a checksum a manifest entry may name."""
    return xxhash.xxh3_128() if checksum == "xxh3_128" else hashlib.sha256()


def expert_file(key: ExpertKey, generation: int) -> str:
    """A file of ``key`` relative to the store root: one per write, numbered by the write generation."""
    return f"{EXPERTS}/{key.name}.{generation:09d}.safetensors"


def _file_generation(key: ExpertKey, file: str) -> int | None:
    """The generation of ``file`` if it is a file name of ``key`` (the only names an entry may carry)."""
    prefix, suffix = f"{EXPERTS}/{key.name}.", ".safetensors"
    if not (file.startswith(prefix) and file.endswith(suffix)):
        return None
    number = file[len(prefix):-len(suffix)]
    return int(number) if number.isdigit() and len(number) == 9 else None


def numpy_parts(layout: ExpertLayout, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Named numpy views of a record (no copy).

    ``layout.views`` works on torch tensors; ``torch.from_numpy`` warns on the read-only arrays that
    Ray hands to an actor, so this uses the same offsets and shapes on the numpy array directly.
    """
    return {name: flat[a:b].reshape(layout.shapes[name]) for name, (a, b) in layout.offsets.items()}


def check_record(layout: ExpertLayout, key: ExpertKey, flat: np.ndarray) -> np.ndarray:
    """The record as a contiguous 1-D fp32 array; refuses anything else before a byte is written."""
    if not isinstance(flat, np.ndarray) or flat.dtype != np.float32 or flat.shape != (layout.numel,):
        got = (getattr(flat, "dtype", type(flat).__name__), getattr(flat, "shape", None))
        raise ValueError(f"{key.name}: expected a float32 array of shape ({layout.numel},), got {got}")
    return np.ascontiguousarray(flat)


def encode_record(layout: ExpertLayout, key: ExpertKey, flat: np.ndarray, version: int) -> bytes:
    """The safetensors bytes of one record; key and version ride along in the header for offline recovery."""
    metadata = {"key": key.name, "version": str(version), "layout": f"{layout.hidden_size}x{layout.ffn_size}"}
    return save_safetensors_bytes(numpy_parts(layout, flat), metadata=metadata)


def _readinto_exact(f: BinaryIO, view: memoryview, path: Path) -> None:
    """Fill ``view`` from ``f``; a short read means the file shrank under us (torn or truncated)."""
    done, total = 0, len(view)
    while done < total:
        n = f.readinto(view[done:])
        if not n:
            raise StoreCorruptError(f"{path}: truncated ({done} of {total} bytes of a section)")
        done += n


class NvmeStore:
    """Expert records on a local disk, one safetensors file each, indexed by a checksummed manifest.

    Thread-safe: writes are serialised (they rewrite the manifest) and fan their files out over a few
    threads (fsyncs overlap); reads run concurrently with each other and with writes.

    ``read_many`` reads in the calling thread but asks the kernel to read ``read_ahead`` files ahead
    (``POSIX_FADV_WILLNEED``), so the disk works while this thread hashes. That keeps the disk queue full
    without reader threads, which on a busy 2-core machine lost to the GIL and the scheduler (interleaved
    cold-cache runs: 0.92 of a plain sequential read with 4 files ahead, 0.67 with a 4-thread pool).
    """

    def __init__(self, root: Path | str, layout: ExpertLayout, *, read_ahead: int = 4, write_threads: int = 4) -> None:
        self.root = Path(root)
        self.layout = layout
        self.read_ahead = read_ahead
        self.write_threads = write_threads
        self._lock = threading.Lock()  # held by writers; a read takes it only to retry after a mismatch
        self._pool_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        (self.root / EXPERTS).mkdir(parents=True, exist_ok=True)
        (self.root / SNAPSHOTS).mkdir(exist_ok=True)
        self._entries = self._open_manifest()  # committed: exactly what the manifest says
        self._staged: dict[ExpertKey, Entry] = {}  # written since the last commit; lost if this process dies
        self._snapshots = {path.stem: frozenset(e.file for e in self._read_manifest(path).values())
                           for path in sorted((self.root / SNAPSHOTS).glob("*.json"))}  # tag -> files it names
        self._generation = self._remove_unreferenced_files()
        self.incarnation = uuid.uuid4().hex  # a new one after a restart: staged records are gone

    # ----------------------------------------------------------------------------- manifest

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _open_manifest(self) -> dict[ExpertKey, Entry]:
        """Load the manifest, or start one for a new store; a lost manifest beside expert files is corruption."""
        if not self.manifest_path.exists():
            if any((self.root / EXPERTS).glob("*.safetensors")):
                raise StoreCorruptError(f"{self.manifest_path}: missing, but {self.root / EXPERTS} holds experts")
            self._write_manifest({})
            return {}
        return self._read_manifest(self.manifest_path)

    def _read_manifest(self, path: Path) -> dict[ExpertKey, Entry]:
        """The entries of a manifest file (the manifest itself or a snapshot), fully validated."""
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise StoreCorruptError(f"{path}: missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreCorruptError(f"{path}: corrupt manifest, not JSON ({exc})") from None
        fmt = data.get("format") if isinstance(data, dict) else None
        if type(fmt) is not int or fmt not in READ_FORMATS:
            raise StoreCorruptError(f"{path}: corrupt manifest, not a store manifest of format "
                                    f"{' or '.join(map(str, sorted(READ_FORMATS)))}")
        self._check_layout(data.get("layout"), path)
        experts = data.get("experts")
        if not isinstance(experts, dict):
            raise StoreCorruptError(f"{path}: corrupt manifest, 'experts' is not an object")
        checksums = READ_FORMATS[fmt]
        return {key: entry for key, entry in (self._parse_entry(n, e, path, checksums) for n, e in experts.items())}

    def _check_layout(self, layout: Any, path: Path) -> None:
        want = {"hidden_size": self.layout.hidden_size, "ffn_size": self.layout.ffn_size}
        if not isinstance(layout, dict) or set(layout) != set(want):
            raise StoreCorruptError(f"{path}: corrupt manifest, bad 'layout' {layout!r}")
        if layout != want:
            raise StoreLayoutError(f"{self.root}: store holds experts of layout hidden={layout['hidden_size']} "
                                   f"ffn={layout['ffn_size']}, opened with hidden={want['hidden_size']} "
                                   f"ffn={want['ffn_size']}")

    def _remove_unreferenced_files(self) -> int:
        """Delete files that neither the manifest nor a snapshot names (staged or half-written before a
        crash); return the next write generation."""
        referenced = {self.root / entry.file for entry in self._entries.values()}
        referenced.update(self.root / file for files in self._snapshots.values() for file in files)
        highest = 0
        for path in (self.root / EXPERTS).iterdir():
            if path in referenced:
                key = ExpertKey.parse(path.name.split(".")[0])
                highest = max(highest, _file_generation(key, f"{EXPERTS}/{path.name}") or 0)
            else:
                path.unlink(missing_ok=True)
        return highest + 1

    def _parse_entry(self, name: str, raw: Any, path: Path, checksums: Sequence[str]) -> tuple[ExpertKey, Entry]:
        try:
            key = ExpertKey.parse(name)
            [checksum] = [c for c in checksums if c in raw]  # exactly one checksum the format allows
            entry = Entry(file=raw["file"], checksum=checksum, digest=raw[checksum], version=raw["version"],
                          bytes=raw["bytes"])
            ok = (_file_generation(key, entry.file) is not None and isinstance(entry.digest, str)
                  and len(entry.digest) == HEX_DIGITS[checksum] and all(c in "0123456789abcdef" for c in entry.digest)
                  and all(type(v) is int and v >= 0 for v in (entry.version, entry.bytes)))
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise StoreCorruptError(f"{path}: corrupt manifest entry {name!r}: {raw!r}"[:300])
        return key, entry

    def _write_manifest(self, entries: dict[ExpertKey, Entry], path: Path | None = None) -> None:
        data = {"format": FORMAT,
                "layout": {"hidden_size": self.layout.hidden_size, "ffn_size": self.layout.ffn_size},
                "experts": {key.name: entries[key].to_json() for key in sorted(entries)}}
        path = path or self.manifest_path
        atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))

    # ----------------------------------------------------------------------------- queries

    # ``self._entries`` is never mutated in place: a write publishes a new dict, so lock-free reads of it
    # see either the old or the new manifest, never a half-updated one.

    def keys(self) -> list[ExpertKey]:
        return sorted(set(self._entries) | set(self._staged))

    def version(self, key: ExpertKey) -> int:
        return self._entry(key).version

    def committed_versions(self) -> dict[ExpertKey, int]:
        """The version of every expert as of the last commit (the last flush), staged writes ignored."""
        return {key: entry.version for key, entry in self._entries.items()}

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._staged

    def __len__(self) -> int:
        return len(self.keys())

    def path(self, key: ExpertKey) -> Path:
        """The file that holds the newest record of ``key`` (staged, else committed)."""
        return self.root / self._entry(key).file

    def _entry(self, key: ExpertKey) -> Entry:
        entry = self._staged.get(key) or self._entries.get(key)
        if entry is None:
            raise KeyError(f"{key.name}: not in the store at {self.root}")
        return entry

    # ----------------------------------------------------------------------------- writes

    def write(self, key: ExpertKey, flat: np.ndarray, version: int) -> None:
        self.write_many([(key, flat, version)])

    def write_many(self, items: Iterable[Item], commit: bool = True) -> None:
        """Write records to new files; with ``commit`` (the default) they and everything staged become
        the manifest at once, otherwise they are staged until ``commit()``."""
        batch = self._check_batch(items)
        if not batch:
            return
        with self._lock:
            generations = range(self._generation, self._generation + len(batch))
            self._generation += len(batch)
            written = list(self._executor().map(lambda job: self._write_file(*job[0], job[1]),
                                                zip(batch, generations, strict=True)))
            fsync_dir(self.root / EXPERTS)
            staged = dict(self._staged)
            superseded = [staged[key] for key, _, _ in batch if key in staged]
            staged.update(zip((key for key, _, _ in batch), written, strict=True))
            self._staged = staged
            self._delete(e.file for e in superseded)  # staged files never reached a manifest
            if commit:
                self._commit_locked()

    def commit(self) -> int:
        """Make every staged record part of the manifest (one atomic write); returns how many."""
        with self._lock:
            return self._commit_locked()

    def _commit_locked(self) -> int:
        if not self._staged:
            return 0
        entries = {**self._entries, **self._staged}
        superseded = [self._entries[key] for key in self._staged if key in self._entries]
        self._write_manifest(entries)
        self._entries, count, self._staged = entries, len(self._staged), {}
        self._delete(e.file for e in superseded)  # only once the manifest no longer names them
        return count

    def discard_staged(self) -> int:
        """Forget records written since the last commit: the store is exactly its last flush again."""
        with self._lock:
            staged, self._staged = list(self._staged.values()), {}
            self._delete(e.file for e in staged)
            return len(staged)

    def _delete(self, files: Iterable[str]) -> None:
        """Delete files the manifest no longer names, except those a snapshot still names."""
        kept = self._snapshot_files()
        for file in files:
            if file not in kept:
                (self.root / file).unlink(missing_ok=True)

    # ----------------------------------------------------------------------------- snapshots

    def snapshot(self, tag: str, keep: int | None = None) -> int:
        """Commit, then keep the manifest under ``tag`` (replacing an older snapshot of that tag); with
        ``keep``, only the newest ``keep`` snapshots stay. Returns the number of experts it names."""
        path = self._snapshot_path(tag)
        with self._lock:
            self._commit_locked()
            self._write_manifest(self._entries, path)
            self._snapshots[tag] = frozenset(e.file for e in self._entries.values())
            count = len(self._entries)
        if keep is not None:
            self.keep_snapshots(self.snapshot_tags()[-keep:])
        return count

    def restore(self, tag: str) -> None:
        """Make snapshot ``tag`` the manifest again: staged records and snapshots newer than it (an abandoned
        future, tags sort in step order) are dropped, and so are the files only they named."""
        path = self._snapshot_path(tag)
        if tag not in self._snapshots:
            raise StoreCorruptError(f"{path}: no snapshot {tag!r} in the store (have: {sorted(self._snapshots)})")
        entries = self._read_manifest(path)
        with self._lock:
            dropped = [e.file for e in (*self._staged.values(), *self._entries.values())]
            self._staged = {}
            self._write_manifest(entries)
            self._entries = entries
            for newer in [t for t in self._snapshots if t > tag]:
                dropped.extend(self._snapshots.pop(newer))
                self._snapshot_path(newer).unlink(missing_ok=True)
            named = {e.file for e in entries.values()}
            self._delete(file for file in dropped if file not in named)

    def keep_snapshots(self, tags: Iterable[str]) -> list[str]:
        """Delete every snapshot not in ``tags`` (and the files nothing names any more); returns the deleted."""
        keep = set(tags)
        with self._lock:
            gone = [t for t in self._snapshots if t not in keep]
            dropped = [file for t in gone for file in self._snapshots.pop(t)]
            for tag in gone:
                self._snapshot_path(tag).unlink(missing_ok=True)
            named = {e.file for e in self._entries.values()}
            self._delete(file for file in dropped if file not in named)
            return gone

    def snapshot_tags(self) -> list[str]:
        return sorted(self._snapshots)

    def _snapshot_files(self) -> set[str]:
        return {file for files in self._snapshots.values() for file in files}

    def _snapshot_path(self, tag: str) -> Path:
        if not tag or not all(c.isalnum() or c in "_-." for c in tag) or tag.startswith("."):
            raise ValueError(f"snapshot tag {tag!r}: use letters, digits, '_', '-' and '.' only")
        return self.root / SNAPSHOTS / f"{tag}.json"

    def _check_batch(self, items: Iterable[Item]) -> list[Item]:
        batch, seen = [], set()
        for key, flat, version in items:
            if not isinstance(key, ExpertKey) or key in seen:
                raise ValueError(f"write_many: {key!r} is not an ExpertKey or appears twice in the batch")
            if type(version) is not int or version < 0:
                raise ValueError(f"{key.name}: version must be a non-negative int, got {version!r}")
            seen.add(key)
            batch.append((key, check_record(self.layout, key, flat), version))
        return batch

    def _write_file(self, key: ExpertKey, flat: np.ndarray, version: int, generation: int) -> Entry:
        data = encode_record(self.layout, key, flat, version)
        file = expert_file(key, generation)
        atomic_write_bytes(self.root / file, data)
        return Entry(file=file, checksum=CHECKSUM, digest=xxhash.xxh3_128_hexdigest(data), version=version,
                     bytes=len(data))

    # ----------------------------------------------------------------------------- reads

    def read(self, key: ExpertKey) -> tuple[np.ndarray, int]:
        """The record (a fresh, writable flat fp32 array) and its version, checksum verified."""
        entry = self._entry(key)
        try:
            return self._read_file(entry), entry.version
        except StoreCorruptError:
            # A writer may have renamed a new file in between our manifest look-up and our read:
            # retry once with writers excluded; a second failure is real corruption.
            with self._lock:
                entry = self._entry(key)
                return self._read_file(entry), entry.version

    def read_many(self, keys: Sequence[ExpertKey]) -> list[tuple[np.ndarray, int]]:
        """``read`` of each key, in order, with the kernel reading ``read_ahead`` files ahead."""
        return [(flat, version) for _, flat, version in self.iter_read(keys)]

    def iter_read(self, keys: Sequence[ExpertKey]) -> Iterator[tuple[ExpertKey, np.ndarray, int]]:
        """Stream (key, record, version) with read-ahead, for callers that consume records one by one
        (a list of all records costs page faults for fresh memory the stream does not need)."""
        paths = [self.root / self._entry(key).file for key in keys]  # unknown keys fail before any I/O
        for path in paths[:self.read_ahead]:
            self._advise_willneed(path)
        for i, key in enumerate(keys):
            if i + self.read_ahead < len(paths):
                self._advise_willneed(paths[i + self.read_ahead])
            flat, version = self.read(key)
            yield key, flat, version

    def prefetch(self, keys: Sequence[ExpertKey]) -> int:
        """Ask the kernel to start reading these records into the page cache (returns at once)."""
        paths = [self.root / entry.file for entry in (self._staged.get(k) or self._entries.get(k) for k in keys)
                 if entry is not None]
        for path in paths:
            self._advise_willneed(path)
        return len(paths)

    @staticmethod
    def _advise_willneed(path: Path) -> None:
        """Start reading ``path`` into the page cache in the background (a hint: failures are ignored)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # the read itself reports a missing file
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def verify_all(self) -> list[str]:
        """Paths of the expert files that fail their checksum or structure check (empty if all good)."""
        bad = []
        for key in self.keys():
            try:
                self.read(key)
            except StoreCorruptError:
                bad.append(str(self.path(key)))
        return bad

    def _read_file(self, entry: Entry) -> np.ndarray:
        path = self.root / entry.file
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below; raw I/O, no Python-side buffer copy
        except FileNotFoundError:
            raise StoreCorruptError(f"{path}: missing (the manifest lists it)") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                raise StoreCorruptError(f"{path}: {size} bytes, the manifest says {entry.bytes} (truncated or torn)")
            flat, digest = self._read_record(f, path, size, new_hasher(entry.checksum))
        if digest != entry.digest:
            raise StoreCorruptError(f"{path}: {entry.checksum} mismatch (file {digest[:12]}..., "
                                    f"manifest {entry.digest[:12]}...)")
        return flat

    def _read_record(self, f: BinaryIO, path: Path, size: int, digest: Any) -> tuple[np.ndarray, str]:
        """Read header, then each tensor straight into its slot of the flat array, hashing as we go."""
        prefix = bytearray(8)
        _readinto_exact(f, memoryview(prefix), path)
        n = int.from_bytes(prefix, "little")
        if not 2 <= n <= min(MAX_HEADER, size - 8):
            raise StoreCorruptError(f"{path}: not a safetensors file (header length {n})")
        header = bytearray(n)
        _readinto_exact(f, memoryview(header), path)
        digest.update(prefix)
        digest.update(header)
        flat = np.empty(self.layout.numel, dtype=np.float32)
        flat[self.layout.offsets["step"][1]:] = 0  # alignment padding: not stored, always zero
        for a, b in self._plan(header, size - 8 - n, path):
            view = memoryview(flat[a:b]).cast("B")
            _readinto_exact(f, view, path)
            digest.update(view)
        return flat, digest.hexdigest()

    def _plan(self, header: bytes, data_bytes: int, path: Path) -> list[tuple[int, int]]:
        """The flat-array slots in file order, after checking names, dtypes, shapes and contiguity."""
        try:
            meta = json.loads(header)
            meta.pop("__metadata__", None)
            ok = set(meta) == set(PARTS) and all(
                meta[name]["dtype"] == "F32" and tuple(meta[name]["shape"]) == self.layout.shapes[name]
                for name in PARTS)
            spans = sorted((int(meta[name]["data_offsets"][0]), name) for name in PARTS)
            end = 0
            for begin, name in spans:
                a, b = self.layout.offsets[name]
                ok = ok and begin == end and meta[name]["data_offsets"] == [begin, begin + 4 * (b - a)]
                end = begin + 4 * (b - a)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            raise StoreCorruptError(f"{path}: unreadable safetensors header") from None
        if not ok or end != data_bytes:
            raise StoreCorruptError(f"{path}: safetensors header does not match the store layout")
        return [self.layout.offsets[name] for _, name in spans]

    # ----------------------------------------------------------------------------- lifecycle

    def _executor(self) -> ThreadPoolExecutor:
        """The write pool. Its tasks never take ``_lock`` (the writer holding it waits for them)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.write_threads, thread_name_prefix="nvme-write")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> NvmeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
