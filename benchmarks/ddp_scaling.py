"""Data-parallel scaling on Ray Train: tokens/s of 2 DDP workers over 1 worker, one CPU thread each.

In one process, on the shipped sample corpus and the ``small`` preset (``--config``), rounds alternate a
1-worker and a 2-worker run of ``--steps`` optimizer steps through ``aios_ray.train.run.run_training`` (Ray
Train, gloo, one CPU and so one torch thread per worker, as Ray sets ``OMP_NUM_THREADS``). Each run's speed is
the median ``tokens_per_sec`` of its train lines after ``--skip`` warm-up steps (tokens of every worker per
second of step). Per round: ``ratio = tokens/s (2 workers) / tokens/s (1 worker)``; printed is the median:

    ddp_scaling = median over rounds of that ratio          (issue 10's bar: >= 1.6)

Parallel-independent training is not built yet; its ratio will be measured the same way.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/ddp_scaling.py [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from aios_ray.cli import build_parser, config_from_args  # noqa: E402
from aios_ray.tracking.jsonl import read_metrics  # noqa: E402


def run(args: argparse.Namespace, out: Path, workers: int, round_index: int) -> float:
    from aios_ray.train.run import run_training

    name = f"w{workers}-r{round_index}"
    argv = ["train", "--config", args.config, "--steps", str(args.steps), "--num-workers", str(workers),
            "--bundle-dir", str(out), "--brain-name", name, "--eval-interval", str(args.steps * 10),
            "--eval-batches", "0", "--checkpoint-interval", str(args.steps * 10), "--seed", "0"]
    plan, _ = run_training(config_from_args(build_parser().parse_args(argv)))
    speeds = [e["tokens_per_sec"] for e in read_metrics(Path(plan.log_file))
              if e.get("event") == "train" and e["step"] > args.skip]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of each run's median")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="aios-ddp-scaling-"))
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load {os.getloadavg()[0]:.2f}")
    print(f"workload: preset {args.config}, sample corpus, {args.steps} steps per run (median tokens/s after step "
          f"{args.skip}), {args.rounds} rounds of 1 then 2 workers; out {out}")
    ratios = []
    for r in range(args.rounds):
        one = run(args, out, 1, r)
        two = run(args, out, 2, r)
        ratios.append(two / one)
        print(f"round {r + 1}/{args.rounds}: 1 worker {one:,.0f} tok/s, 2 workers {two:,.0f} tok/s, "
              f"ratio {two / one:.3f}; load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"ddp_scaling={statistics.median(ratios):.3f}  (2 DDP workers over 1; per round "
          f"{', '.join(f'{x:.3f}' for x in ratios)}; bar >= 1.6)")


if __name__ == "__main__":
    main()
