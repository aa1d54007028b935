"""The store as Ray actors: training through leased shared slots, and kill-and-recover of each tier."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from actors.tier_actors import create_store, shutdown_store
from aios_ray.config import StoreConfig
from aios_ray.errors import DataError
from aios_ray.model.hrm import HRMACTv1
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.train.optim import BETAS, EPS, build_optimizer
from tests.helpers import CFG, assert_same_experts, assert_same_gradients, local_records

pytestmark = pytest.mark.ray


def _config(tmp_path: Path, name: str, gpu: int = 12, dram: int = 6) -> StoreConfig:
    return StoreConfig(experts="tiered", name=name, path=str(tmp_path / name), device="cpu", capacity_gpu=gpu,
                       capacity_dram=dram)


LAYOUT = ExpertLayout(CFG.hidden_size, CFG.ffn_size)


@pytest.fixture
def ended():
    """``ended(config)``: the store is ended when the test ends, however it ends (its actors, and its hot slab's
    file in /dev/shm, which would otherwise outlive the test)."""
    configs: list[StoreConfig] = []
    yield configs.append
    for config in configs:
        shutdown_store(config)


def _train_steps(local, tiered, source, store, steps: int, first_seed: int = 0) -> None:
    from aios_ray.config import TrainConfig

    tc = TrainConfig(lr=1e-2, weight_decay=0.1)
    opts = getattr(local, "_opts", None) or (build_optimizer(local, tc), build_optimizer(tiered, tc))
    local._opts = opts
    for step in range(first_seed, first_seed + steps):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len + 1), generator=g)
        source.begin_step()
        out_local, out_tiered = local(tokens[:, :-1], tokens[:, 1:]), tiered(tokens[:, :-1], tokens[:, 1:])
        torch.testing.assert_close(out_tiered.logits, out_local.logits, atol=1e-5, rtol=1e-5)
        out_local.loss.backward()
        out_tiered.loss.backward()
        assert_same_gradients(local, tiered, source)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        source.apply_optimizer(tc.lr, tc.weight_decay, BETAS, EPS)
        source.end_step()


def _pair(store):
    torch.manual_seed(0)
    local, tiered = HRMACTv1(CFG).train(), HRMACTv1(CFG).train()
    tiered.load_state_dict(local.state_dict())
    ray.get(store.nvme.write_many.remote(local_records(local, store.layout)))
    source = store.experts_client()
    tiered.use_expert_source(source)
    return local, tiered, source


def test_training_through_the_actors_equals_local_and_is_durable_after_flush(ray_local, tmp_path: Path, ended):
    ended(_config(tmp_path, "eq"))
    store = create_store(_config(tmp_path, "eq"), LAYOUT)
    local, tiered, source = _pair(store)
    _train_steps(local, tiered, source, store, steps=3)
    assert store.flush() > 0
    from aios_ray.store.nvme import NvmeStore

    assert_same_experts(local, local._opts[0], NvmeStore(Path(str(store.config.path)), store.layout),
                         store.layout)
    hot, dram, nvme = store.stats()
    assert hot["hits"] + hot["misses"] > 0 and nvme["reads"] > 0
    again = create_store(_config(tmp_path, "eq"), LAYOUT)  # found again by name
    resident = ray.get(again.gpu[0].resident.remote())
    assert resident == ray.get(store.gpu[0].resident.remote())
    # A restarted training worker maps the same slots again instead of reloading: its leases are all hits.
    restarted = again.experts_client()
    restarted.begin_step()
    restarted.acquire(sorted(resident))
    after = ray.get(again.gpu[0].stats.remote())
    assert after["misses"] == hot["misses"] and after["hits"] == hot["hits"] + len(resident)
    assert restarted.slots == resident
    restarted.end_step()
    # `store stats --name` finds the running actors by the config's names and shows their own counters; every
    # counter they report is also a dashboard gauge (the same numbers in all three places).
    from actors.tier_actors import GAUGES, live_store_stats

    live = live_store_stats(_config(tmp_path, "eq"), address=None)
    hot_now, dram_now = ray.get([again.gpu[0].stats.remote(), again.dram.stats.remote()])
    assert live["tiers"] == [hot_now, dram_now]
    for tier in live["tiers"]:
        numeric = {k for k, v in tier.items() if isinstance(v, int | float) and k != "slots"}
        assert numeric <= set(GAUGES), numeric - set(GAUGES)
    with pytest.raises(DataError, match="no running store actors"):
        live_store_stats(_config(tmp_path, "nobody"), address=None)
    # Every tier answers prefetch(layer, expert_ids).
    ray.get([again.gpu[0].prefetch.remote(0, [0, 1]), again.dram.prefetch.remote(0, [0, 1]),
             again.nvme.prefetch.remote(0, [0, 1])])


def _checksums(store) -> dict[ExpertKey, str]:
    keys = ray.get(store.nvme.keys.remote())
    records = ray.get(store.nvme.read_many.remote(keys))
    return {k: hashlib.sha256(np.ascontiguousarray(flat).tobytes()).hexdigest() for k, (flat, _) in
            zip(keys, records, strict=True)}


@pytest.mark.parametrize("victim", ["gpu", "dram", "nvme"])
def test_killing_a_tier_actor_loses_nothing_that_was_flushed(ray_local, tmp_path: Path, victim: str, ended):
    ended(_config(tmp_path, f"kill-{victim}"))
    store = create_store(_config(tmp_path, f"kill-{victim}"), LAYOUT)
    local, tiered, source = _pair(store)
    _train_steps(local, tiered, source, store, steps=2)
    store.flush()
    before = _checksums(store)
    handle = {"gpu": store.gpu[0], "dram": store.dram, "nvme": store.nvme}[victim]
    ray.kill(handle, no_restart=False)
    # The actor comes back (max_restarts=-1) and rebuilds from the tier below; nothing flushed is lost.
    assert _checksums(store) == before
    fresh = store.experts_client()  # after a hot-cache restart its slab is a new file: re-map
    fresh.begin_step()
    weights = fresh.weights(0, [0, 1])
    flat, _ = ray.get(store.nvme.read.remote(ExpertKey(0, 1)))
    expected = store.layout.views(torch.from_numpy(np.array(flat)))["w_down"]
    assert torch.equal(weights[1][1].detach(), expected)
    fresh.end_step()


def _kill_training_worker() -> None:
    """SIGKILL the Ray Train worker process (the process that trains and maps the hot slab)."""
    import os
    import signal

    import psutil

    # Only this test session's Ray (its processes descend from this one): other Ray sessions may run beside it.
    workers = [p for p in psutil.Process().children(recursive=True)
               if any("RayTrainWorker" in part for part in p.cmdline() or [])]
    assert len(workers) == 1, f"expected one training worker process, found {len(workers)}"
    os.kill(workers[0].pid, signal.SIGKILL)


def _kill_when_step_reached(log_file: Path, step: int, victim: str, namespace: str, done: list,
                            event: str = "train") -> None:
    """Kill ``victim`` as soon as the log has an ``event`` line at ``step`` or later."""
    import json
    import time

    deadline = time.time() + 120
    while time.time() < deadline:
        if log_file.exists():
            steps = [json.loads(line).get("step", 0) for line in log_file.read_text().splitlines()
                     if f'"event": "{event}"' in line]
            if steps and max(steps) >= step:
                if victim == "worker":
                    _kill_training_worker()
                else:
                    ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=False)
                done.append(max(steps))
                return
        time.sleep(0.02)


TRAIN = {"experts": "tiered", "capacity_dram": 3, "steps": 40, "checkpoint_interval": 5, "eval_interval": 100,
         "expert_usage_interval": 100, "stats_interval": 100}


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory) -> dict[int, float]:
    """Train losses of the tiered run that no kill interrupts (no Ray: the same arithmetic in one process)."""
    from aios_ray.train.run import run_training
    from tests.helpers import debug_config, train_losses

    reference, _ = run_training(debug_config(tmp_path_factory.mktemp("reference"), **TRAIN))
    return train_losses(reference.log_file)


@pytest.mark.parametrize("victim", ["dram", "gpu0", "worker"])
def test_training_survives_a_kill_and_replays_from_the_last_flush(ray_local, tmp_path: Path, victim,
                                                                  uninterrupted_losses):
    """Kill a cache actor or the training worker mid-run, and the run ends with exactly the losses of a run
    that was never interrupted, with each step once in its metrics log.

    - A cache actor: the trainer notices its new incarnation, rolls back to the last flush and replays.
    - The training worker, killed right after it wrote the step-10 checkpoint (before Ray's controller may have
      taken in that report): the restarted worker resumes from the newest of Ray's checkpoint and the run's own
      checkpoints in the bundle, step 10, so the kill costs no step. The store's actors are detached, so they
      and their hot slab outlive the worker: the new worker re-maps the slab and finds the experts it had
      (those updated since the flush are dropped and reloaded).
    """
    import dataclasses
    import threading

    from aios_ray.tracking.jsonl import read_metrics
    from aios_ray.train.run import run_training
    from tests.helpers import debug_config

    # A DRAM tier of 3 records for 8 experts: between flushes, dirty records are evicted on to NVMe (staged);
    # recovery must discard those too, or the replay would start from experts newer than the checkpoint.
    cfg = debug_config(tmp_path / "killed", **TRAIN)
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, use_ray=True))
    killed_at: list[int] = []
    log_file = tmp_path / "killed" / "brains" / "t" / "metrics.jsonl"
    target = "worker" if victim == "worker" else f"{cfg.train.brain_name}-{victim}"
    trigger = ("checkpoint", 10) if victim == "worker" else ("train", 12)
    watcher = threading.Thread(target=_kill_when_step_reached,
                               args=(log_file, trigger[1], target, "aios-ray", killed_at, trigger[0]))
    watcher.start()
    plan, summary = run_training(cfg)
    watcher.join()
    assert killed_at, "the run ended before the kill"
    events = read_metrics(Path(plan.log_file))
    recoveries = [e for e in events if e["event"] == "store_recovery"]
    reopens = [e for e in events if e["event"] == "store_reopen"]
    restarts = [e for e in events if e["event"] == "restart"]
    if victim == "worker":
        assert not recoveries and len(reopens) == 1
        assert reopens[0]["step"] == killed_at[0] >= 10  # the newest checkpoint, written just before the kill
        assert reopens[0]["hot_kept"] + reopens[0]["hot_dropped"] > 0  # the slab the dead worker used is still there
        assert all(e["step"] == killed_at[0] for e in restarts)  # only if lines after it had to go
    else:
        assert len(recoveries) == 1 and recoveries[0]["steps_replayed"] >= 1 and not reopens
        assert len(restarts) == 1 and restarts[0]["step"] == recoveries[0]["step"]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == list(range(1, 41))  # each step once: replayed lines replaced the lost ones
    final = {e["step"]: e["train_loss"] for e in events if e["event"] == "train"}
    assert summary["step"] == 40
    assert final == pytest.approx(uninterrupted_losses, rel=1e-5)


def test_two_workers_survive_a_dram_cache_kill_together(ray_local, tmp_path: Path):
    """With two DDP workers on the store, a tier actor's restart is seen by both (they agree each step), rank 0
    alone rolls the store back, and the run ends with the losses of the same run uninterrupted."""
    import dataclasses
    import threading

    from aios_ray.tracking.jsonl import read_metrics
    from aios_ray.train.run import run_training
    from tests.helpers import debug_config, train_losses

    def two_workers(name: str):
        cfg = debug_config(tmp_path / name, **{**TRAIN, "steps": 20})
        return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, use_ray=True, num_workers=2))

    reference, _ = run_training(two_workers("reference"))
    killed_at: list[int] = []
    log_file = tmp_path / "killed" / "brains" / "t" / "metrics.jsonl"
    watcher = threading.Thread(target=_kill_when_step_reached, args=(log_file, 8, "t-dram", "aios-ray", killed_at))
    watcher.start()
    plan, summary = run_training(two_workers("killed"))
    watcher.join()
    assert killed_at, "the run ended before the kill"
    events = read_metrics(Path(plan.log_file))
    recoveries = [e for e in events if e["event"] == "store_recovery"]
    assert len(recoveries) == 1 and recoveries[0]["steps_replayed"] >= 1
    final = {e["step"]: e["train_loss"] for e in events if e["event"] == "train"}
    expected = train_losses(reference.log_file)
    assert summary["step"] == 20
    assert final == pytest.approx(expected, rel=1e-5)
