"""The hot tier's memory: a slab of expert slots that several processes use at once, zero-copy.

Two kinds, one interface (``row``, ``read``, ``write``, ``share``, ``unlink``):

- ``Slab`` (CPU): a file in ``/dev/shm`` mapped with ``torch.from_file(..., shared=True)``. The cache actor
  writes records into slots; a training process on the same node computes on the very same pages and
  applies its optimizer step in place.
- ``CudaSlab`` (GPU): one device allocation owned by the cache actor, shared with the training process on
  the same GPU through a CUDA IPC handle (PyTorch's own ``torch.multiprocessing`` export/import). Only the
  two small functions ``export_cuda_ipc`` / ``import_cuda_ipc`` are GPU-specific.

``share()`` describes a slab so that another process can map it with ``open_shared_slab``.

A ``Slab`` file is RAM for as long as it exists, whoever made it. Every process that maps one also holds a shared
``flock`` on it, which the kernel drops however the process ends (``kill -9`` and the OOM killer included): a
slab file that nobody holds nor maps is an orphan, and ``aios_ray.store.orphans`` reclaims it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aios_ray.errors import UserError

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


SLAB_PREFIX, SLAB_SUFFIX = "aios-ray-", ".slab"


def store_digest(store_root: str) -> str:
    """What every slab file of the store at ``store_root`` ends with (before ``.slab``)."""
    return hashlib.sha1(str(Path(store_root).resolve()).encode()).hexdigest()[:12]


def slab_path(namespace: str, name: str, store_root: str) -> Path:
    """One slab file per store: the store's directory is part of the name, so two stores that share a
    brain name (two runs, two test sessions) never map each other's slots."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{namespace}-{name}")
    return SHM_DIR / f"{SLAB_PREFIX}{safe}-{store_digest(store_root)}{SLAB_SUFFIX}"


class _Rows:
    """What both kinds share: ``tensor`` is (num_slots, numel) fp32."""

    tensor: torch.Tensor
    num_slots: int
    numel: int

    def row(self, slot: int) -> torch.Tensor:
        return self.tensor[slot]

    def read(self, slot: int) -> np.ndarray:
        """A host copy of one slot (what is written back to the tier below)."""
        return self.tensor[slot].detach().cpu().numpy().copy()

    def write(self, slot: int, flat: np.ndarray) -> None:
        # Records from Ray's object store are read-only views: torch.from_numpy would warn on every one, and
        # torch.as_tensor copies only when the dtype differs, so the bytes are copied once, into the slot.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.row(slot).copy_(torch.as_tensor(np.asarray(flat, dtype=np.float32)))


class Slab(_Rows):
    """``num_slots`` rows of ``numel`` fp32 values in a shared, file-backed mapping, held (``flock``) by this
    process while the object lives."""

    def __init__(self, path: Path, num_slots: int, numel: int, create: bool) -> None:
        self.path, self.num_slots, self.numel = Path(path), num_slots, numel
        size = num_slots * numel
        if create:
            self._fd, mapped = _create_held(self.path, size)
        else:
            self._fd = _open_held(self.path, size * 4, f"no slab of {num_slots} x {numel} floats to map")
            mapped = torch.from_file(str(self.path), shared=True, size=size, dtype=torch.float32)
        self._identity = _identity(os.fstat(self._fd))
        # The lock goes when the object does (a re-mapped slab's old object is dropped, not closed).
        self._release = weakref.finalize(self, os.close, self._fd)
        self.tensor = mapped.view(num_slots, numel)

    def share(self) -> dict[str, Any]:
        return {"kind": "shm", "path": str(self.path), "num_slots": self.num_slots, "numel": self.numel}

    def unlink(self) -> None:
        """Remove the file, if the name still is this slab's: a slab created under the same name since (another
        incarnation, another run of the store) belongs to someone else. Memory still mapped stays valid."""
        with contextlib.suppress(FileNotFoundError):
            if _identity(os.stat(self.path)) == self._identity:
                os.unlink(self.path)
        self._release()


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _create_held(path: Path, size: int) -> tuple[int, torch.Tensor]:
    """A new slab file at ``path`` that is already held and mapped when it appears there: it is made under a
    hidden temporary name (which no orphan sweep looks at) and renamed into place. A file that was at ``path``
    is replaced, never truncated: a process still mapping it keeps valid memory until it unmaps."""
    building = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(building, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.ftruncate(fd, size * 4)  # sparse until written: creating a large slab is instant
        mapped = torch.from_file(str(building), shared=True, size=size, dtype=torch.float32)
        os.rename(building, path)
    except BaseException:
        os.close(fd)
        building.unlink(missing_ok=True)
        raise
    return fd, mapped


def _open_held(path: Path, nbytes: int, what: str) -> int:
    """Open and hold an existing slab file of ``nbytes``. The shared lock waits while an orphan sweep decides on
    this file; a file the sweep removed meanwhile (no links left) is not there to map."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what}") from None
    fcntl.flock(fd, fcntl.LOCK_SH)
    stat = os.fstat(fd)
    if stat.st_nlink == 0 or stat.st_size != nbytes:
        os.close(fd)
        raise FileNotFoundError(f"{path}: {what}")
    return fd


class CudaSlab(_Rows):
    """The slots in GPU memory. The owner allocates them; another process on the same GPU maps them."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.num_slots, self.numel = tensor.shape

    @classmethod
    def allocate(cls, num_slots: int, numel: int, device: torch.device) -> CudaSlab:
        return cls(torch.zeros(num_slots, numel, dtype=torch.float32, device=device))

    def share(self) -> dict[str, Any]:
        return {"kind": "cuda", "ipc": export_cuda_ipc(self.tensor), "gpu": gpu_uuid(self.tensor.device),
                "num_slots": self.num_slots, "numel": self.numel}

    def unlink(self) -> None:
        """The memory is freed with the owner's tensor; nothing on disk."""


HotSlab = Slab | CudaSlab


def open_shared_slab(info: dict[str, Any]) -> HotSlab:
    """Map the slab that ``share()`` described, in this process (zero-copy)."""
    if info["kind"] == "shm":
        return Slab(Path(info["path"]), info["num_slots"], info["numel"], create=False)
    device = torch.device("cuda", torch.cuda.current_device())
    if gpu_uuid(device) != info["gpu"]:
        raise UserError(f"the hot expert tier's slots are on GPU {info['gpu']}, this training process runs on "
                        f"GPU {gpu_uuid(device)}: CUDA IPC shares memory only on the same GPU")
    return CudaSlab(import_cuda_ipc(info["ipc"], device.index))


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def export_cuda_ipc(tensor: torch.Tensor) -> tuple:
    """The CUDA IPC description of ``tensor`` (memory handle, offsets, ref-counter handle), as PyTorch's
    ``torch.multiprocessing`` sends a CUDA tensor to another process. The owner must keep ``tensor`` alive."""
    from torch.multiprocessing.reductions import reduce_tensor

    _rebuild, args = reduce_tensor(tensor)
    return args


# Where ``reduce_tensor`` puts the exporter's device index among the arguments of ``rebuild_cuda_tensor``.
_IPC_DEVICE_ARG = 6


def import_cuda_ipc(args: tuple, device_index: int) -> torch.Tensor:
    """A tensor on the same device memory as the exporter's (``cudaIpcOpenMemHandle`` under the hood).
    ``device_index`` is that GPU's index in this process, which need not be the exporter's: each Ray
    worker numbers the GPUs it sees from 0."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    local = list(args)
    local[_IPC_DEVICE_ARG] = device_index
    return rebuild_cuda_tensor(*local)
