"""What an autotune sweep buys: the best trial of a sweep against the base config trained with the same budget.

In one process, on the shipped sample corpus (train split; its eval split for the metric), with one step budget
(``--steps``) and one seed:

1. ``default``: the training defaults (or ``--config``'s preset) trained as ``aios-ray train`` trains them, in this
   process (``--no-ray``: the same training function a trial runs);
2. ``sweep``: ``aios-ray autotune`` over the default search space (``aios_ray.tune.space``), ``--trials``
   trials (TPE, median pruning), each trial the same preset with its values, as many at a time as the CPUs
   allow (``--resources-per-trial cpu=1``).

    autotune_gain = default eval_loss / best trial eval_loss       (issue 9's bar: >= 1.05)

It also prints the trial concurrency the sweep reached (most trials running at one moment, from the trials'
start and end times): with 2 cores and 1 CPU per trial, 2 means both cores were busy with trials.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/autotune_gain.py [--trials 10] [--steps 300] [--config PRESET]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from aios_ray.cli import build_parser, config_from_args  # noqa: E402
from aios_ray.tune.autotune import run_autotune  # noqa: E402
from aios_ray.tune.settings import AutotuneConfig  # noqa: E402
from aios_ray.tune.space import SearchSpace  # noqa: E402


def base_config(args: argparse.Namespace, out: Path, name: str):  # noqa: ANN201 - a Config
    preset = ["--config", args.config] if args.config else []
    argv = ["train", *preset, "--steps", str(args.steps), "--eval-interval", str(args.eval_interval),
            "--eval-batches", str(args.eval_batches), "--seed", str(args.seed), "--bundle-dir", str(out / "bundles"),
            "--brain-name", name, "--checkpoint-interval", str(args.steps), "--no-ray"]
    return config_from_args(build_parser().parse_args(argv))


def train_default(args: argparse.Namespace, out: Path) -> tuple[float, float]:
    import torch

    from aios_ray.train.run import run_training

    torch.set_num_threads(1)  # as a trial with cpu=1 runs
    started = time.perf_counter()
    _plan, summary = run_training(base_config(args, out, "default"))
    return float(summary["eval_loss"]), time.perf_counter() - started


def concurrency(trials: list[dict]) -> int:
    """Most trials running at one moment, from each trial's start and end."""
    events = []
    for t in trials:
        if t.get("ended_at") and t.get("duration_s"):
            events += [(t["ended_at"] - t["duration_s"], 1), (t["ended_at"], -1)]
    running = most = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        most = max(most, running)
    return most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="", help="base preset (default: none, the training defaults)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="working directory (default: a temp dir)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="aios-autotune-gain-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load {os.getloadavg()[0]:.2f}")
    preset = args.config or "(none: the training defaults)"
    print(f"workload: preset {preset}, sample corpus, {args.steps} steps (eval every {args.eval_interval}, "
          f"{args.eval_batches} batches), seed {args.seed}; sweep of {args.trials} trials; out {out}")

    default_loss, default_s = train_default(args, out)
    print(f"default: eval_loss {default_loss:.4f} ({default_s:.0f} s)")

    cfg = AutotuneConfig(trials=args.trials, seed=args.seed, out_dir=str(out / "optimization"),
                         resources_per_trial="cpu=1", study_name="gain")
    started = time.perf_counter()
    summary = run_autotune(cfg, SearchSpace(), base_config(args, out, "sweep"))
    sweep_s = time.perf_counter() - started
    trials = summary["trials"]
    best = summary.get("best_value")
    states = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "failed")}
    print(f"sweep: {len(trials)} trials {states} in {sweep_s:.0f} s; best eval_loss "
          f"{best if best is None else f'{best:.4f}'} with {json.dumps(summary.get('best_params'))}")
    print(f"trial_concurrency={concurrency(trials)}  (most trials running at once; {os.cpu_count()} cores, "
          f"1 CPU per trial)")
    if best is not None:
        print(f"autotune_gain={default_loss / best:.3f}  (default eval_loss / best trial eval_loss; bar >= 1.05)")
    else:
        print("autotune_gain=nan  (no trial completed)")


if __name__ == "__main__":
    main()
