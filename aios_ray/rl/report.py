"""``aios-ray rl report`` and ``aios-ray rl compare``: PNGs and a side-by-side table from a sequential run's
directory (``retention.json`` and ``metrics.jsonl``, as ``aios_ray.rl.sequential`` writes them).

Panels and the data they need:

* ``returns.png``: per game, the training return of each PPO iteration (``iteration`` events) while the game
  is trained, its evaluation after every phase (``phase_end`` events), the random policy's score, and the
  phase boundaries;
* ``retention.png``: the normalised retention matrix with the numbers in the cells (``retention.json``);
* ``experts.png``: game x expert usage per MoE layer, from the last ``phase_end`` event that carries
  ``expert_counts`` ({layer: [[count per expert] per game]}), with the mutual information per phase beside
  the random-router control;
* ``store.png``: expert store hit rate per tier over time (``store_stats`` events, the store's own format).

A panel whose data the run does not hold is skipped, and the report says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aios_ray.errors import DataError, UserError  # noqa: E402
from aios_ray.rl.metrics import ContinualMetrics, continual_metrics, specialisation  # noqa: E402
from aios_ray.tracking.jsonl import (
    read_metrics,
    say,  # noqa: E402
)


@dataclasses.dataclass
class RunData:
    run_dir: Path
    games: list[str]
    phases: list[str]  # "n:game", one per row of the matrix
    matrix: np.ndarray  # (phases, games)
    random_scores: np.ndarray  # (games,)
    events: list[dict[str, Any]]

    def trained(self) -> list[int]:
        """The game each row's phase trained, from the phase names; the schedule's order where a name is not
        one of the games."""
        index = {game: j for j, game in enumerate(self.games)}
        return [index.get(name.split(":", 1)[-1], p % len(self.games)) for p, name in enumerate(self.phases)]

    def metrics(self) -> ContinualMetrics:
        return continual_metrics(self.matrix, self.random_scores, self.games, self.trained())


def _run_dir(run_dir: Path | str) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    return path


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: missing (is this a finished `aios-ray rl sequential` run directory?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({str(exc)[:80]})") from None


def read_retention(run_dir: Path | str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(games, phase names, matrix, random scores) from ``retention.json``, checked for shape and types."""
    path = _run_dir(run_dir) / "retention.json"
    data = _read_json(path)
    try:
        games = [str(g) for g in data["games"]]
        matrix = np.asarray(data["matrix"], dtype=float)
        random_scores = np.array([float(data["random_scores"][g]) for g in games])
        phases = [str(p) for p in data.get("phases") or [f"{i + 1}:?" for i in range(len(matrix))]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a retention matrix (bad or missing {exc})") from None
    if not games or matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] != len(games):
        raise DataError(f"{path}: matrix must have one row per phase and {len(games)} columns (one per game), "
                        f"got shape {matrix.shape}")
    if len(phases) != len(matrix):
        raise DataError(f"{path}: {len(phases)} phase names for {len(matrix)} matrix rows")
    return games, phases, matrix, random_scores


def read_events(run_dir: Path | str) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl``; a torn last line (a run killed while writing it) is left out."""
    path = _run_dir(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing (is this an `aios-ray rl sequential` run directory?)")
    try:
        return read_metrics(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a metrics JSONL file (not UTF-8)") from None
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None


def load_run(run_dir: Path | str, with_events: bool = True) -> RunData:
    games, phases, matrix, random_scores = read_retention(run_dir)
    return RunData(Path(run_dir), games, phases, matrix, random_scores, read_events(run_dir) if with_events else [])


def _phase_spans(events: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """(first step, last step, game) of each phase's training iterations, in order."""
    spans: dict[int, list[Any]] = {}
    for e in events:
        if e.get("event") == "iteration" and isinstance(e.get("phase"), int):
            start = e["step"] - e.get("phase_steps", 0)
            span = spans.setdefault(e["phase"], [start, e["step"], e.get("game", "?")])
            span[0], span[1] = min(span[0], start), max(span[1], e["step"])
    return [tuple(spans[p]) for p in sorted(spans)]  # type: ignore[misc]


def _plot_returns(run: RunData, out: Path) -> Path | None:
    iterations = [e for e in run.events if e.get("event") == "iteration"]
    if not iterations:
        return None
    spans = _phase_spans(run.events)
    ends = [e for e in run.events if e.get("event") == "phase_end" and isinstance(e.get("returns"), dict)]
    fig, axes = plt.subplots(len(run.games), 1, figsize=(11, 2.8 * len(run.games)), sharex=True, squeeze=False)
    for j, (game, ax) in enumerate(zip(run.games, axes[:, 0], strict=True)):
        for start, end, trained in spans:
            if trained == game:
                ax.axvspan(start, end, color="tab:blue", alpha=0.08)
            ax.axvline(end, color="grey", lw=0.8, ls=":")
        label = "training return"
        for phase in sorted({e.get("phase") for e in iterations if e.get("game") == game}, key=str):
            points = [(e["step"], e["episode_return_mean"]) for e in iterations
                      if e.get("phase") == phase and e.get("episode_return_mean") is not None]
            if points:  # one line per phase: a curve must not bridge the phases spent on other games
                ax.plot(*zip(*points, strict=True), color="tab:blue", alpha=0.7, label=label)
                label = None
        evaluated = [(e["step"], e["returns"][game]) for e in ends if e["returns"].get(game) is not None]
        if evaluated:
            ax.plot(*zip(*evaluated, strict=True), "o--", color="tab:orange", label="evaluation after phase")
        ax.axhline(run.random_scores[j], color="black", lw=1, ls="--", alpha=0.6, label="random policy")
        ax.set(ylabel="return", title=f"{game} (shaded: trained on it; dotted: phase ends)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1, 0].set(xlabel="env steps")
    return _save(fig, out)


def _plot_retention(run: RunData, metrics: ContinualMetrics, out: Path) -> Path:
    normalised = metrics.normalised
    finite = normalised[np.isfinite(normalised)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    fig, ax = plt.subplots(figsize=(1.6 * len(run.games) + 3, 0.7 * len(run.phases) + 2.2))
    image = ax.imshow(np.nan_to_num(normalised, nan=low), cmap="RdYlGn", vmin=low, vmax=1.0, aspect="auto")
    for p in range(normalised.shape[0]):
        for j in range(normalised.shape[1]):
            value = normalised[p, j]
            text = f"{value:.2f}\n({run.matrix[p, j]:.3g})" if np.isfinite(value) else f"--\n({run.matrix[p, j]:.3g})"
            ax.text(j, p, text, ha="center", va="center", fontsize=8)
    ax.set(xticks=range(len(run.games)), xticklabels=run.games, yticks=range(len(run.phases)),
           yticklabels=[f"after {name}" for name in run.phases], xlabel="evaluated game")
    ax.set_title("normalised return (raw): (r - random) / (best in run - random)\n"
                 f"forgetting {_fmt(metrics.mean_forgetting)} | forward transfer "
                 f"{_fmt(metrics.mean_forward_transfer)} | final {_fmt(metrics.mean_final)}", fontsize=9)
    fig.colorbar(image, ax=ax)
    return _save(fig, out)


def _expert_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "phase_end" and isinstance(e.get("expert_counts"), dict)
            and e["expert_counts"]]


def _plot_experts(run: RunData, out: Path) -> Path | None:
    usage = _expert_events(run.events)
    if not usage:
        return None
    last = usage[-1]
    layers = sorted(last["expert_counts"])
    scores = specialisation(last["expert_counts"])
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(5 * (len(layers) + 1), 0.5 * len(run.games) + 3),
                             squeeze=False)
    for layer, ax in zip(layers, axes[0], strict=False):
        counts = np.asarray(last["expert_counts"][layer], dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(shares, cmap="viridis", vmin=0, aspect="auto")
        ax.set(yticks=range(len(counts)), yticklabels=run.games[:len(counts)], xlabel="expert",
               xticks=range(counts.shape[1]))
        ax.set_title(f"layer {layer}: share of each game's assignments\nI(game; expert) {_fmt(scores[layer]['mi'])}"
                     f" bits\n(random router {_fmt(scores[layer]['random_mi'])}, max {_fmt(scores[layer]['max_mi'])})",
                     fontsize=9)
        fig.colorbar(image, ax=ax)
    ax = axes[0, -1]
    steps = [e.get("step", i) for i, e in enumerate(usage)]
    for layer in layers:
        per_phase = [specialisation({layer: e["expert_counts"][layer]})[layer] if layer in e["expert_counts"]
                     else {"mi": math.nan, "random_mi": math.nan} for e in usage]
        line = ax.plot(steps, [s["mi"] for s in per_phase], "o-", label=f"layer {layer}")[0]
        ax.plot(steps, [s["random_mi"] for s in per_phase], "x--", color=line.get_color(), alpha=0.6,
                label=f"layer {layer}: random router")
    ax.set(xlabel="env steps (phase end)", ylabel="bits", title="expert specialisation I(game; expert)")
    ax.set_xticks(steps)  # one tick per phase end: the only points there are
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out)


def _plot_store(run: RunData, out: Path) -> Path | None:
    from aios_ray.tracking.plots import store_series

    try:
        series = store_series(run.events)
    except (KeyError, TypeError):
        return None
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(11, 4))
    for name, row in series.items():
        ax.plot(row["step"], row["hit_rate"], "o-", label=f"{name} tier")
    for _, end, _ in _phase_spans(run.events):
        ax.axvline(end, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="env steps", ylabel="hits / lookups", ylim=(0, 1.05),
           title="expert store hit rate per interval (dotted: phase ends)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def _save(fig: Any, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def render_report(run_dir: Path | str, log: Callable[[str], None] = say) -> list[Path]:
    """Writes the report's PNGs into ``run_dir`` and returns their paths; ``log`` hears which panels were
    skipped for lack of data."""
    run = load_run(run_dir)
    metrics = run.metrics()
    written = [_plot_retention(run, metrics, run.run_dir / "retention.png")]
    optional: list[tuple[str, Callable[[RunData, Path], Path | None], str, str]] = [
        ("returns.png", _plot_returns, "return curves", "no `iteration` events in metrics.jsonl"),
        ("experts.png", _plot_experts, "game x expert usage", "no `expert_counts` in the `phase_end` events"),
        ("store.png", _plot_store, "tier hit rate", "no `store_stats` events with per-tier hits"),
    ]
    for name, plot, what, missing in optional:
        path = plot(run, run.run_dir / name)
        if path is None:
            log(f"skipped {what}: {missing}")
        else:
            written.append(path)
    return written


def _fmt(value: float, width: int = 0) -> str:
    text = f"{value:.3f}" if np.isfinite(value) else "--"
    return f"{text:>{width}}" if width else text


def compare_runs(run_a: Path | str, run_b: Path | str) -> str:
    """Forgetting, forward transfer and final normalised return of two runs, per game and mean, side by side
    (each run normalised by its own random-policy scores and best returns)."""
    runs = [load_run(run_a, with_events=False), load_run(run_b, with_events=False)]
    metrics = [run.metrics() for run in runs]
    games = list(dict.fromkeys(runs[0].games + runs[1].games))
    rows = [("metric", "game", "A", "B")]
    for label, attribute, mean in (("forgetting (lower is better)", "forgetting", "mean_forgetting"),
                                   ("forward transfer", "forward_transfer", "mean_forward_transfer"),
                                   ("final normalised return", "final", "mean_final")):
        for game in games:
            cells = [_fmt(float(getattr(m, attribute)[m.games.index(game)])) if game in m.games else "--"
                     for m in metrics]
            rows.append((label, game, *cells))
        rows.append((label, "mean", *(_fmt(getattr(m, mean)) for m in metrics)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"A: {runs[0].run_dir}  ({len(runs[0].phases)} phases)",
             f"B: {runs[1].run_dir}  ({len(runs[1].phases)} phases)",
             "returns normalised per run: (r - random) / (best in run - random); CORA isolated forgetting and "
             "zero-shot forward transfer"]
    for i, row in enumerate(rows):
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    return "\n".join(lines)
