"""Replay a sequential multi-game expert access trace through the real tiered-store actors.

What is measured, and why: the hot (GPU) tier's hit rate and demand-load stall time of the tiered expert store
(``NvmeStoreActor`` -> ``DramCacheActor`` -> ``GpuCacheActor``, the real Ray actors of ``actors/``) when an RL
trainer plays several games one after the other, without prefetch and with the game-aware prefetch. The two
variants run on two fresh stores in the same process, interleaved step by step (A B A B ...), so that machine
noise falls on both alike. The question is whether knowing the game (an environment detector) plus a per-game
usage history keeps the experts resident before they are needed: the issue's bars are a GPU hit rate ``>= 0.95``
with prefetch and a stall reduction ``>= 5x``. ``stall_ratio`` is the median, over the game blocks after the
first (the warm-up), of each block's stall without prefetch over its stall with prefetch.

Trace model (seeded, ``--seed``):

* ``--layers`` (6) layers of ``--experts`` (256) experts. Every game ``g`` has, per layer, its own group of
  8..16 experts (size drawn per game and layer), disjoint between games, plus ``--shared`` (2) experts per layer
  that every game may use: each game uses mostly its own experts. Within this allowed set, popularity is
  Zipf-like (weight ``1 / rank**--zipf``, s=1; own experts first, the shared ones last).
* The router is the game-aware restricted router of the model (``MoEFeedForward.restrict_to`` /
  ``HRMACTv1.restrict_experts``: logits outside the active group masked, balance within the group), so a token
  can only pick allowed experts. ``--p-outside`` > 0 models an unrestricted router instead: that share of
  tokens sends its second pick to a uniform expert outside the allowed set (RESULTS shows what that costs).
* ``--games`` (5) games visited in blocks of ``--steps-per-game`` (1000) steps, in order 0..G-1 (``--rounds`` > 1
  visits them again in the same order).
* Each step and layer, a top-2 router over ``--tokens`` (64) tokens: every token picks 2 distinct allowed experts
  by popularity (Gumbel top-k sampling without replacement). The step touches the union of the picks over all
  layers.

Store: the actors have one capacity for all layers, so the per-layer tiers of the spec (GPU 32, DRAM 128 per
layer) become ``capacity_gpu = 32 * layers`` slots and ``capacity_dram = 128 * layers`` records. Records are small
(``--hidden 32 --ffn 64``: 18,433 fp32 padded to 18,448 = 73,792 bytes with the optimizer state) so all
``layers * experts`` fit on disk quickly; the NVMe store is seeded with every expert (one ``write_many`` per layer,
not timed) under a temporary directory.

Per step the replay does what a training step does with the store: one ``lease`` of all the step's keys (all
layers) and, after an optional ``--compute-ms`` sleep standing in for the step's compute, one ``release``. Both
variants lease exactly the same keys, so the GPU cache's own counters (``stats()``) compare like for like:
``gpu_hit_rate = hits / (hits + misses)`` over distinct (layer, expert) accesses per step, and ``stall_seconds``
is the time ``HotTier`` spent on demand loads plus the time a lease waited for a prefetch of its key still in
flight (prefetch loads themselves are not stall).

Prefetch variant. Assumptions, stated in the output too:

* A game switch is announced ``--lead-steps`` (5) steps ahead. In the sequential schedule the switch is planned
  (each game has a step budget), and where it is not, the CNN environment detector of the RL part names the game
  of the batches the rollout workers collected for the coming training steps. The trace's game id of the
  future step stands in for that announcement.
* What to prefetch for a game: its per-game ``AccessHistory`` (``--history-window`` steps) of the experts each
  layer used, or on the first visit (empty history) the game's allowed set from the routing table.
* The announced game's experts go first to DRAM (``dram.prefetch``, from NVMe) ``2 * lead`` steps before the
  switch, then to the hot tier (``gpu.prefetch``, from DRAM) ``lead`` steps before it: the hot tier (192 slots)
  holds the current game's working set (~75 keys) and the next one's side by side. Besides, after every lease
  the history of the next step's game is prefetched for each layer whose predicted experts were not all leased
  in the last ``--history-window`` steps (a backstop; within a game block the history predicts what is resident
  already, so these calls come at switches). All calls are fire-and-forget; the hot tier only fills free or
  unpinned room.

Also reported: the client-side time spent in the lease calls (Ray round trips included, and any wait for the hot
tier's lock, which a concurrent prefetch holds while it loads), the stall split between the first
``--switch-steps`` steps after each game switch and the rest, DRAM hit rate (its lookups include the GPU tier's
prefetch loads), and the wall time of each replay.

Finding (benchmarks/RESULTS.md): with the restricted router, prefetch removes every game-switch miss and the
stall falls more than 5x. With an unrestricted router (``--p-outside 0.005``), stray picks outside the game's
experts, which no game- or history-based predictor can foresee, dominate the stall in both variants and the
ratio stays near 1.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/tier_trace.py [--steps-per-game 1000] [--games 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.tier_actors import StoreHandles, create_store
from aios_ray.config import StoreConfig
from aios_ray.store.policy import AccessHistory
from aios_ray.store.record import ExpertKey, ExpertLayout

NAMESPACE = "aios-ray-tier-trace"
HOLDER = "trainer"


@dataclass
class Trace:
    """The replayed accesses: per step its game and the distinct keys it touches (all layers)."""

    groups: list[list[np.ndarray]]  # game -> layer -> the experts its router may pick, most popular first
    games: np.ndarray  # game id of each step
    keys: list[list[ExpertKey]]  # step -> sorted distinct keys
    per_layer: list[list[list[int]]]  # step -> layer -> distinct expert ids
    outside_picks: int  # token picks routed outside the game's group (only with --p-outside > 0)


def build_trace(args: argparse.Namespace) -> Trace:
    rng = np.random.default_rng(args.seed)
    groups: list[list[np.ndarray]] = [[] for _ in range(args.games)]
    for _layer in range(args.layers):
        order = rng.permutation(args.experts)
        sizes = rng.integers(args.group_min, args.group_max + 1, size=args.games)
        if sizes.sum() + args.shared > args.experts:
            raise SystemExit(f"{args.games} games x up to {args.group_max} experts + {args.shared} shared do not "
                             f"fit in {args.experts}")
        shared, start = order[:args.shared], args.shared
        for g, size in enumerate(sizes):
            groups[g].append(np.concatenate([order[start:start + size], shared]))  # own experts, then shared
            start += size
    games = np.repeat(np.tile(np.arange(args.games), args.rounds), args.steps_per_game)
    keys: list[list[ExpertKey]] = []
    per_layer: list[list[list[int]]] = []
    outside = 0
    for g in games:
        layers: list[list[int]] = []
        for layer in range(args.layers):
            group = groups[g][layer]
            logw = -args.zipf * np.log(np.arange(1, len(group) + 1))
            scores = logw[None, :] + rng.gumbel(size=(args.tokens, len(group)))
            picks = group[np.argpartition(-scores, 1, axis=1)[:, :2]]  # top-2 without replacement
            out = rng.random(args.tokens) < args.p_outside
            if out.any():
                others = np.setdiff1d(np.arange(args.experts), group)
                picks[out, 1] = rng.choice(others, size=int(out.sum()))
                outside += int(out.sum())
            layers.append(sorted(int(e) for e in np.unique(picks)))
        per_layer.append(layers)
        keys.append([ExpertKey(layer, e) for layer, ids in enumerate(layers) for e in ids])
    return Trace(groups, games, keys, per_layer, outside)


@dataclass
class Phase:
    """GPU counters summed over one kind of step (first steps after a switch, or the rest)."""

    hits: int = 0
    misses: int = 0
    stall: float = 0.0

    def add(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        self.hits += after["hits"] - before["hits"]
        self.misses += after["misses"] - before["misses"]
        self.stall += after["stall_seconds"] - before["stall_seconds"]


@dataclass
class Result:
    variant: str
    lease_wait: float
    gpu: dict[str, Any]
    dram: dict[str, Any]
    nvme: dict[str, Any]
    prefetch_calls: int
    rtt: float  # median seconds of an empty actor call
    driver_prefetch: float  # seconds the driver spent predicting and issuing prefetches
    phases: dict[str, Phase]
    block_stalls: list[float]  # GPU stall seconds per game block

    @property
    def gpu_hit_rate(self) -> float:
        return self.gpu["hits"] / max(self.gpu["hits"] + self.gpu["misses"], 1)

    @property
    def dram_hit_rate(self) -> float:
        return self.dram["hits"] / max(self.dram["hits"] + self.dram["misses"], 1)


def seed_store(handles: StoreHandles, layers: int, experts: int) -> None:
    rng = np.random.default_rng(1234)
    numel = handles.layout.numel
    for layer in range(layers):
        items = [(ExpertKey(layer, e), rng.standard_normal(numel, dtype=np.float32), 0)
                 for e in range(experts)]
        ray.get(handles.nvme.write_many.remote(items))


def predict(trace: Trace, history: dict[int, AccessHistory], game: int, layer: int, top: int) -> list[int]:
    hist = history.get(game)
    if hist is not None and hist.steps():
        return hist.predict(layer, top=top)
    return [int(e) for e in trace.groups[game][layer][:top]]  # first visit: the routing table's group


def open_store(args: argparse.Namespace, root: Path, variant: str) -> StoreHandles:
    config = StoreConfig(experts="tiered", name=f"trace-{variant}-{os.getpid()}", path=str(root / variant),
                         device="cpu", capacity_gpu=args.gpu_per_layer * args.layers,
                         capacity_dram=args.dram_per_layer * args.layers, namespace=NAMESPACE)
    handles = create_store(config, ExpertLayout(args.hidden, args.ffn))
    seed_store(handles, args.layers, args.experts)
    return handles


class Replayer:
    """One variant's replay on its own store, a step at a time, so that ``main`` can interleave the two
    variants step by step (A B A B ...): machine noise then falls on both alike."""

    def __init__(self, trace: Trace, args: argparse.Namespace, handles: StoreHandles, prefetch: bool) -> None:
        self.trace, self.args, self.handles, self.prefetch = trace, args, handles, prefetch
        self.variant = "with_prefetch" if prefetch else "without_prefetch"
        self.gpu, self.dram = handles.gpu[0], handles.dram
        self.n = len(trace.keys)
        self.history: dict[int, AccessHistory] = {}
        self.pending: list[ray.ObjectRef] = []
        self.phases = {"switch": Phase(), "steady": Phase()}
        self.block_stalls: list[float] = []
        self.prefetch_calls = 0
        self.window: deque[int] = deque()  # the last steps, whose keys ``recent`` counts per layer
        self.recent: list[Counter[int]] = [Counter() for _ in range(args.layers)]
        self.driver_prefetch = self.lease_wait = 0.0
        self.rtt = self._empty_call_seconds()
        if prefetch:  # before the first step: the switches named already (the first step adds the next ones)
            for step in range(2 * args.lead_steps - 1):
                if self._switches_to(step):
                    self._prefetch_game(self.dram, step)
                if step < args.lead_steps - 1 and self._switches_to(step):
                    self._prefetch_game(self.gpu, step)
            self._issue_prefetch(0)
        self.mark = self.block_mark = ray.get(self.gpu.stats.remote())
        self.phase = "switch"

    def _empty_call_seconds(self) -> float:
        """Baseline: one actor round trip that moves nothing (release of a holder with no lease)."""
        times = []
        for _ in range(200):
            t = time.perf_counter()
            ray.get(self.gpu.release.remote("nobody"))
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def _switches_to(self, step: int) -> bool:
        return 0 <= step < self.n and (step == 0 or self.trace.games[step] != self.trace.games[step - 1])

    def _prefetch_game(self, tier: ray.actor.ActorHandle, step: int) -> None:
        """The game of ``step`` is announced: its experts go to ``tier`` (fire and forget)."""
        game = int(self.trace.games[step])
        for layer in range(self.args.layers):
            ids = predict(self.trace, self.history, game, layer, self.args.gpu_per_layer)
            self.pending.append(tier.prefetch.remote(layer, ids))
            self.prefetch_calls += tier is self.gpu

    def _issue_prefetch(self, step: int) -> None:
        """After the lease of ``step - 1``: the announced switches, then the history for ``step``."""
        lead = self.args.lead_steps
        if self._switches_to(step - 1 + 2 * lead):  # the DRAM tier first, from NVMe
            self._prefetch_game(self.dram, step - 1 + 2 * lead)
        if self._switches_to(step - 1 + lead):  # then the hot tier, from DRAM
            self._prefetch_game(self.gpu, step - 1 + lead)
        game = int(self.trace.games[step])
        for layer in range(self.args.layers):
            ids = predict(self.trace, self.history, game, layer, self.args.gpu_per_layer)
            if any(self.recent[layer][e] == 0 for e in ids):
                self.pending.append(self.gpu.prefetch.remote(layer, ids))
                self.prefetch_calls += 1
        if len(self.pending) > 64:  # surface errors, bound the backlog; never blocks on unfinished calls
            ready, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            ray.get(ready)

    def _count(self, step: int) -> None:
        """At a block start or the end of a block's switch window: credit the counters since the last mark."""
        in_block = step % self.args.steps_per_game
        if in_block not in (0, self.args.switch_steps) or step == 0:
            return
        now = ray.get(self.gpu.stats.remote())
        self.phases[self.phase].add(self.mark, now)
        self.mark, self.phase = now, "switch" if in_block == 0 else "steady"
        if in_block == 0:
            self.block_stalls.append(now["stall_seconds"] - self.block_mark["stall_seconds"])
            self.block_mark = now

    def step(self, step: int) -> None:
        self._count(step)
        game = int(self.trace.games[step])
        t = time.perf_counter()
        ray.get(self.gpu.lease.remote(self.trace.keys[step], HOLDER))
        self.lease_wait += time.perf_counter() - t
        hist = self.history.setdefault(game, AccessHistory(self.args.history_window))
        for layer, ids in enumerate(self.trace.per_layer[step]):
            hist.record(step, layer, ids)
        if self.prefetch and step + 1 < self.n:
            t = time.perf_counter()
            self.window.append(step)
            for layer, ids in enumerate(self.trace.per_layer[step]):
                self.recent[layer].update(ids)
            if len(self.window) > self.args.history_window:
                for layer, ids in enumerate(self.trace.per_layer[self.window.popleft()]):
                    self.recent[layer].subtract(ids)
            self._issue_prefetch(step + 1)
            self.driver_prefetch += time.perf_counter() - t
        if self.args.compute_ms:
            time.sleep(self.args.compute_ms / 1000)
        ray.get(self.gpu.release.remote(HOLDER))

    def finish(self) -> Result:
        ray.get(self.pending)
        gpu_stats, dram_stats, nvme_stats = self.handles.stats()
        self.phases[self.phase].add(self.mark, gpu_stats)
        self.block_stalls.append(gpu_stats["stall_seconds"] - self.block_mark["stall_seconds"])
        return Result(self.variant, self.lease_wait, gpu_stats, dram_stats, nvme_stats, self.prefetch_calls,
                      self.rtt, self.driver_prefetch, self.phases, self.block_stalls)


