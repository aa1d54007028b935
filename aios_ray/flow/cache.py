"""Content-addressed step outputs.

A step's key is the sha256 of its inputs (the data's bytes, the resolved settings, the upstream steps' output
hashes). Its outputs live in ``<root>/<step>-<key[:16]>/`` and count only once ``done.json``, written last and
atomically, names that key: a directory without it is what a failed or interrupted attempt left, and is
removed before the step runs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from aios_ray.data.text import dataset_files
from aios_ray.durable import atomic_write_json
from aios_ray.errors import DataError

DONE = "done.json"
_CHUNK = 1 << 20


def content_key(inputs: dict[str, Any]) -> str:
    """sha256 of the inputs as canonical JSON (sorted keys): equal inputs, equal key."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return digest.hexdigest()


def data_sha256(path_str: str, flag: str) -> str:
    """The sha256 of a data file's bytes (what ``sha256sum`` prints), or for a folder the sha256 over its text
    files' names and hashes. Raises DataError, naming the flag, for a missing path or a folder without text."""
    files = dataset_files(path_str, flag)
    root = Path(path_str)
    if root.is_file():
        return file_sha256(root)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def tree_sha256(root: Path) -> str:
    """The hash of a step's outputs: every file's relative path and bytes (the marker left out)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != DONE):
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def step_dir(root: Path, step: str, key: str) -> Path:
    return root / f"{step}-{key[:16]}"


def read_done(directory: Path, key: str | None = None) -> dict[str, Any] | None:
    """The marker of a finished step (of this ``key`` when given); None when absent, torn or another key's."""
    try:
        record = json.loads((directory / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "output_hash" not in record:
        return None
    return record if key is None or record.get("key") == key else None


def mark_done(directory: Path, record: dict[str, Any]) -> None:
    atomic_write_json(directory / DONE, record)


def clear_leftovers(root: Path, step: str) -> list[Path]:
    """Remove this step's unfinished directories (no valid marker); finished ones of other inputs stay."""
    removed = []
    for directory in sorted(root.glob(f"{step}-*")):
        if directory.is_dir() and read_done(directory) is None:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed
