"""Experts in the tiered store (hot slab -> DRAM -> NVMe) train exactly like local experts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aios_ray.config import TrainConfig
from aios_ray.model.hrm import HRMACTv1
from aios_ray.store.nvme import NvmeStore
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.slab import Slab, open_shared_slab
from aios_ray.store.tiered_experts import TieredExperts
from aios_ray.store.tiers import DramTier, HotTier, NvmeAsLower
from aios_ray.train.optim import BETAS, EPS, build_optimizer
from tests.helpers import CFG, assert_same_experts, assert_same_gradients, local_records


def build_store(tmp_path: Path, layout: ExpertLayout, hot_slots: int, dram_records: int):
    nvme = NvmeStore(tmp_path / "nvme", layout)
    dram = DramTier(dram_records * layout.nbytes, layout, NvmeAsLower(nvme))
    slab = Slab(tmp_path / "hot.slab", hot_slots, layout.numel, create=True)
    return nvme, dram, HotTier(slab, layout, dram), slab


@pytest.mark.parametrize("hot_slots", [12, 3])
def test_local_and_tiered_experts_agree_over_three_steps_with_evictions(tmp_path: Path, hot_slots: int):
    """With 12 slots every step's experts are hot; with 3 (fewer than one step uses) the others are streamed
    past the full tier as copies, updated and written back: the same arithmetic either way."""
    torch.manual_seed(0)
    local = HRMACTv1(CFG).train()
    tiered = HRMACTv1(CFG).train()
    tiered.load_state_dict(local.state_dict())
    layout = ExpertLayout(CFG.hidden_size, CFG.ffn_size)
    nvme, dram, hot, slab = build_store(tmp_path, layout, hot_slots=hot_slots, dram_records=6)  # 16 experts
    nvme.write_many(local_records(local, layout))
    source = TieredExperts(hot, slab, layout)
    tiered.use_expert_source(source)
    tc = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt_local, opt_tiered = build_optimizer(local, tc), build_optimizer(tiered, tc)
    all_keys = [ExpertKey(layer, e) for layer in range(2) for e in range(8)]

    for step in range(3):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len + 1), generator=g)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        source.begin_step()
        out_local, out_tiered = local(ids, labels), tiered(ids, labels)
        torch.testing.assert_close(out_tiered.logits, out_local.logits, atol=1e-5, rtol=1e-5)
        out_local.loss.backward()
        out_tiered.loss.backward()
        assert_same_gradients(local, tiered, source)
        opt_local.step()
        opt_tiered.step()
        source.apply_optimizer(tc.lr, tc.weight_decay, BETAS, EPS)
        opt_local.zero_grad()
        opt_tiered.zero_grad()
        source.end_step()
        # Another user of the hot tier takes most slots: this step's experts are evicted (dirty, to DRAM,
        # and from the small DRAM on to NVMe) and must come back intact next step.
        hot.acquire([k for k in all_keys if k not in source.used][:8] or all_keys[:8], "intruder")
        hot.release("intruder")

    assert hot.stats()["evictions"] > 0 and dram.stats()["evictions"] > 0
    assert (hot.stats()["streamed"] > 0) == (hot_slots == 3)
    hot.flush()
    assert_same_experts(local, opt_local, nvme, layout)


def test_a_leased_slot_is_never_evicted_and_the_slab_is_shared(tmp_path: Path):
    layout = ExpertLayout(8, 16)
    nvme, _dram, hot, slab = build_store(tmp_path, layout, hot_slots=2, dram_records=4)
    keys = [ExpertKey(0, e) for e in range(3)]
    nvme.write_many([(k, np.full(layout.numel, float(k.expert), dtype=np.float32), 0) for k in keys])
    slots = hot.lease(keys[:2], "a")
    other = open_shared_slab(slab.share())  # a second mapping, as the training process makes it
    assert other.row(slots[keys[1]])[0].item() == 1.0
    other.row(slots[keys[1]])[0] = 42.0  # written through one mapping, seen through the other
    assert slab.row(slots[keys[1]])[0].item() == 42.0
    import pytest

    from aios_ray.store.policy import TierFullError

    with pytest.raises(TierFullError):
        hot.lease([keys[2]], "b")  # both slots leased by "a"
    hot.release("a")
    assert keys[2] in hot.lease([keys[2]], "b")


def test_trainer_with_tiered_experts_matches_local_experts(tmp_path: Path):
    """The real training loop (--no-ray: the tier classes run in-process): same losses, same weights."""
    from aios_ray.tracking.jsonl import read_metrics
    from aios_ray.train.bundle import load_tensors
    from aios_ray.train.run import run_training
    from tests.helpers import debug_config

    def losses(plan) -> list[float]:
        return [e["train_loss"] for e in read_metrics(Path(plan.log_file)) if e["event"] == "train"]

    local_plan, _ = run_training(debug_config(tmp_path / "local"))
    tiered_cfg = debug_config(tmp_path / "tiered", experts="tiered", capacity_gpu=8, capacity_dram=3)
    tiered_plan, _ = run_training(tiered_cfg)
    assert losses(tiered_plan) == pytest.approx(losses(local_plan), rel=1e-4)
    local_w = load_tensors(Path(local_plan.bundle_root) / "model.safetensors")
    tiered_w = load_tensors(Path(tiered_plan.bundle_root) / "model.safetensors")
    assert local_w.keys() == tiered_w.keys()
    for name, tensor in local_w.items():
        torch.testing.assert_close(tiered_w[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    stats = [e for e in read_metrics(Path(tiered_plan.log_file)) if e["event"] == "store_stats"]
    hot, dram = stats[-1]["tiers"]
    assert hot["slots"] == 8 and hot["hits"] > 0 and dram["evictions"] > 0


def test_a_hot_tier_smaller_than_one_step_trains_like_a_large_one(tmp_path: Path, capsys):
    """`aios-ray train --experts tiered --capacity-gpu 1`: one hot slot for the 8 experts each step uses. The run
    completes with the losses and weights of the same run with room for every expert, and its store_stats say
    how often it streamed experts past the full tier and what that cost in stall."""
    from aios_ray.cli import main
    from aios_ray.train.run import run_training
    from tests.helpers import assert_same_weights, bundle_weights, debug_config, events, train_losses

    roomy, _ = run_training(debug_config(tmp_path / "roomy", experts="tiered", capacity_gpu=8))
    code = main(["train", "--config", "debug", "--no-ray", "--experts", "tiered", "--capacity-gpu", "1",
                 "--bundle-dir", str(tmp_path / "tight"), "--brain-name", "t", "--store-stats-interval", "3"])
    assert code == 0
    tight = tmp_path / "tight" / "t"
    assert train_losses(tight / "metrics.jsonl") == pytest.approx(train_losses(roomy.log_file), rel=1e-5)
    assert_same_weights(bundle_weights(tight), bundle_weights(roomy.bundle_root), atol=1e-5, rtol=1e-4)
    hot = [next(t for t in e["tiers"] if t["tier"] == "hot") for e in events(tight / "metrics.jsonl", "store_stats")]
    assert hot[-1]["slots"] == 1 and hot[-1]["streamed"] > 0 and hot[-1]["stall_seconds"] > 0
    assert hot[-1]["misses"] >= hot[-1]["streamed"]  # a streamed expert is a demand miss


def test_counters_of_a_trace_known_by_hand(tmp_path: Path):
    """The hit rate counts demand accesses only; prefetches are counted apart as issued, used and wasted; a
    demand that finds no free slot is streamed (a miss) and its update comes back intact."""
    layout = ExpertLayout(8, 16)
    nvme, dram, hot, _slab = build_store(tmp_path, layout, hot_slots=2, dram_records=4)
    k0, k1, k2, k3 = (ExpertKey(0, e) for e in range(4))
    nvme.write_many([(k, np.full(layout.numel, float(k.expert), dtype=np.float32), 0) for k in (k0, k1, k2, k3)])
    assert hot.prefetch([k0, k1]) == 2  # issued 2
    assert set(hot.acquire([k0], "step1")[0]) == {k0}  # demand hit on a prefetched expert: used 1
    hot.release("step1")
    assert hot.prefetch([k2]) == 1  # issued 3; evicts k1, least recently used and never needed: wasted 1
    slots, streamed = hot.acquire([k0, k2, k3], "step2")  # hit, hit (used 2), miss with both slots pinned
    assert set(slots) == {k0, k2} and set(streamed) == {k3}
    flat, version = streamed[k3]
    assert version == 0 and flat[0] == 3.0
    flat[:] = 30.0  # the step's update of its copy
    hot.write_back([(k3, flat, version + 1)])
    hot.release("step2")
    stats = hot.stats()
    counts = {name: stats[name] for name in ("hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                                             "streamed")}
    assert counts == {"hits": 3, "misses": 1, "prefetch_issued": 3, "prefetch_used": 2, "prefetch_wasted": 1,
                      "streamed": 1}
    assert stats["hit_rate"] == 0.75
    slot = hot.lease([k3], "step3")[k3]  # the written-back update, now from DRAM
    assert hot.slab.row(slot)[0].item() == 30.0 and hot.version[k3] == 1
    hot.release("step3")


def test_store_stats_command_prints_each_tier(tmp_path: Path, capsys):
    from aios_ray.cli import main
    from aios_ray.train.run import run_training
    from tests.helpers import debug_config

    plan, _ = run_training(debug_config(tmp_path, experts="tiered", capacity_gpu=8, capacity_dram=4))
    capsys.readouterr()
    assert main(["store", "stats", "--store-path", str(Path(plan.bundle_root) / "expert_store")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["tier", "entries", "used_MB", "hits", "misses", "hit_rate"]
    hot, dram = lines[1].split(), lines[2].split()
    assert hot[0] == "hot" and hot[1].endswith("/8") and 0 < float(hot[5]) <= 1
    assert dram[0] == "dram" and "experts used in the last step of 8" in lines[3]
    # debug preset: 6 steps, a checkpoint every 3 and at the end, 2 kept (+1 snapshot for Ray Train's lag)
    assert lines[4] == ("snapshots (the checkpoints a resume can return the store to): "
                        "step_00000000, step_00000003, step_00000006")
    assert main(["store", "stats", "--store-path", str(tmp_path / "nope")]) == 2


def test_a_lease_is_served_while_a_prefetch_waits_on_the_tier_below(tmp_path: Path):
    import threading

    layout = ExpertLayout(8, 16)
    nvme, dram, hot, _slab = build_store(tmp_path, layout, hot_slots=4, dram_records=8)
    keys = [ExpertKey(0, e) for e in range(4)]
    nvme.write_many([(k, np.full(layout.numel, float(k.expert), dtype=np.float32), 0) for k in keys])
    hot.lease([keys[0]], "trainer")
    hot.release("trainer")
    gate, entered = threading.Event(), threading.Event()

    class SlowLower:  # the DRAM tier, held up (a slow NVMe read) for the prefetch only
        def get_many(self, wanted, for_prefetch=False):
            if for_prefetch:
                entered.set()
                gate.wait(10)
            return dram.get_many(wanted, for_prefetch)

        def put_many(self, items):
            dram.put_many(items)

        def flush(self):
            return dram.flush()

    hot.lower = SlowLower()
    prefetcher = threading.Thread(target=hot.prefetch, args=([keys[1], keys[2]],))
    prefetcher.start()
    assert entered.wait(10)
    slots = hot.lease([keys[0]], "trainer")  # would block behind the prefetch if it held the lock
    assert keys[0] in slots and prefetcher.is_alive()
    gate.set()
    prefetcher.join(10)
    assert keys[1] in hot.resident() and keys[2] in hot.resident()
    assert hot.stats()["prefetch_issued"] == 2
    assert dram.stats()["misses"] == 1  # the demand load of keys[0]; the prefetch is not a DRAM miss


def test_revert_returns_every_tier_to_the_last_flush(tmp_path: Path):
    """Updates evicted all the way to NVMe after a flush are staged there; recovery discards them."""
    from aios_ray.config import StoreConfig
    from aios_ray.store.control import LocalStore

    layout = ExpertLayout(8, 16)
    store = LocalStore(StoreConfig(experts="tiered", path=str(tmp_path / "store"), name="reset", device="cpu",
                                   capacity_gpu=1, capacity_dram=1), layout)
    keys = [ExpertKey(0, e) for e in range(3)]
    store.seed([(k, np.zeros(layout.numel, dtype=np.float32), 0) for k in keys])

    def bump(key: ExpertKey, value: float) -> None:
        slot = store.hot.lease([key], "trainer")[key]
        store.slab.row(slot).fill_(value)  # an optimizer step in place
        store.hot.mark_dirty([key])
        store.hot.release("trainer")

    bump(keys[0], 1.0)
    store.flush()  # durable: expert 0 == 1
    bump(keys[0], 2.0)
    bump(keys[1], 5.0)  # evicts expert 0 (dirty) to DRAM
    bump(keys[2], 7.0)  # evicts expert 1 to DRAM, which evicts expert 0 (dirty) on to NVMe, staged
    assert store.nvme.read(keys[0])[0][0] == 2.0
    assert store.revert() == {"hot_kept": 0, "hot_dropped": 1, "dram_kept": 0, "dram_dropped": 1}
    assert store.nvme.read(keys[0])[0][0] == 1.0 and store.nvme.read(keys[1])[0][0] == 0.0
    for key, flushed in zip(keys, [1.0, 0.0, 0.0], strict=True):
        slot = store.hot.lease([key], "trainer")[key]
        assert store.slab.row(slot)[0].item() == flushed
        store.hot.release("trainer")
    store.close()


def test_revert_keeps_what_is_cached_at_its_flushed_version(tmp_path: Path, monkeypatch):
    """A training worker that restarts from its checkpoint finds the experts unchanged since then still hot;
    an expert whose update died half-way (version bumped before the write) is dropped and reloaded."""
    from aios_ray.config import StoreConfig
    from aios_ray.store import tiered_experts
    from aios_ray.store.control import LocalStore

    layout = ExpertLayout(8, 16)
    store = LocalStore(StoreConfig(experts="tiered", path=str(tmp_path / "store"), name="revert", device="cpu",
                                   capacity_gpu=4, capacity_dram=4), layout)
    keys = [ExpertKey(0, e) for e in range(3)]
    store.seed([(k, np.full(layout.numel, float(k.expert), dtype=np.float32), 0) for k in keys])

    def train_step(client: tiered_experts.TieredExperts, experts: list[int]) -> None:
        client.begin_step()
        client.acquire([ExpertKey(0, e) for e in experts])
        for w_gate_up, w_down in client.weights(0, experts).values():
            (w_gate_up.sum() + w_down.sum()).backward()
        client.apply_optimizer(lr=0.1, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        client.end_step()

    worker = store.experts_client()
    train_step(worker, [0, 1, 2])
    store.flush()
    flushed = {k: store.nvme.read(k)[0].copy() for k in keys}

    def dies_half_way(param, *args, **kwargs):
        param.add_(1.0)  # part of the update lands in the slot, then the process dies
        raise SystemExit("worker killed")

    with monkeypatch.context() as patch:
        patch.setattr(tiered_experts, "adamw_update_", dies_half_way)
        with pytest.raises(SystemExit):
            train_step(worker, [0])
    # DRAM holds all three at their flushed version (the flush went through it); the hot tier drops expert 0.
    assert store.revert() == {"hot_kept": 2, "hot_dropped": 1, "dram_kept": 3, "dram_dropped": 0}
    before = store.hot.stats()
    restarted = store.experts_client()
    restarted.begin_step()
    restarted.acquire(keys)  # the dead worker's lease was ended by the revert: all three fit again
    after = store.hot.stats()
    assert after["hits"] - before["hits"] == 2 and after["misses"] - before["misses"] == 1
    for key in keys:
        np.testing.assert_array_equal(store.slab.row(restarted.slots[key]).numpy(), flushed[key])
    restarted.end_step()
    store.close()


def test_a_lease_waits_for_the_prefetch_of_its_key_instead_of_fetching_it_again(tmp_path: Path):
    import threading

    layout = ExpertLayout(8, 16)
    nvme, dram, hot, _slab = build_store(tmp_path, layout, hot_slots=4, dram_records=8)
    key = ExpertKey(0, 1)
    nvme.write_many([(key, np.full(layout.numel, 3.0, dtype=np.float32), 0)])
    gate, entered, fetched = threading.Event(), threading.Event(), []

    class SlowLower:
        def get_many(self, wanted, for_prefetch=False):
            fetched.append((list(wanted), for_prefetch))
            if for_prefetch:
                entered.set()
                gate.wait(10)
            return dram.get_many(wanted, for_prefetch)

    hot.lower = SlowLower()
    prefetcher = threading.Thread(target=hot.prefetch, args=([key],))
    prefetcher.start()
    assert entered.wait(10)
    result: dict = {}
    leaser = threading.Thread(target=lambda: result.update(hot.lease([key], "trainer")))
    leaser.start()
    leaser.join(0.3)
    assert leaser.is_alive()  # waiting for the fetch under way, not starting its own
    gate.set()
    leaser.join(10)
    prefetcher.join(10)
    assert key in result and fetched == [([key], True)]  # fetched once, by the prefetch
    stats = hot.stats()
    assert stats["prefetch_used"] == 1 and stats["misses"] == 0 and stats["stall_seconds"] > 0


def _write_through_shared_slab(info: dict, slot: int, value: float) -> None:
    open_shared_slab(info).row(slot).fill_(value)
    torch.cuda.synchronize()


@pytest.mark.gpu  # CUDA IPC needs a GPU
def test_cuda_slab_is_shared_with_another_process_zero_copy():
    """The GPU twin of the shared-memory slab: another process maps the slots through a CUDA IPC handle and
    its writes land in the owner's device memory."""
    import torch.multiprocessing as mp

    from aios_ray.store.slab import CudaSlab

    slab = CudaSlab.allocate(4, 32, torch.device("cuda", 0))
    child = mp.get_context("spawn").Process(target=_write_through_shared_slab, args=(slab.share(), 2, 7.0))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    torch.cuda.synchronize()
    assert slab.row(2).eq(7.0).all() and slab.row(1).eq(0.0).all()
    assert slab.read(2).dtype == np.float32 and (slab.read(2) == 7.0).all()


