"""Data-parallel scaling on Ray Train: tokens/s of 2 workers over 1 worker, one CPU thread each, for DDP and for
--parallel-independent training.

In one process, on the shipped sample corpus and the ``small`` preset (``--config``), each round runs, in
turn, a 1-worker run, a 2-worker DDP run and a 2-worker ``--parallel-independent`` run of ``--steps`` optimizer
steps through ``aios_ray.train.run.run_training`` (Ray Train, gloo, one CPU and so one torch thread per worker, as
Ray sets ``OMP_NUM_THREADS``). Each run's speed is the median ``tokens_per_sec`` of its train lines after
``--skip`` warm-up steps (tokens of every worker per second of step). Per round: ``ratio = tokens/s (2 workers) /
tokens/s (1 worker)`` for each mode; printed is the median over rounds:

    ddp_scaling = median over rounds of the DDP ratio                              (issue 10's bar: >= 1.6)
    parallel_independent_scaling = the same for --parallel-independent             (bar: >= 1.6)

The 1-worker run is the same for both modes (one worker exchanges no gradients). The independent run's merge
(after training, on the driver) is not part of its tokens/s.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/ddp_scaling.py [--rounds 3] [--steps 12] \
        [--modes ddp,independent]
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


def run(args: argparse.Namespace, out: Path, workers: int, round_index: int, mode: str = "ddp") -> float:
    from aios_ray.train.run import run_training

    name = f"{mode}-w{workers}-r{round_index}"
    argv = ["train", "--config", args.config, "--steps", str(args.steps), "--num-workers", str(workers),
            "--bundle-dir", str(out), "--brain-name", name, "--eval-interval", str(args.steps * 10),
            "--eval-batches", "0", "--checkpoint-interval", str(args.steps * 10), "--seed", "0",
            "--parallel-independent" if mode == "independent" else "--ddp"]
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
    parser.add_argument("--modes", default="ddp,independent", help="2-worker modes measured each round")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"ddp", "independent"}:
        parser.error(f"--modes {args.modes!r}: expected ddp and/or independent, comma-separated")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="aios-ddp-scaling-"))
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load {os.getloadavg()[0]:.2f}")
    print(f"workload: preset {args.config}, sample corpus, {args.steps} steps per run (median tokens/s after step "
          f"{args.skip}), {args.rounds} rounds of 1 worker then 2 workers ({', '.join(modes)}); out {out}")
    ratios: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(args.rounds):
        one = run(args, out, 1, r)
        line = f"round {r + 1}/{args.rounds}: 1 worker {one:,.0f} tok/s"
        for mode in modes:
            two = run(args, out, 2, r, mode)
            ratios[mode].append(two / one)
            line += f", 2 workers {mode} {two:,.0f} tok/s (ratio {two / one:.3f})"
        print(f"{line}; load {os.getloadavg()[0]:.2f}", flush=True)
    names = {"ddp": ("ddp_scaling", "2 DDP workers over 1"),
             "independent": ("parallel_independent_scaling", "2 parallel-independent workers over 1")}
    for mode, values in ratios.items():
        name, what = names[mode]
        print(f"{name}={statistics.median(values):.3f}  ({what}; per round "
              f"{', '.join(f'{x:.3f}' for x in values)}; bar >= 1.6)")


if __name__ == "__main__":
    main()
