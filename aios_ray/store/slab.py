"""The hot tier's memory: a slab of expert slots that several processes map at once, zero-copy.

On the CPU the slab is a file in ``/dev/shm`` mapped with ``torch.from_file(..., shared=True)``: the
cache actor writes records into slots, a training process on the same node computes on the very same
pages and applies its optimizer step in place. (On a GPU the same role is played by a CUDA IPC
handle of one device allocation; that export/import sits behind this class's interface.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


def slab_path(namespace: str, name: str, store_root: str) -> Path:
    """One slab file per store: the store's directory is part of the name, so two stores that share a
    brain name (two runs, two test sessions) never map each other's slots."""
    digest = hashlib.sha1(str(Path(store_root).resolve()).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{namespace}-{name}")
    return SHM_DIR / f"aios-ray-{safe}-{digest}.slab"


class Slab:
    """``num_slots`` rows of ``numel`` fp32 values in a shared, file-backed mapping."""

    def __init__(self, path: Path, num_slots: int, numel: int, create: bool) -> None:
        self.path, self.num_slots, self.numel = Path(path), num_slots, numel
        size = num_slots * numel
        if create:
            with open(self.path, "wb") as f:
                f.truncate(size * 4)  # sparse until written: creating a large slab is instant
        elif not self.path.is_file() or self.path.stat().st_size != size * 4:
            raise FileNotFoundError(f"{self.path}: no slab of {num_slots} x {numel} floats to map")
        mapped = torch.from_file(str(self.path), shared=True, size=size, dtype=torch.float32)
        self.tensor = mapped.view(num_slots, numel)

    def row(self, slot: int) -> torch.Tensor:
        return self.tensor[slot]

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
