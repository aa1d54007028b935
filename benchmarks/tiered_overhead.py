"""Training steps/s with ``--experts tiered`` (every expert resident in the hot tier) over ``--experts local``.

What is measured, and why: the price the tiered expert store charges a training step when it has nothing to
load, i.e. its steady state with ``capacity_gpu`` = every expert. Two ``Trainer``s are built in this process on
two plans of the same preset (distinct bundle directories under a temporary directory; same seed, same
tokenizer, same token arrays, so identically seeded samplers hand both the same batches in the same order):

* ``local``: ``LocalContext()``, experts are ``nn.Parameter``s of the model, MoE layers take the grouped
  fast path (``MoEFeedForward._experts_fast``), AdamW in ``torch.optim``;
* ``tiered``: a context whose ``open_expert_store`` is ``RayTrainContext.open_expert_store`` (the real
  ``NvmeStoreActor`` / ``DramCacheActor`` / ``GpuCacheActor`` of ``actors/tier_actors.py`` under
  ``ray.init(address="local", num_cpus=2)``); this process plays the Ray Train worker: it maps the hot slab,
  acquires the experts each MoE call needs, computes on the slots (``MoEFeedForward._experts_tiered``: the
  same grouped matmuls as ``local``, reading the weights in place through strided views of the slab), runs
  AdamW in the slots and marks them dirty, releases.

``Trainer.train_step()`` calls alternate local, tiered, local, tiered, ... (the machine's timings swing 2x
between processes; only same-process interleaved ratios count). The first ``--warmup`` pairs bring every expert
into the hot tier and are not counted; then ``--pairs`` pairs are timed. ``tiered_vs_local`` = median over pairs
of (local step time / tiered step time): 1.0 = no overhead, bar >= 0.95. Each trainer keeps its own torch RNG
stream (both start from the seed), so ACT exploration draws the same numbers in both.

Then one more step of each is run under ``torch.profiler`` and split into: expert FFN forward (the MoE expert
function, minus any actor call inside it) and backward (autograd nodes whose forward ran inside it, linked by
sequence number), the store's actor calls (acquire / release / mark_dirty round trips and the fire-and-forget
prefetch submissions: count and ms), the optimizer (``torch.optim`` step + AdamW in the slots, minus
``mark_dirty``) and the rest. Profiled times carry the profiler's per-op overhead, which weighs more on the
eager per-expert path (more ops): read them as shares, the unprofiled medians as the figures.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/tiered_overhead.py [--config small] [--pairs 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402
from torch.autograd.profiler_util import FunctionEvent  # noqa: E402

from aios_ray.config import Config, load_yaml_config, merge  # noqa: E402
from aios_ray.model.moe import MoEFeedForward  # noqa: E402
from aios_ray.store.backend import TieredBackend  # noqa: E402
from aios_ray.store.export import count_experts  # noqa: E402
from aios_ray.store.record import ExpertLayout  # noqa: E402
from aios_ray.store.tiered_experts import _alias, _slot_weight_views  # noqa: E402
from aios_ray.train.context import LocalContext  # noqa: E402
from aios_ray.train.loop import Trainer  # noqa: E402
from aios_ray.train.plan import RunPlan  # noqa: E402
from aios_ray.train.prepare import prepare_run  # noqa: E402
from aios_ray.train.ray_train import RayTrainContext  # noqa: E402

EXPERT_RANGE = "bench::expert_ffn"
ACTOR_PREFIX = "bench::actor."
OPTIM_SLOTS = "bench::optimizer_slots"


class RayStoreContext(LocalContext):
    """This process as the (single) Ray Train worker: CPU, no DDP, but the expert store is the real actors."""

    open_expert_store = RayTrainContext.open_expert_store


class CallTimer:
    """Counts and times (wall) the calls of some methods; labels them for the profiler too."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    def wrap(self, obj: Any, method: str, label: str) -> None:
        original: Callable[..., Any] = getattr(obj, method)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(ACTOR_PREFIX + label):
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.calls.setdefault(label, []).append(time.perf_counter() - started)

        setattr(obj, method, timed)

    def take(self) -> dict[str, list[float]]:
        calls, self.calls = self.calls, {}
        return calls


