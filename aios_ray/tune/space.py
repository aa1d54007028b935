"""The autotune search space: its defaults, the safe bounds every override must stay inside, and how a
trial's values become a training ``Config``. One module, so the CLI, the sweep and the tests agree.

Parameters (Optuna names; each maps onto one field of the training config):

- ``lr`` (log-uniform, ``train.lr``), ``warmup_steps`` (integer, ``train.warmup_steps``),
  ``moe_lb_coef`` (log-uniform, ``model.moe_lb_coef``): ranges ``--lr-min/--lr-max`` etc.;
- ``num_experts`` (``model.num_experts``), ``num_experts_per_tok`` (``model.num_experts_per_tok``),
  ``batch_size`` (``train.batch_size``): categorical, from ``--num-experts-choices`` etc.;
- ``chunk_size`` (``train.chunk_size``, the tokens per micro-batch of chunked training, ``--chunk-size``):
  categorical from ``--chunk-choices`` (the seed's flag), searched only when given; it matters only with
  ``--use-chunked-training`` or ``--data`` in ``--train-args``.

Why top-k choices must not exceed the smallest expert count: Optuna's samplers need one fixed set of choices
per parameter, so a top-k that some expert count cannot serve would make those trials impossible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aios_ray.config import Config, ConfigError, _opt

# (low, high) every range must stay inside, and the most any choice may be.
SAFE_LR = (1e-6, 1e-1)
SAFE_WARMUP = (0, 10_000)
SAFE_LB = (1e-5, 1.0)
SAFE_MAX_EXPERTS = 256
SAFE_MAX_BATCH = 4096

# Optuna parameter -> (config section, field)
TARGETS = {"lr": ("train", "lr"), "warmup_steps": ("train", "warmup_steps"),
           "moe_lb_coef": ("model", "moe_lb_coef"), "num_experts": ("model", "num_experts"),
           "num_experts_per_tok": ("model", "num_experts_per_tok"), "batch_size": ("train", "batch_size"),
           "chunk_size": ("train", "chunk_size")}
SAFE_MAX_CHUNK = 1 << 20


@dataclass
class SearchSpace:
    lr_min: float = _opt(1e-4, "smallest learning rate tried (log scale)")
    lr_max: float = _opt(5e-3, "largest learning rate tried")
    warmup_min: int = _opt(0, "fewest warm-up steps tried")
    warmup_max: int = _opt(50, "most warm-up steps tried")
    moe_lb_min: float = _opt(1e-3, "smallest MoE load-balance coefficient tried (log scale)")
    moe_lb_max: float = _opt(5e-2, "largest MoE load-balance coefficient tried")
    num_experts_choices: str = _opt("4,8", "expert counts tried (comma-separated)")
    top_k_choices: str = _opt("1,2", "experts per token tried (each <= the smallest expert count)")
    batch_choices: str = _opt("4,8,16", "micro-batch sizes tried")
    chunk_choices: str = _opt("", "--chunk-size values tried (tokens per micro-batch of chunked training: give "
                                  "--use-chunked-training or --data in --train-args), e.g. 1024,2048,4096; empty: "
                                  "not searched")

    def __post_init__(self) -> None:
        _range("--lr-min/--lr-max", self.lr_min, self.lr_max, SAFE_LR)
        _range("--warmup-min/--warmup-max", self.warmup_min, self.warmup_max, SAFE_WARMUP)
        _range("--moe-lb-min/--moe-lb-max", self.moe_lb_min, self.moe_lb_max, SAFE_LB)
        experts = self.choices("num_experts")
        top_k = self.choices("num_experts_per_tok")
        if max(top_k) > min(experts):
            raise ConfigError(f"--top-k-choices {self.top_k_choices}: top-k {max(top_k)} exceeds the smallest of "
                              f"--num-experts-choices {self.num_experts_choices}")
        self.choices("batch_size")
        if self.chunk_choices:
            self.choices("chunk_size")

    def choices(self, param: str) -> list[int]:
        """The validated integer choices of a categorical parameter."""
        flag, text, most = {"num_experts": ("--num-experts-choices", self.num_experts_choices, SAFE_MAX_EXPERTS),
                            "num_experts_per_tok": ("--top-k-choices", self.top_k_choices, SAFE_MAX_EXPERTS),
                            "batch_size": ("--batch-choices", self.batch_choices, SAFE_MAX_BATCH),
                            "chunk_size": ("--chunk-choices", self.chunk_choices, SAFE_MAX_CHUNK)}[param]
        try:
            values = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None
        if not values:
            raise ConfigError(f"{flag}: no choices given")
        if min(values) < 1 or max(values) > most:
            raise ConfigError(f"{flag} {text!r}: each choice must be in 1..{most}")
        return sorted(set(values))

    def suggest(self, trial: Any) -> None:
        """Define-by-run: ask an Optuna trial for one value of every parameter."""
        trial.suggest_float("lr", self.lr_min, self.lr_max, log=True)
        trial.suggest_int("warmup_steps", self.warmup_min, self.warmup_max)
        trial.suggest_float("moe_lb_coef", self.moe_lb_min, self.moe_lb_max, log=True)
        for param in self.categorical():
            trial.suggest_categorical(param, self.choices(param))

    def categorical(self) -> list[str]:
        """The categorical parameters searched (--chunk-choices only when given: older studies lack it)."""
        return ["num_experts", "num_experts_per_tok", "batch_size"] + (["chunk_size"] if self.chunk_choices else [])

    def distributions(self) -> dict[str, Any]:
        """The Optuna distributions ``suggest`` draws from (to compare with a stored study's)."""
        import optuna

        dist = optuna.distributions
        out: dict[str, Any] = {
            "lr": dist.FloatDistribution(self.lr_min, self.lr_max, log=True),
            "warmup_steps": dist.IntDistribution(self.warmup_min, self.warmup_max),
            "moe_lb_coef": dist.FloatDistribution(self.moe_lb_min, self.moe_lb_max, log=True)}
        for param in self.categorical():
            out[param] = dist.CategoricalDistribution(self.choices(param))
        return out


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base config's sections (``Config.to_dict`` shape) with a trial's values set."""
    out = {name: dict(section) for name, section in base.items()}
    for param, value in params.items():
        section, field_name = TARGETS[param]
        out[section][field_name] = value
    return out


def yaml_snippet(params: dict[str, Any]) -> str:
    """The trial's values as a YAML file ``aios-ray train --config`` accepts."""
    sections: dict[str, dict[str, Any]] = {}
    for param, value in params.items():
        section, field_name = TARGETS[param]
        sections.setdefault(section, {})[field_name] = value
    lines = []
    for section in ("model", "train"):
        if section in sections:
            lines.append(f"{section}:")
            lines.extend(f"  {k}: {_yaml_value(v)}" for k, v in sorted(sections[section].items()))
    return "\n".join(lines) + "\n"


def check_config(sections: dict[str, Any]) -> Config:
    """The training config a trial would run (raises ConfigError, naming the value, if impossible)."""
    return Config.from_dict(sections, source="autotune")


def _range(flag: str, low: float, high: float, safe: tuple[float, float]) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{flag}: {low}..{high} is not a finite range")
    if low > high:
        raise ConfigError(f"{flag}: empty range, min {low} > max {high}")
    if low < safe[0] or high > safe[1]:
        raise ConfigError(f"{flag}: {low}..{high} leaves the safe bounds {safe[0]}..{safe[1]}")


def _yaml_value(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
