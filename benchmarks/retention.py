"""Retention of sequential MinAtar training: the MoE agent with per-game expert groups against ``--dense``.

What is measured, and why: issue 8 asks whether routing each game to its own group of experts makes the agent
forget less than a dense network of equal active parameters when games are trained one after another. For each
seed (``--seeds``, default 0,1) this runs, in this one process, the same sequence of MinAtar games (``--games``,
default Breakout,SpaceInvaders,Freeway; ``--steps-per-game`` env steps each, one pass) twice with
``aios_ray.rl.sequential.run_sequential``:

* ``moe``: the default ``RLConfig`` agent (8 experts top-2, 2 shared, one group per game, ``routing=groups``,
  a policy and value head per game, ``shared_training=auto``: the encoder, shared experts and routers train
  in the first phase only), its experts ``--moe-experts`` (``tiered``: the GPU/DRAM/NVMe store's Ray actors,
  as the issue asks; ``local``: in the training process);
* ``dense``: the same ``RLConfig`` with ``dense=True`` (a SwiGLU FFN with the MoE's active parameters per
  step, the same per-game heads, every parameter trained in every phase), experts local (a dense agent has
  none to store).

Everything else (seed, steps, PPO settings, evaluation episodes) is identical. Each run writes its own run
directory ``<--out>/retention-<variant>-s<seed>`` (default under a fresh temporary directory).

Metrics (``aios_ray.rl.metrics.continual_metrics``, CORA isolated forgetting after Powers et al. 2021): each
run's retention matrix ``R[p, j]`` (return on game j after phase p, detector-routed) is normalised as
``(R - random) / (best - random)``. Here ``best`` is shared by the two variants of one seed: the best return on
the game in either run (every phase), so that 1 means the same score in both runs and their forgetting values
are on one scale. (Each run's own-scale figures, as ``aios-ray rl compare`` gives them, are printed too.)
A game whose shared best is not above its random score has no scale and drops out (NaN).

Per seed and variant: mean forgetting (over the (game, later phase) pairs; lower is better) and mean final
normalised return (after the last phase). Across seeds, the means of those, and

    forgetting_ratio   = mean forgetting (moe) / mean forgetting (dense)        (issue's aim: <= 0.5)
    final_return_ratio = mean final normalised return (moe) / (dense)

A ratio whose denominator is <= 0 or NaN is printed as inf/nan with a note (a dense run that forgot nothing,
or did worse than random at the end, has no meaningful ratio).

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/retention.py [--seeds 0,1] [--steps-per-game 20000] \\
        [--moe-experts tiered|local] [--eval-episodes 5] [--threads 1] [--jobs 2]

``--threads 1`` on a shared 2-core machine: under contention torch with 2 intra-op threads slows down far more
than the emulator (see the RL throughput section of RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from aios_ray.config import StoreConfig  # noqa: E402
from aios_ray.rl.config import RLConfig  # noqa: E402
from aios_ray.rl.metrics import continual_metrics  # noqa: E402

VARIANTS = ("moe", "dense")


def run_one(variant: str, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    run_dir = out / f"retention-{variant}-s{seed}"
    cfg = RLConfig(suite="minatar", games=args.games, steps_per_game=args.steps_per_game, dense=variant == "dense",
                   eval_episodes=args.eval_episodes, seed=seed, run_dir=str(run_dir),
                   run_name=f"retention-{variant}-s{seed}",
                   shared_training=args.moe_shared_training if variant == "moe" else "auto")
    experts = args.moe_experts if variant == "moe" else "local"
    from aios_ray.rl.sequential import run_sequential

    t0 = time.perf_counter()
    result = run_sequential(cfg, StoreConfig(experts=experts))
    wall = time.perf_counter() - t0
    games = result["games"]
    return {"variant": variant, "seed": seed, "experts": experts, "wall_s": wall, "run_dir": str(run_dir),
            "games": games, "matrix": np.asarray(result["retention"], dtype=float),
            "random": np.asarray([result["random_scores"][g] for g in games], dtype=float)}


def run_all(seeds: list[int], args: argparse.Namespace, out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every (variant, seed) run, ``--jobs`` at a time (each in its own process with its own local Ray)."""
    jobs = [(v, seed) for seed in seeds for v in VARIANTS]
    if args.jobs <= 1:
        return {(v, seed): run_one(v, seed, args, out) for v, seed in jobs}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=set_threads, initargs=(args.threads,)) as pool:
        futures = {job: pool.submit(run_one, *job, args, out) for job in jobs}
        return {job: future.result() for job, future in futures.items()}


