"""DeepSpeed ZeRO through Ray Train: the configs built from configs/deepspeed/, the refused combinations, ZeRO-2 on
2 CPU workers (gloo) against DDP on 2 workers, and a ZeRO-2 run stopped and resumed from its bundle."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from aios_ray.cli import main
from aios_ray.config import Config
from aios_ray.train.run import run_training
from aios_ray.train.zero import STAGES, TEMPLATES, deepspeed_config
from tests.helpers import (
    PER_SEQUENCE_LOSS,
    assert_same_weights,
    bundle_weights,
    debug_config,
    events,
    train_losses,
)

TRAIN = {"steps": 4, "checkpoint_interval": 2, "eval_interval": 100, "expert_usage_interval": 100}


def _on_ray(tmp_path: Path, zero_stage: str, **train) -> Config:
    cfg = debug_config(tmp_path, model=PER_SEQUENCE_LOSS, **{**TRAIN, **train})
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, use_ray=True, num_workers=2,
                                                                zero_stage=zero_stage))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deepspeed_config_is_the_template_with_the_run_filled_in(tmp_path: Path, stage: str):
    template = json.loads((TEMPLATES / f"{stage}.json").read_text())
    assert template["train_micro_batch_size_per_gpu"] == "auto" and template["gradient_clipping"] == "auto"
    cfg = _on_ray(tmp_path, stage, batch_size=3, grad_accum=2, grad_clip=0.0, amp=True)
    built = deepspeed_config(cfg)
    assert built["zero_optimization"]["stage"] == STAGES[stage]
    assert (built["train_micro_batch_size_per_gpu"], built["gradient_accumulation_steps"]) == (3, 2)
    assert built["gradient_clipping"] == 0.0 and built["bf16"] == {"enabled": True}  # 0 is off in both
    assert built["zero_allow_untested_optimizer"] is True  # the loop's own optimizer goes in
    assert "auto" not in json.dumps(built)
    for key, value in template["zero_optimization"].items():  # the rest is the template's, as the user left it
        assert built["zero_optimization"][key] == value


def test_combinations_zero_cannot_run_are_one_line_and_exit_2(tmp_path: Path, capsys):
    base = ["train", "--config", "debug", "--bundle-dir", str(tmp_path), "--zero-stage", "zero2"]
    for flags, message in [
        (["--num-workers", "2", "--experts", "tiered"], "--experts tiered keeps the experts outside the model"),
        (["--no-ray", "--num-workers", "2"], "needs Ray Train with --num-workers 2 or more"),
        (["--num-workers", "1"], "needs Ray Train with --num-workers 2 or more"),
        (["--num-workers", "2", "--parallel-independent"], "nothing for ZeRO to partition"),
    ]:
        try:
            code = main([*base, *flags])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, flags
        assert message in err and err.count("\n") == 1, (flags, err)
    assert not any(tmp_path.iterdir())


def test_flat_partitions_of_experts_are_stepped_as_the_stacked_experts():
    """ZeRO hands ExpertSparseAdamW one flat (1-D) partition per group: the per-expert group then steps element by
    element and must give the stacked tensor's per-expert result, an expert without tokens included (it stays put
    while another moves). Tolerance: float noise of the other operation order, ~1e-7 measured."""
    import torch

    from aios_ray.train.optim import ExpertSparseAdamW

    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(4, 3, 5))
    flat = torch.nn.Parameter(stacked.detach().clone().flatten())
    optimizers = [ExpertSparseAdamW([{"params": [p], "weight_decay": 0.1, "per_expert": True}], lr=0.01,
                                    betas=(0.9, 0.95), eps=1e-8) for p in (stacked, flat)]
    for step in range(4):
        grad = torch.randn(4, 3, 5)
        grad[step % 4] = 0  # one expert without tokens at each step, another each time
        stacked.grad, flat.grad = grad.clone(), grad.clone().flatten()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(flat.detach().view(4, 3, 5), stacked.detach(), atol=1e-6, rtol=1e-6)
    assert optimizers[1].state[flat]["step"].view(4, 15)[:, 0].tolist() == [3.0, 3.0, 3.0, 3.0]


def test_a_zero_checkpoint_resumed_without_zero_keeps_fresh_optimizer_moments(tmp_path: Path, capsys):
    """The optimizer state of a ZeRO checkpoint is DeepSpeed's (in its deepspeed/ folder): a run without ZeRO takes
    the weights, step and data position and says in one line that the moments start afresh; a ZeRO run leaves the
    loop's optimizer to DeepSpeed, which loads its own state."""
    import torch

    from aios_ray.train.zero import optimizer_to_restore

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    plain, written = tmp_path / "plain", tmp_path / "zero"
    for path, state in ((plain, {}), (written, {"zero_stage": "zero2", "zero_world_size": 2})):
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps({"trainer": {}, **state}))
    none = debug_config(tmp_path / "none")
    assert optimizer_to_restore(plain, optimizer, none) is optimizer
    capsys.readouterr()
    assert optimizer_to_restore(written, optimizer, none) is None
    out = capsys.readouterr().out
    assert "--zero-stage zero2" in out and "fresh optimizer moments" in out and out.count("\n") == 1
    assert optimizer_to_restore(written, optimizer, none, chief=False) is None and not capsys.readouterr().out
    assert optimizer_to_restore(plain, optimizer, _on_ray(tmp_path / "z", "zero2")) is None


