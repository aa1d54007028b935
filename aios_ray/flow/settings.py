"""The settings of ``aios-ray flow hrm-train`` (the CLI builds its flags from these fields). No Ray here: the
CLI imports this module for every command."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aios_ray.config import ConfigError, _check_name, _opt


@dataclass
class FlowSettings:
    dataset_file: str | None = _opt(None, "training text: .txt, .jsonl or a folder of them (required)")
    eval_file: str | None = _opt(None, "held-out text; default: split --eval-fraction of the documents off the data")
    brain_name: str = _opt("default", "name of the brain: its flow directory and its packaged bundle")
    eval_fraction: float = _opt(0.1, "share of the documents held out for evaluation when no --eval-file is given")
    eval_batches: int = _opt(16, "most batches the evaluate step reads (as `aios-ray eval --eval-batches`)")
    eval_batch_size: int = _opt(8, "sequences per batch of the evaluate step")
    flow_dir: str = _opt("artifacts/flows", "where the steps' outputs go: <flow-dir>/<brain-name>/<step>-<hash>/")
    address: str | None = _opt(None, "Ray cluster address; default: a local embedded Ray")

    def __post_init__(self) -> None:
        if not self.dataset_file:
            raise ConfigError("--dataset-file is required")
        _check_name("--brain-name", self.brain_name)
        if not (math.isfinite(self.eval_fraction) and 0.0 < self.eval_fraction < 1.0):
            raise ConfigError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if self.eval_batches <= 0 or self.eval_batch_size <= 0:  # refused before the steps before evaluate run
            raise ConfigError("--eval-batches and --eval-batch-size must be > 0")
