"""Config validation, presets and precedence (defaults < YAML < flags)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aios_ray.cli import build_parser, config_from_args
from aios_ray.config import Config, ModelConfig, TrainConfig, load_yaml_config
from aios_ray.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 4, "num_experts_per_tok": 5}, "--num-experts-per-tok 5 exceeds --num-experts 4"),
        ({"hidden_size": 100, "num_heads": 3}, "not divisible by --num-heads"),
        ({"hidden_size": 0}, "--hidden-size must be > 0"),
        ({"halt_max_steps": -1}, "--halt-max-steps must be > 0"),
    ],
)
def test_impossible_model_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"batch_size": -2}, {"lr": 0.0}, {"brain_name": "../x"},
                                    {"brain_name": "a/b"}])
def test_impossible_train_values(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)


def test_flags_override_the_yaml_which_overrides_defaults(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_heads: 4\ntrain:\n  steps: 7\n  lr: 0.01\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--steps", "9", "--no-moe"])
    cfg = config_from_args(args)
    assert (cfg.model.hidden_size, cfg.train.steps, cfg.train.lr, cfg.model.use_moe) == (64, 9, 0.01, False)
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_presets_load_and_unknown_preset_is_named():
    for name in ("debug", "demo", "small"):
        Config.from_dict(load_yaml_config(name))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_yaml_config("nope")


@pytest.mark.parametrize(
    ("text", "message"),
    [("model: [1, 2\n", "malformed YAML"), ("", "empty config"), ("model:\n  bogus: 1\n", "unknown key"),
     ("model:\n  hidden_size: abc\n", "not a valid int"), ("extra: {}\n", "unknown section")],
)
def test_bad_yaml_is_named(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml_config(str(path))


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset-file", "--num-experts-per-tok", "--moe-capacity-factor", "--stop-file", "--iterate",
                 "--amp", "--no-amp", "--use-moe", "--no-moe", "--address", "--num-workers", "--use-gpu",
                 "--gradient-checkpointing", "--halt-max-steps", "--auto-adjust-lr", "--eval-batches"):
        assert flag in text
