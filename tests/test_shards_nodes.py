"""A prepared dataset across nodes: `data prepare` tokenizes on both nodes of a simulated 2-node cluster, and two
Ray Train workers (one per node) train from the shards, each streaming its own through Ray Data; a run stopped
and resumed there sees the blocks of an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray  # ~40 s here: within the default suite's budget

# Two nodes of one CPU each: the two tokenizer actors, and later the two training workers, can only run one per
# node. In a subprocess: the suite's own Ray (ray_local) stays up in the test process.
CLUSTER_RUN = """
import dataclasses, json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

from aios_ray.data.prepare_shards import PrepareSpec, prepare_dataset
from aios_ray.train.run import run_training
from tests.helpers import debug_config, events, train_losses
from tests.test_shards import CHUNK, SEQ, _corpus

tmp = Path(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=True)
spec = PrepareSpec(dataset=str(_corpus(tmp / "corpus")), out=str(tmp / "data"), max_seq_len=SEQ,
                   chunk_blocks=CHUNK, vocab_size=300, eval_fraction=0.05, piece_mb=0.004, concurrency=2,
                   address=cluster.address)
prepared = prepare_dataset(spec)


def on_cluster(folder, resume=None, **train):
    cfg = debug_config(folder, data=prepared["out"], steps=4, eval_interval=100, expert_usage_interval=100, **train)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model=resume),
                               cluster=dataclasses.replace(cfg.cluster, use_ray=True, num_workers=2,
                                                           address=cluster.address))


plan, summary = run_training(on_cluster(tmp / "whole"))
start = events(plan.log_file, "run_start")[0]
# the same run stopped after its first step (a stop file) and resumed from its bundle
(tmp / "STOP").touch()
first_plan, first = run_training(on_cluster(tmp / "split", stop_file=str(tmp / "STOP")))
resumed_plan, resumed = run_training(on_cluster(tmp / "split", resume=first_plan.bundle_root))
print("RESULT " + json.dumps({"nodes": prepared["nodes"], "step": summary["step"], "shards": prepared["shards"],
                              "world_size": start["world_size"], "losses": train_losses(plan.log_file),
                              "stopped_at": first["step"], "resumed_step": resumed["step"],
                              "split_losses": train_losses(first_plan.log_file)}))
ray.shutdown()
cluster.shutdown()
"""


def test_prepare_on_two_nodes_and_train_two_workers_from_the_shards(tmp_path: Path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CLUSTER_RUN, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:] + done.stdout[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["nodes"] == 2  # the tokenizer actors ran on both nodes
    assert result["world_size"] == 2 and result["step"] == 4 and len(result["losses"]) == 4
    assert result["shards"] > 10
    # each worker streams its shards through Ray Data; stopped after step 1 and resumed, the run continues at the
    # same block of each worker's stream: its losses are the uninterrupted run's
    assert result["stopped_at"] == 1 and result["resumed_step"] == 4
    for step in ("1", "2", "3", "4"):
        assert result["split_losses"][step] == pytest.approx(result["losses"][step], rel=1e-6, abs=1e-7), step
