"""Helpers shared by several test modules: run configs, metrics readers, the store tests' model, comparisons."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aios_ray.cli import main
from aios_ray.config import Config, ModelConfig, StoreConfig, load_yaml_config, merge
from aios_ray.model.hrm import HRMACTv1
from aios_ray.store.nvme import NvmeStore
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.tiered_experts import TieredExperts
from aios_ray.tracking.jsonl import read_metrics
from aios_ray.train.bundle import MODEL_FILE, load_tensors

# Model settings under which a batch's loss is the size-weighted mean of per-sequence terms, so that any split of
# the batch (micro-batches after an out-of-memory retreat, DDP shards) trains exactly like the whole batch:
# - no ACT exploration: its random draws are taken per forward call, so a split hands each sequence other draws;
# - capacity factor = experts / top-k (4 / 2 in the debug preset): capacity = tokens, nothing is ever dropped,
#   while with less a token's fate depends on the other tokens of its micro-batch;
# - no balance loss: it is a statistic of each MoE call's whole micro-batch (f_e * P_e), not a per-sequence sum.
PER_SEQUENCE_LOSS: dict[str, Any] = {"halt_exploration_prob": 0.0, "moe_capacity_factor": 2.0, "moe_lb_coef": 0.0}


def debug_config(tmp_path: Path, model: dict[str, Any] | None = None, **train_overrides: Any) -> Config:
    """The debug preset with its bundle under tmp_path, without Ray; ``model`` overrides model options and
    keyword args train options (and store options, by their
    StoreConfig field names)."""
    base = load_yaml_config("debug")
    store_fields = {f.name for f in dataclasses.fields(StoreConfig)}
    store = {k: v for k, v in train_overrides.items() if k in store_fields}  # --experts, --capacity-gpu, ...
    train = {k: v for k, v in train_overrides.items() if k not in store_fields}
    overrides = {"model": model or {},
                 "train": {"bundle_dir": str(tmp_path / "brains"), "brain_name": "t", **train},
                 "cluster": {"use_ray": False}, "store": store}
    return Config.from_dict(merge(base, overrides))


def events(log_file: str | Path, name: str) -> list[dict[str, Any]]:
    """The metrics-log events called ``name``, in the order they were written."""
    return [e for e in read_metrics(Path(log_file)) if e["event"] == name]


def train_losses(log_file: str | Path) -> dict[int, float]:
    """train_loss by step (a replayed step's later event overwrites the earlier one)."""
    return {e["step"]: e["train_loss"] for e in events(log_file, "train")}


def bundle_weights(bundle_root: str | Path) -> dict[str, torch.Tensor]:
    return load_tensors(Path(bundle_root) / MODEL_FILE)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float,
                        rtol: float) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=rtol, msg=name)


# The tiny MoE model of the expert-store tests (8 experts per layer, 2 layers: 16 expert records).
CFG = ModelConfig(vocab_size=32, max_seq_len=6, hidden_size=16, num_heads=2, h_layers=1, l_layers=1, h_cycles=1,
                  l_cycles=1, halt_max_steps=1, num_experts=8, num_experts_per_tok=2, moe_capacity_factor=1.0)


def local_records(model: HRMACTv1, layout: ExpertLayout) -> list[tuple[ExpertKey, np.ndarray, int]]:
    items = []
    for moe in model.moe_layers():
        for e in range(moe.num_experts):
            flat = layout.pack({"w_gate_up": moe.w_gate_up[e].detach(), "w_down": moe.w_down[e].detach()})
            items.append((ExpertKey(moe.layer_index, e), flat, 0))
    return items


def assert_same_gradients(local: HRMACTv1, tiered: HRMACTv1, source: TieredExperts) -> None:
    tiered_params = dict(tiered.named_parameters())
    for name, param in local.named_parameters():
        if ".ffn.w_" in name:
            continue
        torch.testing.assert_close(tiered_params[name].grad, param.grad, atol=1e-5, rtol=1e-4, msg=name)
    for moe in local.moe_layers():
        for e in range(moe.num_experts):
            key = ExpertKey(moe.layer_index, e)
            if key in source.leaves:
                torch.testing.assert_close(source.leaves[key][0].grad, moe.w_gate_up.grad[e], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(source.leaves[key][1].grad, moe.w_down.grad[e], atol=1e-5, rtol=1e-4)
            else:
                assert not moe.w_gate_up.grad[e].any()  # unused locally too


def assert_same_experts(local: HRMACTv1, opt_local, nvme: NvmeStore, layout: ExpertLayout) -> None:
    for moe in local.moe_layers():
        state_gu, state_dn = opt_local.state[moe.w_gate_up], opt_local.state[moe.w_down]
        for e in range(moe.num_experts):
            flat, _version = nvme.read(ExpertKey(moe.layer_index, e))
            views = layout.views(torch.from_numpy(np.array(flat)))
            torch.testing.assert_close(views["w_gate_up"], moe.w_gate_up[e].detach(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(views["w_down"], moe.w_down[e].detach(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(views["exp_avg.w_gate_up"], state_gu["exp_avg"][e], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(views["exp_avg_sq.w_down"], state_dn["exp_avg_sq"][e], atol=1e-7, rtol=1e-4)
            assert views["step"].item() == state_gu["step"][e].item()


REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``aios-ray argv`` in this process: exit code, stdout, stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_together(script: str, runs: list[list[str]], timeout: float = 60) -> None:
    """Start one process per argument list running ``script``, release them at once (each waits for a line on its
    stdin, so none is done before the last has started) and require that each exits 0."""
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdin=subprocess.PIPE, text=True)
             for args in runs]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.stdin.close()
        assert proc.wait(timeout=timeout) == 0
