"""``--cuda-ids``: which of this machine's GPUs the local embedded Ray (or the ``--no-ray`` process) may use.

Ray reads ``CUDA_VISIBLE_DEVICES`` when it starts and offers only those GPUs to the run's workers, so the
selection is made by setting it before ``ray.init``. Indices count among the GPUs visible now (a
``CUDA_VISIBLE_DEVICES`` already set keeps narrowing what can be chosen).
"""

from __future__ import annotations

import os

from aios_ray.config import ClusterConfig
from aios_ray.errors import ConfigError


def select_local_gpus(cluster: ClusterConfig, visible_count: int | None = None) -> str | None:
    """Set ``CUDA_VISIBLE_DEVICES`` to the ``--cuda-ids`` GPUs; returns its new value (None without --cuda-ids).
    ``visible_count``: GPUs visible now (default: as torch counts them, which does not initialise CUDA)."""
    ids = cluster.gpu_ids
    if not ids:
        return None
    visible = _visible_names(visible_count)
    missing = [i for i in ids if i >= len(visible)]
    if missing:
        raise ConfigError(f"--cuda-ids {cluster.cuda_ids}: GPU {missing[0]} is not among the {len(visible)} "
                          f"GPU(s) visible here")
    chosen = ",".join(visible[i] for i in ids)
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def _visible_names(count: int | None) -> list[str]:
    """The names CUDA_VISIBLE_DEVICES would use for the GPUs visible now, in index order."""
    if count is None:
        import torch

        count = torch.cuda.device_count()
    current = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return current[:count]
    return [str(i) for i in range(count)]