def test_tiered_experts_take_the_grouped_path_over_the_slab_without_copying_weights(tmp_path: Path, monkeypatch):
    """fp32 tiered experts run the same grouped matmuls as local ones, reading the weights in place in the
    slab (the per-expert loop is only for autocast), and give the same outputs and gradients."""
    from aios_ray.model import moe as moe_module

    torch.manual_seed(1)
    local, tiered = HRMACTv1(CFG).train(), HRMACTv1(CFG).train()
    tiered.load_state_dict(local.state_dict())
    layout = ExpertLayout(CFG.hidden_size, CFG.ffn_size)
    nvme, _dram, hot, slab = build_store(tmp_path, layout, hot_slots=16, dram_records=16)
    nvme.write_many(local_records(local, layout))
    source = TieredExperts(hot, slab, layout)
    tiered.use_expert_source(source)
    weight_storages = []
    real_grouped_matmul = moe_module.grouped_matmul

    def recording(x, weights, group_ends):
        weight_storages.append(weights.untyped_storage().data_ptr())
        return real_grouped_matmul(x, weights, group_ends)

    monkeypatch.setattr(moe_module, "grouped_matmul", recording)
    monkeypatch.setattr(moe_module.MoEFeedForward, "_experts_tiered_loop",
                        lambda *a: pytest.fail("fp32 tiered experts fell back to the per-expert loop"))
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len + 1), generator=torch.Generator().manual_seed(5))
    source.begin_step()
    out_local, out_tiered = local(tokens[:, :-1], tokens[:, 1:]), tiered(tokens[:, :-1], tokens[:, 1:])
    out_local.loss.backward()
    out_tiered.loss.backward()
    torch.testing.assert_close(out_tiered.logits, out_local.logits, atol=1e-5, rtol=1e-5)
    assert_same_gradients(local, tiered, source)
    slab_storage = slab.tensor.untyped_storage().data_ptr()
    assert weight_storages.count(slab_storage) == len(weight_storages) // 2  # tiered calls: every one on the slab
    source.end_step()


