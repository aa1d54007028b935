"""`aios-ray autotune`: a Ray Tune sweep searched by Optuna whose trials train like `aios-ray train`.

Ray tests run real sweeps of the `debug` preset on a small slice of the sample corpus (seconds per trial)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aios_ray.cli import main
from aios_ray.config import Config
from aios_ray.tune.space import SearchSpace, apply_params, yaml_snippet

SAMPLE = Path(__file__).resolve().parents[1] / "aios_ray" / "data" / "sample"


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    """~40 KB of training text and ~6 KB of held-out text: 32-token blocks for batches of 2..16, not 4096."""
    train, held_out = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text((SAMPLE / "train.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    held_out.write_text((SAMPLE / "eval.txt").read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    return train, held_out


def sweep_args(out: Path, corpus: tuple[Path, Path], *extra: str) -> list[str]:
    return ["autotune", "--config", "debug", "--dataset-file", str(corpus[0]), "--eval-file", str(corpus[1]),
            "--out-dir", str(out), "--sampler", "random", "--pruner", "none", "--max-concurrent", "2",
            "--resources-per-trial", "cpu=1", *extra]


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr-min", "0.01", "--lr-max", "0.001"], "--lr-min/--lr-max: empty range"),
    (["--lr-max", "5"], "leaves the safe bounds"),
    (["--num-experts-choices", ""], "--num-experts-choices: no choices given"),
    (["--batch-choices", "4,x"], "expected comma-separated integers"),
    (["--num-experts-choices", "2,4", "--top-k-choices", "1,4"], "top-k 4 exceeds the smallest"),
    (["--sampler", "grid"], "--sampler 'grid'"),
    (["--pruner", "hyperband"], "--pruner 'hyperband'"),
    (["--trials", "0"], "--trials must be > 0"),
    (["--resources-per-trial", "cpu=0"], "cpu must be > 0"),
    (["--storage", "sqlite:////proc/no/such/dir/a.db"], "--storage sqlite:////proc/no/such/dir/a.db"),
    (["--train-args", "--num-experts 2 --num-experts-per-tok 3"], "exceeds --num-experts"),
    (["--dataset-file", "/no/such/file.txt"], "needs held-out text"),
])
def test_impossible_settings_are_one_line_and_write_nothing(tmp_path: Path, capsys, flags: list[str],
                                                            message: str):
    out = tmp_path / "opt"
    assert main(["autotune", "--out-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_trials_values_land_in_the_training_config_and_the_yaml_snippet_trains():
    params = {"lr": 0.002, "warmup_steps": 7, "moe_lb_coef": 0.02, "num_experts": 8, "num_experts_per_tok": 2,
              "batch_size": 16}
    cfg = Config.from_dict(apply_params(Config().to_dict(), params))
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.model.moe_lb_coef) == (0.002, 7, 0.02)
    assert (cfg.model.num_experts, cfg.model.num_experts_per_tok, cfg.train.batch_size) == (8, 2, 16)
    snippet = Config.from_dict(yaml.safe_load(yaml_snippet(params)))  # what `aios-ray train --config` reads
    assert snippet.train.lr == 0.002 and snippet.model.num_experts == 8


def test_every_suggested_trial_is_a_valid_training_config():
    import optuna

    space = SearchSpace(num_experts_choices="2,4", top_k_choices="1,2", batch_choices="2,4")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        space.suggest(trial)
        Config.from_dict(apply_params(Config().to_dict(), trial.params))  # raises on an impossible trial
        assert space.lr_min <= trial.params["lr"] <= space.lr_max
        study.tell(trial, 1.0)
    assert space.distributions() == study.trials[0].distributions


@pytest.mark.ray
def test_a_sweep_with_a_failing_trial_writes_its_log_best_trial_and_plots(ray_local, tmp_path: Path, corpus,
                                                                           capsys):
    """Batch 4096 cannot be served by this corpus: those trials fail with the reason, the sweep goes on."""
    out = tmp_path / "opt"
    assert main(sweep_args(out, corpus, "--trials", "4", "--seed", "3", "--batch-choices", "2,4096")) == 0
    printed = capsys.readouterr().out
    assert "autotune  trial 4/4" in printed and "top trials of this sweep" in printed
    (log,) = out.glob("autotune_*.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 4
    failed = [r for r in records if r["state"] == "failed"]
    done = [r for r in records if r["state"] == "complete"]
    assert failed and done, records  # seed 3 draws both batch sizes
    assert all(r["params"]["batch_size"] == 4096 and "training data too small" in r["error"] for r in failed)
    assert all(r["params"]["batch_size"] == 2 and r["value"] > 0 and r["step"] == 6 for r in done)
    best = json.loads((out / "best_trial.json").read_text())
    assert best["value"] == min(r["value"] for r in done) and best["params"]["batch_size"] == 2
    Config.from_dict(yaml.safe_load(best["yaml"]))
    assert (out / "autotune_history.png").stat().st_size > 0
    # each trial trained its own bundle under the experiment folder
    assert len(list((out / best["study_name"] / "trials").glob("*/metadata.json"))) == len(done)


@pytest.mark.ray
def test_a_study_resumed_by_name_and_storage_runs_only_the_missing_trials(ray_local, tmp_path: Path, corpus):
    import optuna

    out, db = tmp_path / "opt", tmp_path / "study.db"
    flags = ["--study-name", "resume-me", "--storage", f"sqlite:///{db}", "--batch-choices", "2"]
    assert main(sweep_args(out, corpus, "--trials", "2", *flags)) == 0
    assert main(sweep_args(out, corpus, "--trials", "3", *flags)) == 0
    logs = sorted(out.glob("autotune_*.jsonl"), key=lambda p: p.stat().st_mtime)
    assert [len(p.read_text().splitlines()) for p in logs] == [2, 1]
    study = optuna.load_study(study_name="resume-me", storage=f"sqlite:///{db}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # the same name in the same storage with another search space is refused
    assert main(sweep_args(out, corpus, "--trials", "4", *flags[:-2], "--batch-choices", "2,4")) == 2


CLUSTER_SWEEP = """
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

from aios_ray.cli import main

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
try:
    code = main(sys.argv[1:] + ["--address", cluster.address])
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps({"code": code, "nodes": nodes}))
"""


@pytest.mark.ray
def test_trials_spread_over_the_nodes_of_a_cluster(tmp_path: Path, corpus):
    """Two nodes of one CPU each (``ray.cluster_utils.Cluster``, in a process of its own: the suite's Ray stays up)
    and two trials of one CPU at a time: one trial runs on each node."""
    import os
    import subprocess
    import sys

    out = tmp_path / "opt"
    args = sweep_args(out, corpus, "--trials", "2", "--batch-choices", "2")
    done = subprocess.run([sys.executable, "-c", CLUSTER_SWEEP, *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and len(report["nodes"]) == 2
    (log,) = out.glob("autotune_*.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["state"] for r in records] == ["complete", "complete"]
    assert sorted(r["node_id"] for r in records) == report["nodes"]  # one trial on each node
