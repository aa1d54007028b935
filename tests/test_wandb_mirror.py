"""The W&B mirror: secret redaction, the settings and their env defaults, and real offline runs read back from
the run directory's transaction log (the ``.wandb`` file ``wandb sync`` uploads)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aios_ray.cli import build_parser, config_from_args
from aios_ray.config import Config, TrackingConfig
from aios_ray.tracking.jsonl import read_metrics
from aios_ray.tracking.wandb_mirror import MASK, redact

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "aios_ray" / "data" / "sample" / "train.txt"
SECRET_ADDRESS = "ray://alice:s3cret@head.example:10001"


# ---- redaction ---------------------------------------------------------------------------------------------
def test_redact_masks_secret_keys_and_url_credentials_and_keeps_the_rest():
    config = {
        "train": {"lr": 0.001, "dataset_file": "/data/x.txt", "steps": 6, "tokenizer": None},
        "hub": {"api_key": "abc", "hf_token": "hf_123", "password": "pw", "authToken": "t", "secret": "s",
                "empty_token": "", "key_count": 3},
        "urls": ["https://bob:pw@example.com/x", "s3://AKIA:KEY@bucket/path", "https://example.com/ok"],
        "cluster": {"address": SECRET_ADDRESS},
    }
    out = redact(config)
    assert out["train"] == config["train"]
    hub = out["hub"]
    assert hub["api_key"] == hub["hf_token"] == hub["password"] == hub["authToken"] == hub["secret"] == MASK
    assert hub["empty_token"] == ""  # nothing to hide: an unset secret stays visibly unset
    assert hub["key_count"] == MASK  # a key part is enough: better to hide a count than leak a key
    assert out["urls"] == ["https://***@example.com/x", "s3://***@bucket/path", "https://example.com/ok"]
    assert out["cluster"]["address"] == "ray://***@head.example:10001"
    assert config["hub"]["api_key"] == "abc"  # the input is not modified


def test_redact_leaves_ordinary_names_alone():
    config = {"tokenizer_vocab_size": 4096, "monkey": "m", "keep_checkpoints": 2, "turkey": 1, "brain_name": "b"}
    assert redact(config) == config


# ---- settings ----------------------------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("AIOS_WANDB_PROJECT", "AIOS_WANDB_ENTITY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_env_defaults_apply_when_no_flag_is_given(clean_env: pytest.MonkeyPatch):
    assert TrackingConfig().wandb_project == "aios-hrm" and TrackingConfig().wandb_offline is None
    clean_env.setenv("AIOS_WANDB_PROJECT", "from-env")
    clean_env.setenv("AIOS_WANDB_ENTITY", "team")
    clean_env.setenv("WANDB_MODE", "offline")
    tc = TrackingConfig(wandb=True)
    assert (tc.wandb_project, tc.wandb_entity, tc.wandb_offline) == ("from-env", "team", True)
    tc = TrackingConfig(wandb=True, wandb_project="flag", wandb_entity="me", wandb_offline=False)
    assert (tc.wandb_project, tc.wandb_entity, tc.wandb_offline) == ("flag", "me", False)
    clean_env.setenv("WANDB_MODE", "disabled")
    assert TrackingConfig(wandb=True).wandb is False


def test_flags_build_the_tracking_section_and_it_round_trips(clean_env: pytest.MonkeyPatch):
    args = build_parser().parse_args(["train", "--wandb", "--wandb-project", "p", "--wandb-entity", "e",
                                      "--wandb-group", "g", "--wandb-tags", "a, b,", "--wandb-run-name", "r",
                                      "--wandb-offline"])
    cfg = config_from_args(args)
    tc = cfg.tracking
    assert (tc.wandb, tc.wandb_project, tc.wandb_entity, tc.wandb_group, tc.wandb_run_name, tc.wandb_offline) == \
        (True, "p", "e", "g", "r", True)
    assert tc.tags == ["a", "b"]
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # training_args.json round trip
    online = config_from_args(build_parser().parse_args(["train", "--wandb", "--wandb-online"]))
    assert online.tracking.wandb_offline is False
    assert config_from_args(build_parser().parse_args(["train"])).tracking.wandb is False


# ---- real runs ---------------------------------------------------------------------------------------------
def wandb_records(run_dir: Path) -> list[Any]:
    """Every record of an offline run's ``.wandb`` file: a LevelDB-style log (a 7-byte file header, 32 KiB
    blocks, each record chunk behind a 7-byte header: crc32, length, FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data, block, pos, pending, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def train(tmp_path: Path, env: dict[str, str | None], *extra: str) -> subprocess.CompletedProcess[str]:
    text = SAMPLE.read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text[:20000], encoding="utf-8")
    (tmp_path / "eval.txt").write_text(text[20000:26000], encoding="utf-8")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "AIOS_WANDB_"))}
    env = {**clean, "RAY_AUTH_MODE": "disabled", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "NETRC": str(tmp_path / "no-netrc"), **env}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset it
    cmd = [sys.executable, "-m", "aios_ray.cli", "train", "--config", "debug", "--no-ray",
           "--dataset-file", str(tmp_path / "train.txt"), "--eval-file", str(tmp_path / "eval.txt"),
           "--bundle-dir", str(tmp_path / "brains"), "--address", SECRET_ADDRESS, *extra]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def offline_run(wandb_dir: Path) -> Path:
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    return run_dir