@pytest.fixture(scope="module")
def zero2_run(ray_local, tmp_path_factory):
    return run_training(_on_ray(tmp_path_factory.mktemp("zero2"), "zero2"))[0]


@pytest.mark.ray
def test_zero2_on_two_workers_trains_as_ddp_and_writes_a_plain_bundle(zero2_run, tmp_path: Path):
    """Same seed, data and model settings as 2 DDP workers (``PER_SEQUENCE_LOSS``: the loss is a mean of
    per-sequence terms, so how the batch is split does not matter). ZeRO-2 reduce-scatters the gradients where DDP
    all-reduces them, and clips with DeepSpeed's own formula: float noise of another summation order, measured
    below 1e-6 relative on losses and norms over these 4 steps; the tolerance is 1e-5."""
    from aios_ray.model.hrm import HRMACTv1
    from aios_ray.train.bundle import load_model_weights, read_model_config

    ddp_plan, _ = run_training(_on_ray(tmp_path / "ddp", "none"))
    zero, ddp = events(zero2_run.log_file, "train"), events(ddp_plan.log_file, "train")
    assert [e["step"] for e in zero] == [1, 2, 3, 4]
    for key in ("train_loss", "lm_loss", "grad_norm"):
        assert [e[key] for e in zero] == pytest.approx([e[key] for e in ddp], rel=1e-5), key
    root = Path(zero2_run.bundle_root)
    # the weights after the last step too (experts a step left unchosen stay put under ZeRO as under DDP)
    assert_same_weights(bundle_weights(root), bundle_weights(ddp_plan.bundle_root), atol=2e-5, rtol=1e-4)
    model = HRMACTv1(read_model_config(root))
    load_model_weights(model, root / "model.safetensors")  # full, plain weights: every key, every shape
    checkpoint = root / "checkpoints" / "step_00000004"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["zero_stage"], state["zero_world_size"]) == ("zero2", 2)
    assert (checkpoint / "deepspeed" / "zero").is_dir()
    assert not list((root / "checkpoints").glob(".deepspeed-*"))  # the staged folders were moved in


@pytest.mark.ray
@pytest.mark.slow
def test_zero2_stopped_and_resumed_gives_the_losses_of_the_uninterrupted_run(zero2_run, tmp_path: Path):
    """The resume loads DeepSpeed's optimizer partitions (with the fp32 weights) and the loop's schedule, data
    position and RNG: the same arithmetic as the uninterrupted run, so the same tolerance as above."""
    stop_file = tmp_path / "STOP"
    stop_file.touch()  # present from the start: the run stops after its first step
    cfg = _on_ray(tmp_path / "split", "zero2", stop_file=str(stop_file))
    first, summary = run_training(cfg)
    assert summary["step"] == 1 and not stop_file.exists()  # Ray reports numbers only: no "stopped" here
    resumed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model=first.bundle_root))
    run_training(resumed)
    split, whole = train_losses(first.log_file), train_losses(zero2_run.log_file)
    assert sorted(split) == [1, 2, 3, 4]
    assert [split[s] for s in range(1, 5)] == pytest.approx([whole[s] for s in range(1, 5)], rel=1e-5)