def build_plans(args: argparse.Namespace, tmp: Path) -> tuple[RunPlan, RunPlan, Any]:
    base = load_yaml_config(args.config)
    model: dict[str, Any] = {}
    if args.max_seq_len:
        model["max_seq_len"] = args.max_seq_len
    train: dict[str, Any] = {"bundle_dir": str(tmp / "local"), "brain_name": f"bench-overhead-{os.getpid()}"}
    if args.batch_size:
        train["batch_size"] = args.batch_size
    cfg = Config.from_dict(merge(base, {"model": model, "train": train, "cluster": {"use_ray": False}}))
    plan_local, data = prepare_run(cfg)  # the tokenizer is trained once: both variants get the same token arrays
    tiered_root = (tmp / "tiered" / cfg.train.brain_name).resolve()
    local_cfg = plan_local.config
    store = dataclasses.replace(local_cfg.store, experts="tiered", capacity_gpu=0, capacity_dram=0).resolved(
        tiered_root, cfg.train.brain_name, count_experts(local_cfg.model), use_gpu=False)
    tiered_cfg = dataclasses.replace(local_cfg, store=store, train=dataclasses.replace(
        local_cfg.train, bundle_dir=str(tmp / "tiered")))
    plan_tiered = RunPlan(config=tiered_cfg, bundle_root=str(tiered_root), log_file=str(tiered_root / "metrics.jsonl"),
                          stop_file=str(tiered_root / "STOP"), metadata={"name": cfg.train.brain_name},
                          run_id="bench-tiered")
    return plan_local, plan_tiered, data


class Variant:
    """One trainer with its own torch RNG stream (ACT exploration), stepped one optimizer step at a time."""

    def __init__(self, name: str, trainer: Trainer, seed: int) -> None:
        self.name, self.trainer = name, trainer
        self.rng = torch.Generator().manual_seed(seed).get_state()
        self.times: list[float] = []
        self.halt: list[float] = []
        self.losses: list[float] = []
        trainer.model.train()

    def step(self) -> float:
        torch.set_rng_state(self.rng)
        started = time.perf_counter()
        metrics = self.trainer.train_step()
        elapsed = time.perf_counter() - started
        self.rng = torch.get_rng_state()
        self.trainer.state.step += 1
        self.trainer.state.round_step += 1
        self.halt.append(metrics["mean_halt_steps"])
        self.losses.append(metrics["train_loss"])
        return elapsed