def test_offline_run_holds_the_redacted_config_the_metrics_and_the_artifacts(tmp_path: Path):
    done = train(tmp_path, {"WANDB_MODE": "offline"}, "--wandb", "--wandb-project", "p", "--wandb-tags", "a,b",
                 "--wandb-run-name", "smoke")
    assert "W&B" not in done.stderr
    records = wandb_records(offline_run(tmp_path))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, list(run.tags)) == ("p", "smoke", ["a", "b"])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["steps"] == 6 and config["model"]["hidden_size"] == 32
    assert config["tracking"]["wandb_project"] == "p"
    assert config["cluster"]["address"] == "ray://***@head.example:10001"  # the credentials never leave
    args = json.loads((tmp_path / "brains" / "default" / "training_args.json").read_text())
    assert args["cluster"]["address"] == SECRET_ADDRESS  # the local bundle keeps the resolved config whole

    rows = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    events = read_metrics(tmp_path / "brains" / "default" / "metrics.jsonl")
    trains = [e for e in events if e["event"] == "train"]
    mirrored = [r for r in rows if "train/train_loss" in r]
    assert [r["step"] for r in mirrored] == [e["step"] for e in trains] == list(range(1, 7))
    assert [r["train/train_loss"] for r in mirrored] == pytest.approx([e["train_loss"] for e in trains])
    evals = [e for e in events if e["event"] == "eval"]
    mirrored_evals = [r for r in rows if "eval/eval_loss" in r]
    assert [r["step"] for r in mirrored_evals] == [e["step"] for e in evals] == [0, 3, 6]
    assert [r["eval/eval_loss"] for r in mirrored_evals] == pytest.approx([e["eval_loss"] for e in evals])
    assert any(key.startswith("experts/layer") for r in rows for key in r)

    artifacts = {(r.artifact.name, r.artifact.type) for r in records if r.WhichOneof("record_type") == "artifact"}
    assert artifacts == {("smoke-metrics", "metrics"), ("smoke-checkpoint", "checkpoint"), ("smoke-bundle", "model")}
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished, not left to atexit


def test_wandb_mode_disabled_turns_the_mirror_off(tmp_path: Path):
    train(tmp_path, {"WANDB_MODE": "disabled"}, "--wandb")
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "brains" / "default" / "wandb").exists()
    assert (tmp_path / "brains" / "default" / "metrics.jsonl").is_file()


def test_unreachable_online_mode_falls_back_to_offline_with_one_warning(tmp_path: Path):
    done = train(tmp_path, {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9",
                            "WANDB_INIT_TIMEOUT": "5", "WANDB_DIR": None}, "--wandb")
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and "offline" in warnings[0], done.stderr[-2000:]
    assert not (tmp_path / "wandb").exists()  # without WANDB_DIR the run directory goes with the bundle
    records = wandb_records(offline_run(tmp_path / "brains" / "default"))
    assert sum(1 for r in records if r.WhichOneof("record_type") == "history") >= 6
