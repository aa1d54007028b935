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


def test_the_store_section_is_one_config_with_flags_mapped_onto_it(tmp_path: Path):
    from aios_ray.config import StoreConfig

    path = tmp_path / "c.yaml"
    path.write_text("store:\n  experts: tiered\n  capacity_gpu: 3\n  path: /data/store\n  stats_interval: 7\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--capacity-dram", "5", "--store-name", "s1",
                                      "--no-prefetch"])
    store = config_from_args(args).store
    assert store == StoreConfig(experts="tiered", capacity_gpu=3, capacity_dram=5, path="/data/store", name="s1",
                                prefetch=False, stats_interval=7)
    assert not store.is_resolved  # device 'auto' is decided once per run, with the model's expert count
    resolved = store.resolved("/bundles/b", "brain", total_experts=32, use_gpu=False)
    assert (resolved.path, resolved.name, resolved.device, resolved.capacity_gpu, resolved.capacity_dram) == (
        "/data/store", "s1", "cpu", 3, 5)
    defaults = StoreConfig(experts="tiered").resolved("/bundles/b", "brain", total_experts=32, use_gpu=True)
    assert (defaults.path, defaults.name, defaults.device, defaults.capacity_gpu) == (
        "/bundles/b/expert_store", "brain", "cuda", 32)
    assert defaults.is_resolved


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("store:\n  capacity_gpu: -1\n", "--capacity-gpu must be >= 0"),
    ("store:\n  device: tpu\n", "--store-device 'tpu'"),
    ("store:\n  experts: remote\n", "--experts 'remote'"),
    ("store:\n  name: ../up\n", "--store-name '../up' is not a plain directory name"),
    ("store:\n  slots: 4\n", r"unknown key\(s\) \['slots'\] in StoreConfig"),
])
def test_impossible_store_values_name_the_culprit(tmp_path: Path, yaml_text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_yaml_config(str(path))