def test_plot_draws_the_store_hit_rate_per_interval(tmp_path: Path):
    """A tiered run's plot gets the store panels; the hit rates plotted are the per-interval ones, computed
    from the cumulative counters of the store_stats events."""
    import json

    from aios_ray.tracking.plots import plot_run, store_series
    from aios_ray.train.run import run_training
    from tests.helpers import debug_config

    plan, _ = run_training(debug_config(tmp_path, experts="tiered", capacity_gpu=8, capacity_dram=4,
                                        stats_interval=2))
    events = [json.loads(line) for line in Path(plan.log_file).read_text().splitlines()]
    stats = [e for e in events if e["event"] == "store_stats"]
    hot = [next(t for t in e["tiers"] if t["tier"] == "hot") for e in stats]
    series = store_series(events)
    assert series["hot"]["step"] == [e["step"] for e in stats] == [2, 4, 6]
    second = (hot[1]["hits"] - hot[0]["hits"]) / (hot[1]["hits"] + hot[1]["misses"] - hot[0]["hits"] - hot[0]["misses"])
    assert series["hot"]["hit_rate"][1] == pytest.approx(second)
    assert series["hot"]["hit_rate"][0] == pytest.approx(hot[0]["hits"] / (hot[0]["hits"] + hot[0]["misses"]))
    out = plot_run(Path(plan.log_file), tmp_path / "run.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backend_hit_rate_is_the_demand_hit_rate_with_the_loops_own_predictor(tmp_path: Path):
    """Through the backend a training loop calls (usage-history prefetch after each step, a hot tier smaller than
    the experts), the store's hits and misses are exactly the demand accesses: counted here independently by
    looking, when a MoE layer first asks for an expert in a step, whether it was resident."""
    from aios_ray.config import StoreConfig
    from aios_ray.store.backend import TieredBackend, open_backend
    from aios_ray.store.control import LocalStore

    torch.manual_seed(0)
    model = HRMACTv1(CFG).train()
    config = StoreConfig(experts="tiered", path=str(tmp_path / "store"), name="demand", device="cpu",
                         capacity_gpu=6, capacity_dram=16)
    stores: list[LocalStore] = []
    backend = open_backend(model, config, lambda c, layout: stores.append(LocalStore(c, layout)) or stores[-1],
                           weight_decay=0.0, keep_checkpoints=1)
    assert isinstance(backend, TieredBackend)
    hot, client = stores[0].hot, backend.experts
    truth = {"hits": 0, "misses": 0}
    weights = client.weights

    def counting_weights(layer, experts):  # what the MoE layers ask for: the demand
        new = {ExpertKey(layer, e) for e in experts} - set(client.slots) - set(client.streamed)
        resident = hot.resident()
        truth["hits"] += sum(k in resident for k in new)
        truth["misses"] += sum(k not in resident for k in new)
        return weights(layer, experts)

    client.weights = counting_weights
    before = hot.stats()
    for step in range(1, 7):
        g = torch.Generator().manual_seed(step % 2)  # two alternating batches: the history predicts well
        tokens = torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len + 1), generator=g)
        backend.begin_step()
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        backend.after_backward()
        backend.step(1e-3)
        backend.end_step(step)
    after = hot.stats()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (truth["hits"], truth["misses"])
    assert truth["misses"] > 0 and truth["hits"] > 0
    assert after["prefetch_issued"] > 0  # the predictor ran; its loads are not counted as accesses
    assert after["prefetch_used"] + after["prefetch_wasted"] <= after["prefetch_issued"]
    stores[0].close()
