"""Seed flag parity: every flag the seed documents give a user parses here, with its meaning, or is answered with
one line naming its equivalent (exit 2). The list below is the seeds' flags as they wrote them, with their values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aios_ray.cli import build_parser, config_from_args, main
from aios_ray.config import ClusterConfig
from aios_ray.errors import ConfigError
from aios_ray.seed_flags import ANSWERS, seed_train_flags
from aios_ray.tune.settings import AutotuneConfig
from aios_ray.tune.space import SearchSpace, apply_params, yaml_snippet

TRAIN = "train"  # aios hrm-hf train-actv1
SEED_FLAGS: list[tuple[str, str]] = [
    *[(TRAIN, flag) for flag in (
        "--model artifacts/hf_implant/base_model", "--dataset-file data.txt", "--steps 20", "--batch-size 8",
        "--use-moe", "--no-moe", "--num-experts 8", "--num-experts-per-tok 2", "--moe-capacity-factor 1.25",
        "--auto-adjust-lr", "--no-auto-adjust-lr", "--log-file m.jsonl", "--expert-id test-expert-004",
        "--default-goal goal", "--max-seq-len 128", "--lr 1e-4", "--amp", "--no-amp", "--gradient-checkpointing",
        "--no-gradient-checkpointing", "--model-dtype bf16", "--use-8bit-optimizer", "--halt-max-steps 1",
        "--eval-batches 2", "--eval-file eval.txt", "--ascii-only", "--iterate", "--stop-file STOP",
        "--brain-name b", "--bundle-dir d", "--h-layers 2", "--l-layers 2", "--hidden-size 64", "--expansion 2.0",
        "--num-heads 4", "--h-cycles 2", "--l-cycles 2", "--window-size 64", "--pos-encodings learned", "--ddp",
        "--cuda-ids 0,1", "--world-size 2", "--zero-stage zero2", "--use-flash-attn", "--parallel-independent",
        "--dataset-chunk-size 512", "--seed 42", "--wandb", "--no-wandb", "--wandb-project aios-hrm",
        "--wandb-entity team", "--wandb-group g", "--wandb-tags smoke,debug", "--wandb-offline", "--wandb-online",
        "--wandb-run-name dev-dryrun")],
    (TRAIN, "--use-chunked-training"), (TRAIN, "--chunk-size 1024"),
    *[("flow hrm-train", flag) for flag in (
        "--dataset-file data.txt", "--eval-file eval.txt", "--brain-name demo-brain", "--wandb",
        "--train-args '--steps 100 --batch-size 4'")],
    *[("autotune", flag) for flag in (
        "--dataset-file data.txt", "--trials 5", "--timeout-minutes 10", "--sampler tpe", "--pruner None",
        "--direction minimize", "--eval-batches 2", "--study-name actv1-tune-v1",
        "--storage sqlite:///artifacts/optimization/autotune.db", "--seed 42", "--lr-min 1e-6", "--lr-max 1e-4",
        "--warmup-min 20", "--warmup-max 400", "--chunk-choices 1024,2048,4096", "--moe-balance-min 5e-3",
        "--moe-balance-max 2e-2", "--wandb")],
    ("goals-add 'Improve summarization quality'", "--expert-id test-expert-004"),
    *[("rl sequential", flag) for flag in (  # the RL prototype's `python run.py ...`
        "--mode train", "--num_experts 256", "--hbm_capacity 32", "--dram_capacity 128", "--num_games 5",
        "--steps_per_game 100000", "--expert_dim 512", "--expert_hidden_dim 2048", "--num_layers 6", "--top_k 2",
        "--context_len 32")],
]

# Words the seeds' text extraction glued to a flag ("--ampby default", "--use-moeis on"): not flags.
GLUED = {"--ampby", "--auto-adjust-lrenabled", "--gradient-checkpointingand", "--lrand", "--num-expertsand",
         "--parallel-independentwith", "--use-8bit-optimizerif", "--use-flash-attnand", "--use-moeis"}
SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"


def _argv(command: str, flag: str) -> list[str]:
    import shlex

    return [*shlex.split(command), *shlex.split(flag)]


@pytest.mark.parametrize(("command", "flag"), SEED_FLAGS)
def test_every_seed_flag_parses_or_names_its_equivalent_in_one_line(command: str, flag: str, capsys):
    name = flag.split()[0]
    answer = ANSWERS.get(command, {}).get(name)
    if answer is None:
        build_parser().parse_args(_argv(command, flag))
        return
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(_argv(command, flag))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert name in err and answer in err


def test_the_list_holds_every_flag_the_seeds_give():
    if not SEEDS.is_dir():
        pytest.skip(f"{SEEDS}: the seed documents are not beside this checkout")
    found = set()
    for text in (path.read_text(encoding="utf-8") for path in SEEDS.glob("*.txt")):
        for match in re.findall(r"--[a-z][a-z0-9_-]*[a-z0-9]", text):
            found.update("--" + part for part in match.split("--") if part)
    listed = {flag.split()[0] for _, flag in SEED_FLAGS}
    assert found - GLUED - listed == set()


def _train_config(*flags: str):
    return config_from_args(build_parser().parse_args(["train", *flags]))


def test_world_size_is_num_workers_and_cuda_ids_pick_gpus_and_workers():
    assert _train_config("--world-size", "3").cluster.num_workers == 3
    cluster = _train_config("--cuda-ids", "0,1").cluster
    assert (cluster.use_gpu, cluster.num_workers, cluster.gpu_ids) == (True, 2, [0, 1])
    assert _train_config("--cuda-ids", "1", "--world-size", "4").cluster.num_workers == 4


@pytest.mark.parametrize(("flags", "says"), [
    (["--cuda-ids", "0,0"], "given twice"),
    (["--cuda-ids", "-1"], "GPU indices >= 0"),
    (["--cuda-ids", "a,b"], "GPU indices >= 0"),
    (["--cuda-ids", "0", "--address", "auto"], "--use-gpu --num-workers N"),
    (["--model-dtype", "fp16"], "--model-dtype bf16"),
    (["--model-dtype", "fp64"], "fp32|bf16|fp16"),
    (["--pos-encodings", "alibi"], "rope|learned|none"),
    (["--window-size", "-1"], "--window-size must be >= 0"),
])
def test_bad_values_are_one_line_and_exit_2(flags: list[str], says: str, capsys):
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err


def test_more_cuda_ids_than_visible_gpus_is_one_line_and_exit_2(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["train", "--cuda-ids", "0,1", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GPU 1 is not among the 1 GPU(s) visible" in err


def test_cuda_ids_narrow_cuda_visible_devices(monkeypatch):
    from aios_ray.train.gpus import select_local_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert select_local_gpus(ClusterConfig(cuda_ids="2,0"), visible_count=4) == "2,0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # indices count among the GPUs already visible
    assert select_local_gpus(ClusterConfig(cuda_ids="1"), visible_count=3) == "6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    with pytest.raises(ConfigError, match="GPU 3 is not among the 3"):
        select_local_gpus(ClusterConfig(cuda_ids="3"), visible_count=3)
    assert select_local_gpus(ClusterConfig(), visible_count=0) is None


def test_8bit_optimizer_without_bitsandbytes_says_how_to_get_it(capsys):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    assert main(["train", "--use-8bit-optimizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install bitsandbytes" in err


def test_the_model_flags_reach_the_model_config():
    model = _train_config("--model-dtype", "bf16", "--window-size", "16", "--pos-encodings", "none",
                          "--use-flash-attn").model
    assert (model.model_dtype, model.window_size, model.pos_encodings, model.use_flash_attn) == ("bf16", 16, "none",
                                                                                                 True)


def _autotune_sections(*flags: str) -> tuple[AutotuneConfig, SearchSpace, list[str]]:
    from aios_ray.cli import _sections
    from aios_ray.config import build_section

    args = build_parser().parse_args(["autotune", *flags])
    sections = _sections(args)
    return (build_section(AutotuneConfig, sections.get("autotune", {}), "flags"),
            build_section(SearchSpace, sections.get("space", {}), "flags"), seed_train_flags(args))


def test_autotune_seed_flags_mean_the_search_space_they_named():
    settings, space, train_flags = _autotune_sections(
        "--moe-balance-min", "5e-3", "--moe-balance-max", "2e-2", "--chunk-choices", "1024,2048,4096",
        "--pruner", "None", "--wandb")
    assert (space.moe_lb_min, space.moe_lb_max, settings.pruner, train_flags) == (5e-3, 2e-2, "none", ["--wandb"])
    assert space.choices("chunk_size") == [1024, 2048, 4096]
    assert "chunk_size" in space.categorical() and "chunk_size" in space.distributions()
    sections = apply_params({"model": {}, "train": {}, "cluster": {}}, {"chunk_size": 2048})
    assert sections["train"]["chunk_size"] == 2048
    assert "train:\n  chunk_size: 2048" in yaml_snippet({"chunk_size": 2048})
    _, plain, none = _autotune_sections()
    assert "chunk_size" not in plain.categorical() and none == []  # older studies: the same parameters
    with pytest.raises(ConfigError, match="--chunk-choices"):
        _autotune_sections("--chunk-choices", "0,512")


def test_autotune_and_flow_wandb_reach_every_training_run(monkeypatch):
    import aios_ray.flow.hrm_train as flow
    import aios_ray.tune.autotune as autotune

    seen = []
    monkeypatch.setattr(autotune, "run_autotune", lambda cfg, space, base: seen.append(base) or {
        "trials_log": "x", "trials": [], "failed": 0})
    monkeypatch.setattr(flow, "run_hrm_train", lambda settings, base, tune: seen.append(base) or {
        "bundle": "b", "model_card": "m", "eval_loss": 1.0, "ppl": 2.7})
    assert main(["autotune", "--wandb", "--train-args", "--steps 3"]) == 0
    assert main(["flow", "hrm-train", "--dataset-file", "d.txt", "--wandb"]) == 0
    assert [(base.tracking.wandb, base.train.steps) for base in seen] == [(True, 3), (True, 100)]


def test_the_rl_prototypes_flags_are_its_aliases_here():
    from aios_ray.cli import _sections

    sections = _sections(build_parser().parse_args(_argv("rl sequential", (
        "--num_experts 16 --top_k 1 --steps_per_game 500 --expert_dim 64 --expert_hidden_dim 96 --hbm_capacity 4 "
        "--dram_capacity 8"))))
    assert sections["rl"] == {"num_experts": 16, "num_experts_per_tok": 1, "steps_per_game": 500, "hidden": 64,
                              "expert_hidden": 96}
    assert sections["store"] == {"capacity_gpu": 4, "capacity_dram": 8}
