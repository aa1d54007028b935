"""The expert registry: ``artifacts/experts/registry.json``, one entry per expert ("subbrain").

The registry describes experts; it never holds their weights. An expert's weights live in
``<registry dir>/<expert_id>/expert.safetensors`` and its entry's ``checkpoint_path`` points there, relative
to the registry's directory with forward slashes, so the whole ``experts/`` folder can be moved or copied
between machines (and operating systems) without rewriting the registry.

Every change is read-modify-write under an exclusive ``flock`` on a side file (``.registry.json.lock``)
and lands with an atomic rename, so concurrent writers (several processes, e.g. parallel expert trainings)
lose no entry and readers never see a half-written file. A registry that does not parse, or parses as
something that is not a registry, raises :class:`RegistryError` and is never overwritten.

Kept free of torch, ray and the training loop: any tool (CLI, training, routing) may use it.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from aios_ray.durable import atomic_write_json
from aios_ray.errors import RegistryError

REGISTRY_VERSION = 1
CHECKPOINT_NAME = "expert.safetensors"
# Letters, digits, '.', '_' and '-', starting with a letter or digit: never a path separator, never '.' or
# '..', never a hidden name, and the same on every file system. '..' inside is refused too.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# The seed's schema. Values are defaults for an entry that does not give them (an older or hand-written file
# is filled in on load; fields we do not know are kept as they are).
ENTRY_DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "category": "general",
    "goals": [],  # ids of the goals linked in the goals DB (a mirror of it: see aios_ray.experts.goals)
    "created_at": None,
    "last_trained": None,
    "training_datasets": [],
    "performance_metrics": {},
    "total_activations": 0,
    "avg_routing_weight": 0.0,
    "is_active": True,
    "is_frozen": False,
    "parent_expert_id": None,
    "child_expert_ids": [],
    "checkpoint_path": None,
    "training_config": {},
}
# Fields that update() refuses: the id is the key, and the hierarchy is kept two-sided by add() and delete().
_STRUCTURAL = frozenset({"expert_id", "parent_expert_id", "child_expert_ids"})
_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "description": str, "category": str, "goals": list, "created_at": (str, type(None)),
    "last_trained": (str, type(None)), "training_datasets": list, "performance_metrics": dict,
    "total_activations": int, "avg_routing_weight": (int, float), "is_active": bool, "is_frozen": bool,
    "checkpoint_path": (str, type(None)), "training_config": dict,
}


def utc_now() -> str:
    """ISO-8601 UTC, to the second: what every timestamp of the registry and the goals DB uses."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def validate_expert_id(expert_id: object) -> str:
    """``expert_id`` if it is safe as a folder name under the registry's directory, else RegistryError."""
    if not isinstance(expert_id, str) or not _ID_PATTERN.fullmatch(expert_id) or ".." in expert_id:
        raise RegistryError(f"expert id {expert_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with "
                            f"a letter or digit, without '..' (it names a folder under the registry)")
    return expert_id


def validate_checkpoint_path(value: str) -> str:
    """A checkpoint path as the registry stores it: relative, forward slashes, not leaving the registry dir."""
    posix = value.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if not posix or posix.startswith("/") or re.match(r"[A-Za-z]:", posix) or ".." in parts:
        raise RegistryError(f"checkpoint_path {value!r}: must be relative to the registry's directory, "
                            f"without '..'")
    return posix


@dataclass
class TreeNode:
    """One expert in the hierarchy view, with its children (an id whose parent is unknown is a root)."""

    entry: dict[str, Any]
    children: list[TreeNode] = field(default_factory=list)

    @property
    def expert_id(self) -> str:
        return self.entry["expert_id"]