def replay_interleaved(trace: Trace, args: argparse.Namespace, root: Path) -> tuple[Result, Result, float]:
    """Both variants on fresh stores, step t of one then step t of the other; returns them and the wall time."""
    stores = [open_store(args, root, variant) for variant in ("without_prefetch", "with_prefetch")]
    try:
        variants = [Replayer(trace, args, stores[0], prefetch=False), Replayer(trace, args, stores[1], prefetch=True)]
        n = len(trace.keys)
        started = last_report = time.perf_counter()
        for step in range(n):
            for variant in variants:
                variant.step(step)
            now = time.perf_counter()
            if now - last_report >= args.progress_seconds:
                rate = (step + 1) / (now - started)
                print(f"  step {step + 1}/{n} (both variants)  {rate:.0f} steps/s  ETA {(n - step - 1) / rate:.0f}s",
                      flush=True)
                last_report = now
        wall = time.perf_counter() - started
        off, on = (variant.finish() for variant in variants)
        return off, on, wall
    finally:
        for handles in stores:
            handles.shutdown()


def _stall_note(gpu: dict[str, Any]) -> str:
    if gpu["misses"]:
        return f"{1e3 * gpu['stall_seconds'] / gpu['misses']:.2f} ms per miss, waits for prefetches in flight included"
    return "no misses: all of it is leases waiting for prefetches in flight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps-per-game", type=int, default=1000)
    parser.add_argument("--games", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="times the game sequence is played")
    parser.add_argument("--gpu-per-layer", type=int, default=32)
    parser.add_argument("--dram-per-layer", type=int, default=128)
    parser.add_argument("--group-min", type=int, default=8)
    parser.add_argument("--group-max", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32, help="record layout: hidden size")
    parser.add_argument("--ffn", type=int, default=64, help="record layout: ffn size")
    parser.add_argument("--tokens", type=int, default=64, help="tokens routed per step and layer (top-2)")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent within a game's group")
    parser.add_argument("--p-outside", type=float, default=0.0,
                        help="share of tokens whose second expert is a uniform pick outside the game's group: 0 is "
                             "the restricted game-aware router (MoEFeedForward.restrict_to); > 0 models an "
                             "unrestricted router's stray picks")
    parser.add_argument("--shared", type=int, default=2,
                        help="experts per layer that every game's router may pick besides its own group")
    parser.add_argument("--lead-steps", type=int, default=5,
                        help="steps before a game switch that the detector (or the schedule) names the next game: "
                             "its experts go to the hot tier then, and to DRAM twice as early")
    parser.add_argument("--history-window", type=int, default=8)
    parser.add_argument("--switch-steps", type=int, default=10, help="steps after a switch counted as 'switch'")
    parser.add_argument("--compute-ms", type=float, default=0.0, help="sleep between lease and release")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress-seconds", type=float, default=15.0)
    args = parser.parse_args()
    if args.lead_steps < 1:
        parser.error("--lead-steps must be >= 1 (1: the switch is known one step ahead)")

    layout = ExpertLayout(args.hidden, args.ffn)
    trace = build_trace(args)
    n = len(trace.keys)
    union = np.array([len(k) for k in trace.keys])
    sizes = [[len(x) for x in g] for g in trace.groups]
    print(f"machine: {platform.machine()} {platform.processor() or ''} nproc={os.cpu_count()}, "
          f"ray {ray.__version__}, python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
    print(f"trace: {args.games} games x {args.steps_per_game} steps x {args.rounds} round(s) = {n} steps, "
          f"{args.layers} layers x {args.experts} experts, seed {args.seed}")
    print(f"  allowed experts per game and layer (own group, disjoint between games, + shared): {sizes}")
    print(f"  router: {args.tokens} tokens x top-2 per layer and step among the game's experts + {args.shared} "
          f"shared, Zipf s={args.zipf}; " + (f"unrestricted: {args.p_outside * 100:g}% of tokens send their 2nd "
          f"pick outside ({trace.outside_picks} picks in all)" if args.p_outside else "restricted to the game's "
          "allowed experts"))
    print(f"store: capacity_gpu={args.gpu_per_layer}x{args.layers}={args.gpu_per_layer * args.layers} slots, "
          f"capacity_dram={args.dram_per_layer}x{args.layers}={args.dram_per_layer * args.layers} records "
          f"(one capacity shared by all layers), record {layout.nbytes:,} bytes "
          f"(hidden={args.hidden}, ffn={args.ffn}, fp32 weights + Adam state)")
    print("per step: 1 lease (all layers' keys) + " + (f"{args.compute_ms} ms sleep + " if args.compute_ms else "")
          + f"1 release; prefetch variant: after the lease, prefetch what the detector announced "
          f"({args.lead_steps} steps ahead for the hot tier, {2 * args.lead_steps} for DRAM) and the history's "
          "prediction for the next step")
    print(f"assumptions: a game switch is announced {args.lead_steps} steps ahead (the schedule, or the CNN "
          "environment detector on the batches collected for the coming steps); first visit to a game predicts its "
          "allowed experts from the game-aware routing table, later visits use a per-game "
          f"AccessHistory(window={args.history_window})")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="tier-trace-"))
    try:
        print("replay: both variants interleaved step by step on fresh stores ...", flush=True)
        off, on, wall = replay_interleaved(trace, args, root)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    report(off, on, wall, union, args)


