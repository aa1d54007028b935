"""The tiered store across nodes: one store per node, its workers' expert gradients averaged over every worker,
and a worker restarted on a node without a store rebuilding it from the checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aios_ray.train.run import run_training
from tests.helpers import debug_config, events, train_losses

pytestmark = pytest.mark.ray

TRAIN = {"experts": "tiered", "capacity_dram": 3, "steps": 10, "checkpoint_interval": 2, "eval_interval": 100,
         "expert_usage_interval": 100, "stats_interval": 100}


def _two_workers(tmp_path: Path, address: str | None = None):
    cfg = debug_config(tmp_path, **TRAIN)
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, use_ray=True, num_workers=2,
                                                                address=address))


# Three nodes of one CPU each; an actor holds the third node's CPU, so the two workers run on the first two,
# one on each. Once the run has written its step-4 checkpoint the second node is removed (its worker and its
# store die with it) and the third node's CPU freed: Ray Train restarts the workers on the first node, whose
# store is still there, and on the third, which has none.
CLUSTER_RUN = """
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from aios_ray.train.run import run_training
from tests.test_store_nodes import _two_workers

tmp, kill_at = Path(sys.argv[1]), int(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
second = cluster.add_node(num_cpus=1)
third = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=True)


@ray.remote(num_cpus=1)
class Placeholder:
    def ready(self):
        return True


on_third = NodeAffinitySchedulingStrategy(third.node_id, soft=False)
placeholder = Placeholder.options(scheduling_strategy=on_third).remote()
ray.get(placeholder.ready.remote())
cfg = _two_workers(tmp, cluster.address)
log_file = Path(cfg.train.bundle_dir) / cfg.train.brain_name / "metrics.jsonl"
moved = {}


def move_the_second_node():
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        if any('"event": "checkpoint"' in l and json.loads(l)["step"] >= kill_at for l in lines):
            moved["removed"] = second.node_id
            cluster.remove_node(second)
            ray.kill(placeholder)
            return
        time.sleep(0.05)


watcher = threading.Thread(target=move_the_second_node, daemon=True)
if kill_at:
    watcher.start()
try:
    plan, summary = run_training(cfg)
    watcher.join(timeout=1)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps({"log_file": plan.log_file, "bundle": plan.bundle_root, "step": summary["step"], "nodes": nodes,
                  "removed": moved.get("removed")}))
"""


def _on_a_cluster(tmp_path: Path, kill_at: int) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", CLUSTER_RUN, str(tmp_path), str(kill_at)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout + done.stderr


@pytest.fixture(scope="module")
def one_node_losses(ray_local, tmp_path_factory) -> dict[int, float]:
    """Two workers on one node computing on the node's one shared hot tier."""
    reference, _ = run_training(_two_workers(tmp_path_factory.mktemp("one-node")))
    return train_losses(reference.log_file)


def test_a_hot_tier_per_worker_trains_like_one_shared_hot_tier(ray_local, tmp_path: Path, one_node_losses):
    """With a hot tier per worker (as on GPUs, one per GPU; here two shared-memory slabs), each worker computes
    on its own copy of the hot experts and runs AdamW in it on the averaged gradients: the copies stay equal,
    and the losses are those of the workers sharing one hot tier."""
    cfg = _two_workers(tmp_path)
    cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, hot_tiers="per-worker"))
    plan, _ = run_training(cfg)
    (stats,) = [e for e in events(plan.log_file, "store_stats") if e["step"] == 10]
    assert [t["tier"] for t in stats["tiers"]] == ["hot", "hot", "dram", "nvme"]
    assert stats["tiers"][0]["hits"] > 0 and stats["tiers"][1]["hits"] > 0  # each worker leased its own slots
    assert train_losses(plan.log_file) == pytest.approx(one_node_losses, rel=1e-5)


def test_two_nodes_train_like_one_and_a_worker_moved_to_a_new_node_rebuilds_its_store(ray_local, tmp_path: Path,
                                                                                      one_node_losses):
    """Each node gets a store of its own (actors and NVMe directory named after the node). The losses are those
    of the same two workers on one node with one store, also after the second node is replaced mid-run: the
    worker restarted on the first node finds its node's store and reverts it to the checkpoint, the one on the
    new node rebuilds a store from the checkpoint's expert records, and the replayed steps give the same losses."""
    expected = one_node_losses
    report, output = _on_a_cluster(tmp_path / "cluster", kill_at=4)
    assert report["step"] == 10
    # Each node had its own store: its NVMe directory carries the node's id (the removed node's included).
    assert report["removed"], "the run ended before the second node was removed"
    node_dirs = sorted(p.name for p in (Path(report["bundle"]) / "expert_store").glob("node-*"))
    assert node_dirs == sorted(f"node-{n[:8]}" for n in [*report["nodes"], report["removed"]])
    assert "rebuilt from the records of the step" in output  # the new node's worker rebuilt its store
    assert "expert store: resumed at the flush of step" in output  # the first node's worker found its own
    events = [json.loads(line) for line in Path(report["log_file"]).read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, 11))  # each step once
    assert train_losses(report["log_file"]) == pytest.approx(expected, rel=1e-5)