class ExpertRegistry:
    """``registry.json`` at ``path``. Reads are lock-free (the file is only ever replaced whole); every
    mutation reloads the file under the lock, so it acts on what other writers wrote meanwhile."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.root = self.path.parent

    # ---- reading -------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, Any]:
        """The whole registry (a fresh copy); an empty one when the file does not exist yet."""
        if not self.path.exists():
            return {"version": REGISTRY_VERSION, "base_model": None, "experts": []}
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{self.path}: corrupt expert registry (not JSON: {exc}); left as it is") from None
        except OSError as exc:
            raise RegistryError(f"{self.path}: cannot read ({exc.strerror})") from None
        return self._checked(data)

    def _checked(self, data: Any) -> dict[str, Any]:
        """``data`` with every entry filled in, or RegistryError if it is not an expert registry of ours."""
        if not isinstance(data, dict) or not isinstance(data.get("version"), int) \
                or not isinstance(data.get("experts"), list):
            raise RegistryError(f"{self.path}: not an expert registry (expected an object with 'version' and "
                                f"'experts'); left as it is")
        if data["version"] > REGISTRY_VERSION:
            raise RegistryError(f"{self.path}: registry version {data['version']} is newer than this aios-ray "
                                f"reads ({REGISTRY_VERSION}); left as it is")
        seen: set[str] = set()
        experts = []
        for index, entry in enumerate(data["experts"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("expert_id"), str):
                raise RegistryError(f"{self.path}: experts[{index}] has no expert_id; left as it is")
            try:
                validate_expert_id(entry["expert_id"])
            except RegistryError as exc:
                raise RegistryError(f"{self.path}: experts[{index}]: {exc}") from None
            if entry["expert_id"] in seen:
                raise RegistryError(f"{self.path}: expert {entry['expert_id']!r} is listed twice; left as it is")
            seen.add(entry["expert_id"])
            experts.append({**copy.deepcopy(ENTRY_DEFAULTS), **entry})
        data.setdefault("base_model", None)
        data["experts"] = experts
        return data

    def experts(self) -> list[dict[str, Any]]:
        return self.load()["experts"]

    def ids(self) -> set[str]:
        return {e["expert_id"] for e in self.experts()}

    def get(self, expert_id: str) -> dict[str, Any]:
        """One entry (a copy); RegistryError if the id is invalid or not in the registry."""
        return _find(self.load(), validate_expert_id(expert_id), self.path)

    def expert_dir(self, expert_id: str) -> Path:
        """``<registry dir>/<expert_id>/``: where the expert's weights and training logs go."""
        return self.root / validate_expert_id(expert_id)

    def checkpoint_file(self, expert_id: str) -> Path:
        """The expert's weights file, resolved against the registry's directory."""
        entry = self.get(expert_id)
        relative = entry["checkpoint_path"] or f"{expert_id}/{CHECKPOINT_NAME}"
        return self.root / validate_checkpoint_path(relative)

    def tree(self) -> list[TreeNode]:
        """The hierarchy by parent_expert_id, roots in registry order. An entry whose parent is missing is a
        root too, so nothing is hidden by a hand-edited file; a cycle is broken where it is first met."""
        entries = self.experts()
        by_id = {e["expert_id"]: TreeNode(e) for e in entries}
        roots: list[TreeNode] = []
        for entry in entries:
            parent = entry["parent_expert_id"]
            node = by_id[entry["expert_id"]]
            if parent in by_id and parent != entry["expert_id"] and not _is_ancestor(by_id, node, parent):
                by_id[parent].children.append(node)
            else:
                roots.append(node)
        return roots

    # ---- writing -------------------------------------------------------------------------------------------

    def add(self, expert_id: str, *, parent_expert_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """A new entry (RegistryError if the id is taken). ``parent_expert_id`` must exist; the parent's
        ``child_expert_ids`` gains the new id in the same write. Returns the entry as written."""
        validate_expert_id(expert_id)
        if parent_expert_id is not None:
            validate_expert_id(parent_expert_id)
        if "child_expert_ids" in fields:
            raise RegistryError(f"add of {expert_id!r}: child_expert_ids follow from the children's parents")
        _check_fields(fields, self.path)
        with self._mutating() as data:
            if any(e["expert_id"] == expert_id for e in data["experts"]):
                raise RegistryError(f"{self.path}: expert {expert_id!r} already exists")
            if parent_expert_id is not None:
                _find(data, parent_expert_id, self.path, live=True)["child_expert_ids"].append(expert_id)
            entry = {**copy.deepcopy(ENTRY_DEFAULTS), "expert_id": expert_id, "name": expert_id,
                     "created_at": utc_now(), "checkpoint_path": f"{expert_id}/{CHECKPOINT_NAME}", **fields,
                     "parent_expert_id": parent_expert_id}
            data["experts"].append(entry)
        return copy.deepcopy(entry)

    def upsert(self, expert_id: str, *, parent_expert_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """``update`` if the expert exists (its parent stays), else ``add``: what a training run that (re)builds
        an expert calls. The check and the write are not one critical section, so a concurrent ``add`` of the
        same id can still win; the loser then updates."""
        try:
            return self.add(expert_id, parent_expert_id=parent_expert_id, **fields)
        except RegistryError:
            if expert_id not in self.ids():
                raise
            return self.update(expert_id, **fields)

    def update(self, expert_id: str, **fields: Any) -> dict[str, Any]:
        """Set ``fields`` of one entry under the lock; returns the entry as written. The id and the hierarchy
        fields are refused (add/delete keep parent and children consistent)."""
        validate_expert_id(expert_id)
        refused = sorted(_STRUCTURAL & fields.keys())
        if refused:
            raise RegistryError(f"update of {expert_id!r}: {', '.join(refused)} cannot be changed")
        _check_fields(fields, self.path)
        self.get(expert_id)  # an unknown id fails before the lock file is created
        return self.modify(expert_id, lambda entry: entry.update(copy.deepcopy(fields)))

    def modify(self, expert_id: str, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        """Read-modify-write of one entry in one critical section: ``change(entry)`` edits the entry in place
        with the lock held, so what it reads is current (e.g. adding a run's activations to
        ``total_activations``, where ``update`` with a value read earlier would lose a concurrent run's count).
        Changing the id or the hierarchy, or a field's type, is refused and nothing is written."""
        validate_expert_id(expert_id)
        self.get(expert_id)  # an unknown id fails before the lock file is created
        with self._mutating() as data:
            entry = _find(data, expert_id, self.path, live=True)
            structure = {name: copy.deepcopy(entry[name]) for name in _STRUCTURAL}
            change(entry)
            moved = sorted(name for name, value in structure.items() if entry.get(name) != value)
            if moved:
                raise RegistryError(f"change of {expert_id!r}: {', '.join(moved)} cannot be changed")
            _check_fields(entry, self.path)
        return copy.deepcopy(entry)

    def delete(self, expert_id: str, *, recursive: bool = False, remove_files: bool = True) -> list[str]:
        """Remove an expert (and with ``recursive`` its whole subtree) from the registry, then their folders.
        An expert with children is refused without ``recursive``. Returns the removed ids, the expert first."""
        validate_expert_id(expert_id)
        self.get(expert_id)
        with self._mutating() as data:
            entry = _find(data, expert_id, self.path, live=True)
            if entry["child_expert_ids"] and not recursive:
                raise RegistryError(f"expert {expert_id!r} has children ({', '.join(entry['child_expert_ids'])}): "
                                    f"delete them first or pass --recursive")
            doomed = _subtree(data, expert_id)
            data["experts"] = [e for e in data["experts"] if e["expert_id"] not in doomed]
            for other in data["experts"]:
                other["child_expert_ids"] = [c for c in other["child_expert_ids"] if c not in doomed]
        if remove_files:  # after the registry no longer names them: it never points at a half-removed folder
            for gone in doomed:
                _remove_dir(self.root / gone)
        return doomed

    def set_base_model(self, base_model: str | None) -> None:
        with self._mutating() as data:
            data["base_model"] = base_model

    @contextmanager
    def _mutating(self) -> Iterator[dict[str, Any]]:
        """The registry, reloaded under the lock; written back atomically if the block ends without error."""
        with self._lock():
            data = self.load()
            yield data
            data["version"] = REGISTRY_VERSION
            atomic_write_json(self.path, data)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive lock on a side file: the registry itself is replaced by rename on every write, so a
        lock on its inode would guard a file nobody reads any more."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _find(data: dict[str, Any], expert_id: str, path: Path, live: bool = False) -> dict[str, Any]:
    for entry in data["experts"]:
        if entry["expert_id"] == expert_id:
            return entry if live else copy.deepcopy(entry)
    raise RegistryError(f"unknown expert {expert_id!r} (not in {path})")


def _subtree(data: dict[str, Any], expert_id: str) -> list[str]:
    """``expert_id`` and every descendant (by child_expert_ids), each once, parents before children."""
    children = {e["expert_id"]: e["child_expert_ids"] for e in data["experts"]}
    order, todo = [], [expert_id]
    while todo:
        current = todo.pop(0)
        if current in order or current not in children:
            continue
        order.append(current)
        todo.extend(children[current])
    return order


def _is_ancestor(by_id: dict[str, TreeNode], node: TreeNode, parent: str) -> bool:
    """Whether ``node`` is above ``parent`` by parent_expert_id (linking them would close a cycle)."""
    seen, current = set(), by_id[parent]
    while current is not None and current.expert_id not in seen:
        if current is node:
            return True
        seen.add(current.expert_id)
        grand = current.entry["parent_expert_id"]
        current = by_id.get(grand) if grand != current.expert_id else None
    return False


def _check_fields(fields: dict[str, Any], path: Path) -> None:
    for name, value in fields.items():
        if name not in _TYPES and name not in _STRUCTURAL:
            continue  # a field the seed's schema does not know: kept as given (forward compatible)
        expected = _TYPES.get(name)
        if expected is not None and (not isinstance(value, expected)
                                     or (isinstance(value, bool) and expected in (int, (int, float)))):
            raise RegistryError(f"{path}: field {name!r} = {value!r} has the wrong type")
        if name == "checkpoint_path" and value is not None:
            fields[name] = validate_checkpoint_path(value)


def _remove_dir(folder: Path) -> None:
    if folder.is_symlink():
        folder.unlink()  # the link, never what it points at
    elif folder.is_dir():
        shutil.rmtree(folder)