def set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def metrics_on_scale(run: dict[str, Any], best: np.ndarray | None) -> dict[str, Any]:
    """CORA metrics of one run; with ``best`` given, normalised by that best instead of the run's own.

    ``continual_metrics`` scales by the column maximum of the matrix it is given, so the shared best is passed
    as one extra row marked as a second visit of the first game: the first-pass pairs (forgetting, transfer)
    ignore it, and the final return is read off the last real row."""
    matrix, games = run["matrix"], run["games"]
    phases = matrix.shape[0]
    if best is None:
        m = continual_metrics(matrix, run["random"], games=games)
        return {"forgetting": m.mean_forgetting, "final": m.mean_final, "normalised": m.normalised,
                "per_game_forgetting": m.forgetting, "per_game_final": m.final}
    if phases != len(games):
        raise ValueError("shared-scale metrics need one pass over the games (cycles=1)")
    m = continual_metrics(np.vstack([matrix, best]), run["random"], games=games, trained=[*range(phases), 0])
    normalised = m.normalised[:phases]
    final = normalised[-1]
    finite = final[np.isfinite(final)]
    return {"forgetting": m.mean_forgetting, "final": float(finite.mean()) if finite.size else float("nan"),
            "normalised": normalised, "per_game_forgetting": m.forgetting, "per_game_final": final}


def fmt(x: float) -> str:
    return "--" if not math.isfinite(x) else f"{x:.3f}"


def ratio(name: str, num: float, den: float) -> tuple[float, str | None]:
    if not math.isfinite(num) or not math.isfinite(den):
        return float("nan"), f"{name}: a mean is NaN (no game with a scale, or no defined pair)"
    if den <= 0:
        value = float("inf") if num > 0 else float("nan")
        return value, (f"{name}: the dense denominator is {den:.3f} <= 0 (dense "
                       f"{'forgot nothing on average' if 'forgetting' in name else 'ended at or below random'}); "
                       "the ratio is not meaningful, compare the two means directly")
    return num / den, None