def _ratio(without: float, with_: float) -> float:
    return without / with_ if with_ else float("inf") if without else float("nan")


def report(off: Result, on: Result, wall: float, union: np.ndarray, args: argparse.Namespace) -> None:
    n = len(union)
    print(f"per_step_union_mean={union.mean():.2f}  (min {union.min()}, max {union.max()}; distinct keys a step "
          "leases = GPU lookups per step)")
    print(f"wall {wall:.1f} s for both variants ({n / wall:.0f} steps/s each)")
    for r in (off, on):
        g, d = r.gpu, r.dram
        print(f"--- {r.variant}: client lease wait {r.lease_wait:.2f} s, {r.prefetch_calls} gpu.prefetch calls "
              f"(driver time predicting and issuing them {r.driver_prefetch:.2f} s)")
        print(f"  gpu: demand hits={g['hits']} misses={g['misses']} prefetch issued={g['prefetch_issued']} "
              f"used={g['prefetch_used']} wasted={g['prefetch_wasted']} streamed={g['streamed']} "
              f"evictions={g['evictions']} "
              f"stall_seconds={g['stall_seconds']:.4f} ({_stall_note(g)}; empty actor call {1e3 * r.rtt:.2f} ms "
              "median)")
        for phase_name, p in r.phases.items():
            print(f"  gpu {phase_name:>6} steps: hits={p.hits} misses={p.misses} stall_seconds={p.stall:.4f}")
        print(f"  dram: hits={d['hits']} misses={d['misses']} hit_rate={r.dram_hit_rate:.4f} "
              f"prefetch_issued={d['prefetch_issued']} stall_seconds={d['stall_seconds']:.4f}; "
              f"nvme reads={r.nvme['reads']:.0f}")
    block_ratios = [_ratio(a, b) for a, b in zip(off.block_stalls, on.block_stalls, strict=True)]
    for i, (a, b, q) in enumerate(zip(off.block_stalls, on.block_stalls, block_ratios, strict=True)):
        print(f"  block {i + 1} (game {i % args.games}){' (warm-up)' if i == 0 else ''}: stall {a:.4f} s "
              f"without, {b:.4f} s with prefetch, ratio {q:.2f}")
    print(f"gpu_hit_rate_without_prefetch={off.gpu_hit_rate:.4f}")
    verdict = "pass" if on.gpu_hit_rate >= 0.95 else "FAIL"
    print(f"gpu_hit_rate_with_prefetch={on.gpu_hit_rate:.4f}  (demand hit rate: the experts each step needed that "
          f"were resident when leased; prefetch loads are not accesses; bar >= 0.95: {verdict})")
    print(f"stall_seconds_without_prefetch={off.gpu['stall_seconds']:.4f}")
    print(f"stall_seconds_with_prefetch={on.gpu['stall_seconds']:.4f}")
    ratio = float(np.median(block_ratios[1:])) if len(block_ratios) > 1 else block_ratios[0]
    print(f"stall_ratio={ratio:.2f}  (median over the game blocks after the first, interleaved pairs; "
          f"bar >= 5: {'pass' if ratio >= 5 else 'FAIL'})")
    print(f"stall_ratio_total={_ratio(off.gpu['stall_seconds'], on.gpu['stall_seconds']):.2f}  (all blocks)")
    sw_off, sw_on = off.phases["switch"].stall, on.phases["switch"].stall
    print(f"switch_stall_ratio={_ratio(sw_off, sw_on):.2f}  (first {args.switch_steps} steps after each switch: "
          f"{sw_off:.4f} s vs {sw_on:.4f} s)")
    print(f"prefetch_with_prefetch: issued={on.gpu['prefetch_issued']} used={on.gpu['prefetch_used']} "
          f"wasted={on.gpu['prefetch_wasted']}")
    print(f"dram_hit_rate_without_prefetch={off.dram_hit_rate:.4f}")
    print(f"dram_hit_rate_with_prefetch={on.dram_hit_rate:.4f}")
    print(f"lease_wait_seconds_without_prefetch={off.lease_wait:.2f}")
    print(f"lease_wait_seconds_with_prefetch={on.lease_wait:.2f}")


if __name__ == "__main__":
    main()
