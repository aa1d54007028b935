"""PNG views of a metrics JSONL: loss curves, ACT halting, expert usage per MoE layer, and (``--experts
tiered``) the expert store's hit rate, stall time and traffic per tier."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aios_ray.errors import DataError  # noqa: E402
from aios_ray.tracking.jsonl import read_metrics  # noqa: E402


def load_events(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"--log-file {path}: no such file")
    try:
        events = read_metrics(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a metrics JSONL file ({str(exc)[:80]})") from None
    if not any(e.get("event") == "train" for e in events):
        raise DataError(f"{path}: holds no training steps to plot")
    return events


def plot_run(log_file: Path, out: Path) -> Path:
    events = load_events(log_file)
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    usage = _last_usage_per_layer(events)
    store = store_series(events)
    rows = 1 + bool(usage) + bool(store)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.5 * rows), squeeze=False)
    _plot_losses(axes[0][0], train, evals)
    _plot_halting(axes[0][1], train)
    if usage:
        _plot_usage(fig, axes[1][0], usage)
        _plot_drops(axes[1][1], events)
    if store:
        _plot_store(axes[rows - 1][0], axes[rows - 1][1], store)
    return _save(fig, log_file, out)


def _save(fig, log_file: Path, out: Path) -> Path:
    """Title the figure with the log it shows, write it to ``out`` and free it."""
    fig.suptitle(str(log_file))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_losses(ax, train: list[dict], evals: list[dict]) -> None:
    steps = [e["step"] for e in train]
    ax.plot(steps, [e["lm_loss"] for e in train], label="train lm_loss", alpha=0.6)
    ax.plot(steps, [e["train_loss"] for e in train], label="train total loss", alpha=0.4)
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="losses")
    ax.legend()
    ax.grid(alpha=0.3)


def _plot_halting(ax, train: list[dict]) -> None:
    steps = [e["step"] for e in train]
    ax.plot(steps, [e["mean_halt_steps"] for e in train], label="mean_halt_steps")
    ax.plot(steps, [e["q_loss"] for e in train], label="q_loss", alpha=0.6)
    ax.set(xlabel="step", title="ACT halting")
    ax.legend()
    ax.grid(alpha=0.3)


def _last_usage_per_layer(events: list[dict]) -> dict[str, dict]:
    return {e["layer"]: e for e in events if e["event"] == "expert_usage"}


def _plot_usage(fig, ax, usage: dict[str, dict]) -> None:
    layers = sorted(usage)
    counts = [np.array(usage[name]["token_counts"]) for name in layers]
    shares = np.array([c / max(c.sum(), 1) for c in counts])
    image = ax.imshow(shares, aspect="auto", cmap="viridis")
    ax.set(yticks=range(len(layers)), yticklabels=layers, xlabel="expert",
           title=f"token share per expert (step {max(usage[name]['step'] for name in layers)})")
    fig.colorbar(image, ax=ax)


def _plot_drops(ax, events: list[dict]) -> None:
    usage = [e for e in events if e["event"] == "expert_usage"]
    for layer in sorted({e["layer"] for e in usage}):
        points = [(e["step"], e["dropped_tokens"] / max(sum(e["token_counts"]), 1))
                  for e in usage if e["layer"] == layer]
        ax.plot(*zip(*points, strict=True), "o-", label=layer)
    ax.set(xlabel="step", ylabel="dropped / routed assignments", title="capacity drops")
    ax.legend()
    ax.grid(alpha=0.3)


def store_series(events: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per tier, between consecutive ``store_stats`` events: the step, the hit rate of the lookups in that
    interval, stall seconds and MB moved in. (The counters in the events are cumulative since the store
    actors started; an interval where they went down, a restarted actor, starts from zero.)"""
    stats = [e for e in events if e.get("event") == "store_stats" and e.get("tiers")]
    series: dict[str, dict[str, list[float]]] = {}
    previous: dict[str, dict] = {}
    for event in stats:
        for tier in event["tiers"]:
            if "hits" not in tier:  # the NVMe store: no cache, every read is a load
                continue
            name = tier["tier"]
            before = previous.get(name, {})
            if tier["hits"] < before.get("hits", 0):  # a new incarnation counts from zero
                before = {}
            delta = {key: tier[key] - before.get(key, 0) for key in ("hits", "misses", "stall_seconds", "bytes_in")}
            lookups = delta["hits"] + delta["misses"]
            row = series.setdefault(name, {"step": [], "hit_rate": [], "stall_s": [], "mb_in": []})
            row["step"].append(event["step"])
            row["hit_rate"].append(delta["hits"] / lookups if lookups else float("nan"))
            row["stall_s"].append(delta["stall_seconds"])
            row["mb_in"].append(delta["bytes_in"] / 2**20)
            previous[name] = tier
    return series


def _plot_store(ax_hits, ax_stall, series: dict[str, dict[str, list[float]]]) -> None:
    ax_mb = ax_stall.twinx()
    for name, row in series.items():
        ax_hits.plot(row["step"], row["hit_rate"], "o-", label=f"{name} tier")
        ax_stall.plot(row["step"], row["stall_s"], "o-", label=f"{name}: stall")
        ax_mb.plot(row["step"], row["mb_in"], "x--", alpha=0.6, label=f"{name}: loaded")
    ax_hits.set(xlabel="step", ylabel="hits / lookups", ylim=(0, 1.05), title="expert store hit rate per interval")
    ax_stall.set(xlabel="step", ylabel="stall seconds (o)", title="expert store: stall and loads per interval")
    ax_mb.set(ylabel="MB loaded (x)")
    ax_hits.legend()
    lines = ax_stall.get_legend_handles_labels()
    more = ax_mb.get_legend_handles_labels()
    ax_stall.legend(lines[0] + more[0], lines[1] + more[1])
    for ax in (ax_hits, ax_stall):
        ax.grid(alpha=0.3)


def plot_expert_usage(log_file: Path, out: Path) -> Path | None:
    """The expert-usage PNG: per MoE layer, each expert's share of the routed tokens over the run, experts with a
    goal bias (``expert_bias`` in the events) drawn thick with their bias in the legend. None without MoE events."""
    usage = [e for e in load_events(log_file) if e["event"] == "expert_usage"]
    if not usage:
        return None
    layers = sorted({e["layer"] for e in usage})
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 3.2 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        rows = [e for e in usage if e["layer"] == layer]
        steps = [e["step"] for e in rows]
        shares = np.array([np.array(e["token_counts"]) / max(sum(e["token_counts"]), 1) for e in rows])
        bias = rows[-1].get("expert_bias") or [0.0] * shares.shape[1]
        for expert in range(shares.shape[1]):
            label = f"expert {expert}" + (f" (goal bias {bias[expert]:+g})" if bias[expert] else "")
            ax.plot(steps, shares[:, expert], "o-", lw=3 if bias[expert] else 1.2, label=label)
        ax.set(xlabel="step", ylabel="share of routed tokens", title=f"expert usage: layer {layer}", ylim=(0, 1))
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    return _save(fig, log_file, out)


def render_report(log_file: Path, out_dir: Path) -> list[Path]:
    """Every PNG of a run (``aios-ray report``): the overview of ``plot_run`` and the expert-usage PNG."""
    written = [plot_run(log_file, out_dir / "overview.png")]
    usage = plot_expert_usage(log_file, out_dir / "expert_usage.png")
    return written + ([usage] if usage else [])