def print_matrix(run: dict[str, Any], shared: dict[str, Any]) -> None:
    games = run["games"]
    print(f"  {run['variant']} (experts {run['experts']}, {run['wall_s']:.0f} s, {run['run_dir']})")
    print("    after phase      | " + " | ".join(f"{g:>13}" for g in games) + " || normalised (shared scale)")
    for p, row in enumerate(run["matrix"]):
        norm = shared["normalised"][p]
        print(f"    {p + 1}:{games[p]:<14} | " + " | ".join(f"{r:13.2f}" for r in row) + " || "
              + " ".join(f"{fmt(x):>7}" for x in norm))
    print("    random policy    | " + " | ".join(f"{r:13.2f}" for r in run["random"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--games", default="Breakout,SpaceInvaders,Freeway")
    parser.add_argument("--steps-per-game", type=int, default=20_000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--moe-experts", choices=("local", "tiered"), default="tiered")
    parser.add_argument("--out", default=None, help="parent of the run directories (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--moe-shared-training", choices=("auto", "always"), default="auto",
                        help="the MoE's --shared-training ('always': the ablation that trains the encoder, shared "
                             "experts and routers in every phase)")
    args = parser.parse_args()
    set_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="aios-retention-"))
    out.mkdir(parents=True, exist_ok=True)

    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load {os.getloadavg()[0]:.2f}")
    print(f"workload: minatar {args.games}, {args.steps_per_game} env steps per game, one pass, seeds {seeds}, "
          f"{args.eval_episodes} eval episodes (actions sampled from the policy), "
          f"torch threads {args.threads or 'default'}, {args.jobs} run(s) at a time; "
          f"moe experts {args.moe_experts} (shared training {args.moe_shared_training}), dense experts local; "
          f"run dirs under {out}")
    if args.moe_experts == "local":
        print("note: the MoE variant keeps its experts local (in the training process), not in the tiered store")
    started = time.perf_counter()
    figures: dict[str, dict[str, list[float]]] = {v: {"forgetting": [], "final": []} for v in VARIANTS}
    records = []
    finished = run_all(seeds, args, out)
    for seed in seeds:
        runs = {v: finished[(v, seed)] for v in VARIANTS}
        if not np.allclose(runs["moe"]["random"], runs["dense"]["random"]):
            print(f"note: seed {seed}: random scores differ between the runs; each run keeps its own")
        best = np.maximum(runs["moe"]["matrix"].max(axis=0), runs["dense"]["matrix"].max(axis=0))
        print(f"\nseed {seed}: shared best per game " + ", ".join(
            f"{g} {b:.2f}" for g, b in zip(runs["moe"]["games"], best, strict=True)))
        for v in VARIANTS:
            shared = metrics_on_scale(runs[v], best)
            own = metrics_on_scale(runs[v], None)
            print_matrix(runs[v], shared)
            print(f"    seed={seed} variant={v} forgetting={fmt(shared['forgetting'])} "
                  f"final_normalised_return={fmt(shared['final'])} (own scale: forgetting={fmt(own['forgetting'])} "
                  f"final={fmt(own['final'])}) wall_s={runs[v]['wall_s']:.0f}")
            print("      per game forgetting: " + ", ".join(
                f"{g} {fmt(x)}" for g, x in zip(runs[v]["games"], shared["per_game_forgetting"], strict=True))
                + " | final: " + ", ".join(
                f"{g} {fmt(x)}" for g, x in zip(runs[v]["games"], shared["per_game_final"], strict=True)))
            figures[v]["forgetting"].append(shared["forgetting"])
            figures[v]["final"].append(shared["final"])
            records.append({"seed": seed, "variant": v, "experts": runs[v]["experts"], "wall_s": runs[v]["wall_s"],
                            "matrix": runs[v]["matrix"].tolist(), "random": runs[v]["random"].tolist(),
                            "forgetting": shared["forgetting"], "final": shared["final"],
                            "own_forgetting": own["forgetting"], "own_final": own["final"]})

    print()
    means = {}
    for v in VARIANTS:
        f, r = np.asarray(figures[v]["forgetting"]), np.asarray(figures[v]["final"])
        means[v] = (float(np.nanmean(f)) if np.isfinite(f).any() else float("nan"),
                    float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"))
        print(f"mean_forgetting_{v}={fmt(means[v][0])} mean_final_return_{v}={fmt(means[v][1])} "
              f"(per seed: {', '.join(fmt(x) for x in f)} / {', '.join(fmt(x) for x in r)})")
    fr, note_f = ratio("forgetting_ratio", means["moe"][0], means["dense"][0])
    rr, note_r = ratio("final_return_ratio", means["moe"][1], means["dense"][1])
    print(f"forgetting_ratio={fr:.3f}  (moe over dense, lower is better; issue 8's aim <= 0.5)")
    print(f"final_return_ratio={rr:.3f}  (moe over dense, higher is better)")
    for note in (note_f, note_r):
        if note:
            print(f"note: {note}")
    print(f"wall_s={time.perf_counter() - started:.0f}")
    (out / "retention_summary.json").write_text(json.dumps({"args": vars(args), "runs": records,
                                                            "forgetting_ratio": fr, "final_return_ratio": rr}))


if __name__ == "__main__":
    main()