@contextmanager
def labelled_experts() -> Iterator[None]:
    """Wrap the two expert implementations (and the slot optimizer) in profiler ranges for one step."""
    from aios_ray.store.tiered_experts import TieredExperts

    saved = {name: getattr(MoEFeedForward, name) for name in ("_experts_tiered", "_experts_fast")}
    saved_opt = TieredExperts.apply_optimizer

    def labelled(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return inner

    try:
        for name, fn in saved.items():
            setattr(MoEFeedForward, name, labelled(fn, EXPERT_RANGE))
        TieredExperts.apply_optimizer = labelled(saved_opt, OPTIM_SLOTS)  # type: ignore[method-assign]
        yield
    finally:
        for name, fn in saved.items():
            setattr(MoEFeedForward, name, fn)
        TieredExperts.apply_optimizer = saved_opt  # type: ignore[method-assign]


def _descendants(event: FunctionEvent) -> Iterator[FunctionEvent]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _ms(events: list[FunctionEvent]) -> float:
    return sum(e.cpu_time_total for e in events) / 1e3


def breakdown(variant: Variant) -> dict[str, Any]:
    """Profile one step of ``variant``; split its time (see the module docstring)."""
    with labelled_experts(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        variant.step()
        wall_ms = (time.perf_counter() - started) * 1e3
    events: list[FunctionEvent] = list(prof.events())
    top = [e for e in events if e.cpu_parent is None]
    expert_ranges = [e for e in events if e.name == EXPERT_RANGE]
    actor = [e for e in events if e.name.startswith(ACTOR_PREFIX)]
    actor_in_experts = [e for r in expert_ranges for e in _descendants(r) if e.name.startswith(ACTOR_PREFIX)]
    forward_seq = {e.sequence_nr for r in expert_ranges for e in _descendants(r) if e.sequence_nr >= 0}
    backward = [e for e in top if e.name.startswith("autograd::engine::evaluate_function")
                and e.sequence_nr in forward_seq]
    # a backward node's sequence number is the forward op's; nodes outside expert ranges are other layers
    inside = [e for r in expert_ranges for e in _descendants(r)]
    grouped = [e for e in inside if e.name == "aten::_grouped_mm"]
    in_grouped = {id(d) for g in grouped for d in _descendants(g)}
    mm_ops = [e for e in inside if e.name == "aten::mm" and id(e) not in in_grouped]
    optim = [e for e in events if e.name.startswith("Optimizer.step#") or e.name == OPTIM_SLOTS]
    actor_in_optim = [e for r in optim for e in _descendants(r) if e.name.startswith(ACTOR_PREFIX)]
    parts = {
        "expert_fwd": _ms(expert_ranges) - _ms(actor_in_experts),
        "expert_bwd": _ms(backward),
        "actor_calls": _ms(actor),
        "optimizer": _ms(optim) - _ms(actor_in_optim),
    }
    parts["other"] = max(wall_ms - sum(parts.values()), 0.0)
    dispatched = sum(1 for e in events if e.name.startswith("aten::")
                     and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    counts: dict[str, int] = {}
    for e in actor:
        counts[e.name.removeprefix(ACTOR_PREFIX)] = counts.get(e.name.removeprefix(ACTOR_PREFIX), 0) + 1
    return {"wall_ms": wall_ms, "parts": parts, "actor_counts": counts, "expert_calls": len(expert_ranges),
            "expert_mm_ops": len(mm_ops), "expert_grouped_mm_ops": len(grouped), "expert_bwd_nodes": len(backward),
            "aten_ops": dispatched}


class SlabSource:
    """Experts as the tiered path sees them, without the store: expert e in row e of one (E, record numel)
    fp32 slab (rows are records: weights, moments, step, padded to 64 bytes), autograd leaves aliasing it."""

    def __init__(self, moe: MoEFeedForward, layout: ExpertLayout) -> None:
        self.slab = torch.zeros(moe.num_experts, layout.numel)
        self.leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e in range(moe.num_experts):
            views = layout.views(self.slab[e])
            views["w_gate_up"].copy_(moe.w_gate_up[e].detach())
            views["w_down"].copy_(moe.w_down[e].detach())
            self.leaves[e] = (_alias(views["w_gate_up"]).requires_grad_(True),
                              _alias(views["w_down"]).requires_grad_(True))
        self.views = _slot_weight_views(self.slab, layout)

    def weights(self, layer: int, experts: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {e: self.leaves[e] for e in experts}

    def slots_of(self, layer: int, experts: list[int]) -> list[int]:
        return list(experts)

    def slot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views


def layer_check(cfg: Config, rounds: int) -> None:
    """The expert computation alone at the preset's MoE shape and a training batch's token count, interleaved:
    local fast path, tiered path (grouped over the slab's slots) and the per-expert loop it replaced (still
    used under autocast); no-grad forward (most MoE calls of a step: the one-step gradient runs all but the
    last cycles without grad) and forward+backward."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    moe = MoEFeedForward(m.hidden_size, m.ffn_size, m.num_experts, m.num_experts_per_tok, m.moe_capacity_factor)
    source = SlabSource(moe, ExpertLayout(m.hidden_size, m.ffn_size))
    x = torch.randn(t.batch_size * m.max_seq_len, m.hidden_size)
    with torch.no_grad():
        routing = moe.route(x)
    tiered_moe = MoEFeedForward(m.hidden_size, m.ffn_size, m.num_experts, m.num_experts_per_tok,
                                m.moe_capacity_factor)
    tiered_moe.use_expert_source(source)
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fast": lambda inp: moe._experts_fast(inp, routing),
        "tiered": lambda inp: tiered_moe._experts_tiered(inp, routing),
        "loop": lambda inp: tiered_moe._experts_tiered_loop(
            inp, routing, routing.expert_index[routing.kept].unique().tolist(), source.leaves),
    }
    grads = torch.randn(x.shape)
    ref = impls["fast"](x).detach()
    for name in ("tiered", "loop"):
        print(f"layer check {name} vs fast: max |out diff| {float((impls[name](x).detach() - ref).abs().max()):.2e}")

    def run(name: str, backward: bool) -> float:
        inp = x.clone().requires_grad_(backward)
        started = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = impls[name](inp)
            if backward:
                out.backward(grads)
        elapsed = time.perf_counter() - started
        moe.zero_grad(set_to_none=True)
        for pair in source.leaves.values():
            for leaf in pair:
                leaf.grad = None
        return elapsed

    for backward in (False, True):
        times: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(rounds + 2):
            for name in impls:
                elapsed = run(name, backward)
                if r >= 2:
                    times[name].append(elapsed)
        med = {name: statistics.median(v) for name, v in times.items()}
        ratios = {name: statistics.median(f / o for f, o in zip(times["fast"], times[name], strict=True))
                  for name in ("tiered", "loop")}
        label = "fwd+bwd" if backward else "fwd no-grad"
        print(f"layer check {label} N={x.shape[0]}: fast {med['fast'] * 1e3:.1f} ms, "
              f"tiered {med['tiered'] * 1e3:.1f} ms (fast/tiered {ratios['tiered']:.3f}), "
              f"loop {med['loop'] * 1e3:.1f} ms (fast/loop {ratios['loop']:.3f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help="preset name or YAML path (default: small)")
    parser.add_argument("--batch-size", type=int, default=0, help="override train.batch_size (0: the preset's)")
    parser.add_argument("--max-seq-len", type=int, default=0, help="override model.max_seq_len (0: the preset's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first (>= 2)")
    parser.add_argument("--pairs", type=int, default=7, help="timed pairs (>= 5)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled breakdown")
    parser.add_argument("--layer-rounds", type=int, default=9, help="rounds of the MoE-layer check (0: skip it)")
    args = parser.parse_args()
    if args.warmup < 2 or args.pairs < 5:
        parser.error("need --warmup >= 2 and --pairs >= 5")

    print(f"machine: {platform.machine()} {platform.processor() or ''} nproc={os.cpu_count()} "
          f"torch threads={torch.get_num_threads()} torch {torch.__version__} ray {ray.__version__} "
          f"python {platform.python_version()} load average {os.getloadavg()[0]:.2f}", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp_dir = tempfile.TemporaryDirectory(prefix="tiered-overhead-")
    tiered: Trainer | None = None
    try:
        tmp = Path(tmp_dir.name)
        plan_local, plan_tiered, data = build_plans(args, tmp)
        m, t = plan_local.config.model, plan_local.config.train
        print(f"config: {args.config} max_seq_len={m.max_seq_len} hidden={m.hidden_size} ffn={m.ffn_size} "
              f"layers H{m.h_layers}+L{m.l_layers} cycles H{m.h_cycles}xL{m.l_cycles} halt_max={m.halt_max_steps} "
              f"experts={m.num_experts} top_k={m.num_experts_per_tok} batch={t.batch_size} "
              f"grad_accum={t.grad_accum} amp={t.amp} vocab={m.vocab_size} seed={t.seed}", flush=True)
        local = Variant("local", Trainer(plan_local, data, LocalContext()), t.seed)
        tiered = Trainer(plan_tiered, data, RayStoreContext())
        backend = tiered.experts
        assert isinstance(backend, TieredBackend)
        timer = CallTimer()
        store = backend.store
        for method in ("acquire", "write_back", "release", "mark_dirty"):
            timer.wrap(backend.experts.client, method, method)
        timer.wrap(store, "prefetch", "prefetch_submit")
        tier = Variant("tiered", tiered, t.seed)
        n_experts = len(backend.keys)
        print(f"tiered store: {n_experts} experts ({len(tiered.model.moe_layers())} MoE layers x {m.num_experts}), "
              f"capacity_gpu={n_experts} capacity_dram={n_experts}, record {store.layout.nbytes / 2**20:.2f} MiB",
              flush=True)

        ratios: list[float] = []
        actor_ms: list[float] = []
        actor_counts: list[int] = []
        for i in range(args.warmup + args.pairs):
            t_local = local.step()
            timer.take()
            t_tiered = tier.step()
            calls = timer.take()
            warm = i < args.warmup
            if not warm:
                local.times.append(t_local)
                tier.times.append(t_tiered)
                ratios.append(t_local / t_tiered)
                actor_ms.append(sum(sum(v) for v in calls.values()) * 1e3)
                actor_counts.append(sum(len(v) for v in calls.values()))
            resident = len(ray.get(store.gpu[0].resident.remote()))
            print(f"pair {i + 1}/{args.warmup + args.pairs}{' (warm-up)' if warm else ''}: local {t_local:.2f} s, "
                  f"tiered {t_tiered:.2f} s, ratio {t_local / t_tiered:.3f}; loss {local.losses[-1]:.4f} / "
                  f"{tier.losses[-1]:.4f}; halt {local.halt[-1]:.2f} / {tier.halt[-1]:.2f}; "
                  f"resident {resident}/{n_experts}; actor calls {sum(len(v) for v in calls.values())} "
                  f"({sum(sum(v) for v in calls.values()) * 1e3:.1f} ms); load {os.getloadavg()[0]:.1f}", flush=True)

        print(f"time local:  median {statistics.median(local.times):.3f} s/step  min {min(local.times):.3f}  "
              f"({1 / statistics.median(local.times):.3f} steps/s)")
        print(f"time tiered: median {statistics.median(tier.times):.3f} s/step  min {min(tier.times):.3f}  "
              f"({1 / statistics.median(tier.times):.3f} steps/s)")
        print(f"actor calls per tiered step: median {statistics.median(actor_counts)} calls, "
              f"{statistics.median(actor_ms):.1f} ms (acquire/release/mark_dirty round trips + prefetch submits)")
        print(f"tiered_vs_local={statistics.median(ratios):.3f}")
        print(f"(per-pair ratios: {', '.join(f'{r:.3f}' for r in ratios)}; bar >= 0.95; "
              f"min local / min tiered = {min(local.times) / min(tier.times):.3f})", flush=True)

        if not args.no_profile:
            for variant in (local, tier):
                result = breakdown(variant)
                print(f"profile {variant.name}: wall {result['wall_ms']:.0f} ms (under the profiler); "
                      f"MoE expert calls {result['expert_calls']}; in their forward {result['expert_grouped_mm_ops']} "
                      f"grouped_mm + {result['expert_mm_ops']} per-expert mm ops; "
                      f"{result['expert_bwd_nodes']} expert backward nodes; {result['aten_ops']} aten ops "
                      f"dispatched in the step")
                for part, ms in result["parts"].items():
                    print(f"  {part:<12} {ms:8.1f} ms  {100 * ms / result['wall_ms']:5.1f}%")
                if result["actor_counts"]:
                    print(f"  actor calls: {result['actor_counts']}")
        if args.layer_rounds:
            layer_check(plan_local.config, args.layer_rounds)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        if tiered is not None and isinstance(tiered.experts, TieredBackend):
            slab = tiered.experts.experts.slab.path
            ray.shutdown()
            slab.unlink(missing_ok=True)
        else:
            ray.shutdown()
        tmp_dir.cleanup()


if __name__ == "__main__":
    main()
