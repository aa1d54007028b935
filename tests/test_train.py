"""The training function without Ray: bundle, metrics, resume exactness, stop file, iterate, OOM retreat."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from aios_ray.train import loop
from aios_ray.train.bundle import Bundle
from aios_ray.train.run import run_training
from tests.helpers import PER_SEQUENCE_LOSS, assert_same_weights, bundle_weights, debug_config, events, train_losses


def test_local_run_writes_a_complete_bundle_and_metrics(tmp_path: Path):
    plan, summary = run_training(debug_config(tmp_path))
    root = Path(plan.bundle_root)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metadata.json", "training_args.json"):
        assert (root / name).is_file(), name
    metadata = json.loads((root / "metadata.json").read_text())
    assert metadata["total_steps"] == 6 and metadata["latest_checkpoint"] == "step_00000006"
    assert [e["step"] for e in metadata["eval_history"]] == [0, 3, 6]
    assert metadata["dataset_history"][0]["steps_end"] == 6
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    train = events(plan.log_file, "train")
    assert [e["step"] for e in train] == list(range(1, 7))
    for key in ("train_loss", "lm_loss", "q_loss", "lb_loss", "lr", "tokens_per_sec", "sec_per_step",
                "mean_halt_steps"):
        assert all(isinstance(e[key], float) for e in train), key
    evals = events(plan.log_file, "eval")
    assert all({"eval_loss", "ppl"} <= set(e) for e in evals)
    usage = events(plan.log_file, "expert_usage")
    assert {u["layer"] for u in usage} == {"H.0", "L.0"}
    for u in usage:
        assert sum(u["token_counts"]) == u["total_tokens"] * 2  # top-2
        assert abs(sum(u["avg_routing_prob"]) - 1.0) < 1e-3 and u["dropped_tokens"] >= 0
    assert summary["step"] == 6


def test_stop_then_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path: Path):
    """Bundle save -> resume restores weights, optimizer, schedule, data order and RNG exactly."""
    whole_plan, _ = run_training(debug_config(tmp_path / "whole"))
    whole = train_losses(whole_plan.log_file)

    stop_file = tmp_path / "STOP"
    stop_file.touch()  # present from the start: the run stops after its first step
    cfg = debug_config(tmp_path / "split", stop_file=str(stop_file))
    first_plan, first = run_training(cfg)
    assert first["stopped"] and first["step"] == 1 and not stop_file.exists()
    resumed_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model=first_plan.bundle_root))
    run_training(resumed_cfg)
    split = train_losses(first_plan.log_file)
    assert sorted(split) == list(range(1, 7))
    for step in range(1, 7):
        assert split[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step


def test_iterate_goes_round_after_round_until_the_stop_file(tmp_path: Path, monkeypatch):
    stop_file = tmp_path / "STOP"
    original = loop.Trainer._next_round

    def next_round_then_user_stops_on_round_two(self):
        original(self)
        if self.state.round == 2:
            stop_file.touch()  # what a user does from another shell

    monkeypatch.setattr(loop.Trainer, "_next_round", next_round_then_user_stops_on_round_two)
    plan, summary = run_training(debug_config(tmp_path, iterate=True, steps=3, stop_file=str(stop_file)))
    assert summary["stopped"] and summary["step"] == 7  # 2 full rounds of 3, then one step of round 3
    starts = [e["step"] for e in events(plan.log_file, "train")]
    assert starts == list(range(1, 8))


def test_out_of_memory_halves_the_micro_batch_and_trains_as_the_run_without_it(tmp_path: Path, monkeypatch):
    """After the retreat a step runs as two micro-batches of 2 instead of one of 4, and gives the losses and
    weights of the same run that never ran out of memory, within float noise: the halves are summed in another
    order (measured: losses equal to 1e-6 relative, weights to 4e-6). The model settings that make a batch's loss
    depend on how it is split are off (``PER_SEQUENCE_LOSS`` says which and why)."""
    uninterrupted, _ = run_training(debug_config(tmp_path / "whole", model=PER_SEQUENCE_LOSS))
    assert not events(uninterrupted.log_file, "oom")
    original = loop.HRMACTv1.forward

    def forward_that_fits_two_sequences(self, input_ids, labels):
        if self.training and input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, input_ids, labels)

    monkeypatch.setattr(loop.HRMACTv1, "forward", forward_that_fits_two_sequences)
    plan, summary = run_training(debug_config(tmp_path / "oom", model=PER_SEQUENCE_LOSS))  # batch 4
    ooms = events(plan.log_file, "oom")
    assert [(e["old_micro_batch"], e["micro_batch"]) for e in ooms] == [(4, 2)]
    assert ooms[0]["micro_batches_per_step"] == 2
    assert summary["step"] == 6 and len(events(plan.log_file, "train")) == 6
    for key in ("train_loss", "lm_loss", "q_loss", "grad_norm", "mean_halt_steps"):
        expected = [e[key] for e in events(uninterrupted.log_file, "train")]
        assert [e[key] for e in events(plan.log_file, "train")] == pytest.approx(expected, rel=1e-5), key
    assert_same_weights(bundle_weights(plan.bundle_root), bundle_weights(uninterrupted.bundle_root),
                        atol=2e-5, rtol=1e-4)


def test_fresh_run_refuses_to_overwrite_an_existing_bundle(tmp_path: Path):
    from aios_ray.errors import ConfigError

    plan, _ = run_training(debug_config(tmp_path))
    before = (Path(plan.bundle_root) / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        run_training(debug_config(tmp_path))
    assert (Path(plan.bundle_root) / "model.safetensors").read_bytes() == before
    assert Bundle(Path(plan.bundle_root)).latest_checkpoint().name == "step_00000006"
