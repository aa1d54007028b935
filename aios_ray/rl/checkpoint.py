"""Checkpoints of a sequential RL run: the algorithm (RLlib ``save_to_path``), the environment detector
(weights, Adam state and its frame memory, as safetensors) and where the schedule stood (JSON).

A checkpoint is written under a temporary name and renamed into place, so a directory named
``ckpt_<iteration>`` is always complete; the newest two are kept. With experts in the tiered store, the store
is snapshotted under the checkpoint's name as well (``aios_ray.rl.tiered``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from aios_ray.durable import fsync_dir
from aios_ray.errors import DataError
from aios_ray.rl.detector import DetectorTrainer
from aios_ray.store.backend import ExpertBackend

CHECKPOINTS = "checkpoints"
KEEP = 2


@dataclass
class ScheduleState:
    """Where the schedule stands: the phase under way and how far into it, and what was measured so far."""

    iteration: int = 0  # PPO iterations done in the whole run
    phase: int = 0  # index of the phase under way (or the next one, when ``phase_steps`` is 0)
    phase_steps: int = 0  # env steps of that phase done
    retention: list[list[float]] = field(default_factory=list)
    random_scores: dict[str, float] = field(default_factory=dict)
    detected_after: list[int] = field(default_factory=list)


def detector_tensors(trainer: DetectorTrainer) -> dict[str, np.ndarray]:
    """The detector's weights, its Adam moments and step counts, and its per-game frame memory."""
    out = {f"weights.{k}": v.detach().cpu().numpy() for k, v in trainer.detector.state_dict().items()}
    for index, param in enumerate(trainer.detector.parameters()):
        state = trainer.optimizer.state.get(param)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"adam.{index}.{key}"] = state[key].detach().cpu().numpy()
            out[f"adam.{index}.step"] = np.asarray([float(state["step"])], dtype=np.float64)
    for game, frames in trainer.memory.items():
        out[f"memory.{game}"] = np.ascontiguousarray(frames)
        out[f"seen.{game}"] = np.asarray([trainer.seen_per_game[game]], dtype=np.int64)
    out["frames_seen"] = np.asarray([trainer.frames_seen], dtype=np.int64)
    return out


def restore_detector(trainer: DetectorTrainer, tensors: dict[str, np.ndarray]) -> None:
    weights = {k.removeprefix("weights."): torch.from_numpy(v) for k, v in tensors.items() if k.startswith("weights.")}
    trainer.detector.load_state_dict(weights)
    for index, param in enumerate(trainer.detector.parameters()):
        if f"adam.{index}.step" in tensors:
            trainer.optimizer.state[param] = {
                "step": torch.tensor(float(tensors[f"adam.{index}.step"][0])),
                "exp_avg": torch.from_numpy(tensors[f"adam.{index}.exp_avg"].copy()),
                "exp_avg_sq": torch.from_numpy(tensors[f"adam.{index}.exp_avg_sq"].copy())}
    trainer.memory = {int(k.split(".")[1]): v.copy() for k, v in tensors.items() if k.startswith("memory.")}
    trainer.seen_per_game = {int(k.split(".")[1]): int(v[0]) for k, v in tensors.items() if k.startswith("seen.")}
    trainer.frames_seen = int(tensors["frames_seen"][0])


def save_checkpoint(run_dir: Path, algo: Any, trainer: DetectorTrainer, state: ScheduleState,
                    expert_backends: Iterable[ExpertBackend] = ()) -> Path:
    """``expert_backends``: the learner's; a tiered one flushes and snapshots its store under the checkpoint's
    name first (a resume restores that snapshot), and the algorithm's state then holds the same experts."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt_{state.iteration:06d}"
    for backend in expert_backends:
        backend.checkpoint(final.name)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    algo.save_to_path(str(tmp / "algo"))
    save_numpy(detector_tensors(trainer), str(tmp / "detector.safetensors"))
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for old in sorted(p for p in root.glob("ckpt_*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    found = sorted(p for p in (run_dir / CHECKPOINTS).glob("ckpt_*") if (p / "state.json").is_file())
    if not found:
        raise DataError(f"--resume {run_dir}: no checkpoint under {run_dir / CHECKPOINTS}")
    return found[-1]


def load_checkpoint(path: Path, algo: Any, trainer: DetectorTrainer) -> ScheduleState:
    try:
        state = ScheduleState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
        tensors = load_numpy(str(path / "detector.safetensors"))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: unreadable checkpoint ({str(exc)[:120]})") from None
    algo.restore_from_path(str(path / "algo"))
    restore_detector(trainer, tensors)
    return state
