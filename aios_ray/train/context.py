"""The worker context: what the training loop needs from its surroundings (a plain process, a Ray Train
worker; a Tune trial when tuning comes). The loop reaches Ray only through it, so the loop never imports ray."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from aios_ray.config import StoreConfig
from aios_ray.store.backend import Workers
from aios_ray.store.control import LocalStore, StoreControl
from aios_ray.store.record import ExpertLayout


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap_model(self, model: nn.Module) -> nn.Module: ...
    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...
    def publish(self, event: str, fields: dict[str, Any]) -> None: ...
    def any_rank(self, flag: bool) -> bool: ...
    def min_over_ranks(self, value: int) -> int: ...
    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def open_expert_store(self, config: StoreConfig, layout: ExpertLayout) -> StoreControl: ...
    def workers(self, config: StoreConfig) -> Workers: ...


class LocalContext:
    """A single process without Ray (tests, --no-ray). Use it as a context manager: the stores it opened are
    closed when the block ends, however it ends (their hot slab is a /dev/shm file, RAM until removed)."""

    rank, world_size = 0, 1

    def __init__(self, use_gpu: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.stores: list[LocalStore] = []

    def __enter__(self) -> LocalContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self.stores:
            self.stores.pop().close()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        return None

    def publish(self, event: str, fields: dict[str, Any]) -> None:
        return None  # no Ray, no metrics endpoint: the metrics log is the record

    def any_rank(self, flag: bool) -> bool:
        return flag

    def min_over_ranks(self, value: int) -> int:
        return value

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        yield None

    def workers(self, config: StoreConfig) -> Workers:
        return Workers()

    def open_expert_store(self, config: StoreConfig, layout: ExpertLayout) -> StoreControl:
        """Without Ray the same tier classes run in this process."""
        self.stores.append(LocalStore(config, layout))
        return self.stores[-1]
