"""PNG views of a metrics JSONL: loss curves, ACT halting, and expert usage per MoE layer."""

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
    rows = 2 if usage else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.5 * rows), squeeze=False)
    _plot_losses(axes[0][0], train, evals)
    _plot_halting(axes[0][1], train)
    if usage:
        _plot_usage(fig, axes[1][0], usage)
        _plot_drops(axes[1][1], events)
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
