"""A prepared dataset across nodes: `data prepare` tokenizes on both nodes of a simulated 2-node cluster, and two
Ray Train workers (one per node) train from the shards, each streaming its own."""

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
from tests.helpers import debug_config, events
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
cfg = debug_config(tmp, data=prepared["out"], steps=4, eval_interval=100, expert_usage_interval=100)
cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, use_ray=True, num_workers=2,
                                                           address=cluster.address))
plan, summary = run_training(cfg)
start = events(plan.log_file, "run_start")[0]
print("RESULT " + json.dumps({"nodes": prepared["nodes"], "step": summary["step"], "shards": prepared["shards"],
                              "world_size": start["world_size"], "losses": [e["train_loss"] for e in
                                                                           events(plan.log_file, "train")]}))
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
