"""The settings of an ``aios-ray autotune`` sweep (the search space itself is ``aios_ray.tune.space``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aios_ray.config import ConfigError, _check_name, _opt

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "none")


@dataclass
class AutotuneConfig:
    trials: int = _opt(10, "trials in the study (a resumed study runs only the ones still missing)")
    timeout_minutes: float = _opt(0.0, "stop starting trials after this many minutes (0: no limit)")
    sampler: str = _opt("tpe", "Optuna sampler: 'tpe' or 'random'")
    pruner: str = _opt("median", "stop poor trials early: 'median' (median stopping rule), "
                                 "'successive_halving' (ASHA) or 'none'")
    direction: str = _opt("minimize", "'minimize' or 'maximize' the metric")
    metric: str = _opt("eval_loss", "the reported metric to optimise")
    study_name: str | None = _opt(None, "Optuna study name; default autotune-<timestamp> (give it with --storage "
                                        "to resume a study)")
    storage: str | None = _opt(None, "Optuna RDB URL, e.g. sqlite:///artifacts/optimization/autotune.db; default: "
                                     "sqlite:///<out-dir>/autotune.db")
    seed: int = _opt(0, "seed of the sampler (and of every trial's training)")
    resources_per_trial: str = _opt("cpu=1", "resources of one trial, e.g. 'cpu=1' or 'cpu=0.5,gpu=0.5'")
    max_concurrent: int = _opt(0, "trials at a time (0: as many as the CPUs allow)")
    address: str | None = _opt(None, "Ray cluster address; default: a local embedded Ray")
    out_dir: str = _opt("artifacts/optimization", "where the trial log, best_trial.json, the PNGs and the "
                                                  "trials' bundles go")

    def __post_init__(self) -> None:
        if self.trials <= 0:
            raise ConfigError(f"--trials must be > 0, got {self.trials}")
        if self.timeout_minutes < 0 or self.max_concurrent < 0:
            raise ConfigError("--timeout-minutes and --max-concurrent must be >= 0")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.pruner == "None":  # the seed's spelling of 'none'
            self.pruner = "none"
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r}: expected one of {', '.join(PRUNERS)}")
        if self.direction not in ("minimize", "maximize"):
            raise ConfigError(f"--direction {self.direction!r}: expected 'minimize' or 'maximize'")
        if self.study_name is not None:
            _check_name("--study-name", self.study_name)
        self.resources()

    def resources(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in self.resources_per_trial.split(","))):
            key, sep, value = item.partition("=")
            try:
                amount = float(value)
            except ValueError:
                amount = -1.0
            if not sep or key not in ("cpu", "gpu") or not math.isfinite(amount) or amount < 0:
                raise ConfigError(f"--resources-per-trial {self.resources_per_trial!r}: expected 'cpu=N[,gpu=M]'")
            out[key] = amount
        if out.get("cpu", 0.0) <= 0:  # a trial of 0 CPUs fails in Tune; it always computes on some CPU
            raise ConfigError(f"--resources-per-trial {self.resources_per_trial!r}: cpu must be > 0")
        return out

    @property
    def mode(self) -> str:
        return "min" if self.direction == "minimize" else "max"
