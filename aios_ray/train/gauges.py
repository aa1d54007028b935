"""The chief's training metrics as Ray metrics: ``ray_aios_train_*`` on each node's metrics export port, the
source of the Ray dashboard's Metrics tab. Every gauge is tagged with the run (the brain name), so runs that
share a cluster stay apart; the store's hit rates come from its own actors (``ray_aios_store_*``)."""

from __future__ import annotations

from typing import Any

# The per-step and eval numbers the metrics log holds, exported under the same names.
SCALARS = ("step", "train_loss", "lm_loss", "q_loss", "lb_loss", "lr", "grad_norm", "tokens_per_sec",
           "sec_per_step", "mean_halt_steps", "eval_loss", "ppl")


class TrainGauges:
    def __init__(self, run: str) -> None:
        from ray.util.metrics import Gauge

        self.run = run
        self.scalars = {name: Gauge(f"aios_train_{name}", description=f"training: {name}", tag_keys=("run",))
                        for name in SCALARS}
        self.expert_share = Gauge("aios_train_expert_token_share", tag_keys=("run", "layer", "expert"),
                                  description="training: share of a MoE layer's routed tokens sent to each expert")
        self.dropped = Gauge("aios_train_expert_dropped_tokens", tag_keys=("run", "layer"),
                             description="training: tokens a MoE layer dropped over capacity")

    def publish(self, event: str, fields: dict[str, Any]) -> None:
        """One metrics-log record; events without a gauge (run_start, store_stats, ...) are ignored."""
        if event in ("train", "eval"):
            for name, value in fields.items():
                if name in self.scalars and isinstance(value, int | float):
                    self.scalars[name].set(float(value), tags={"run": self.run})
        elif event == "expert_usage":
            self._publish_usage(str(fields["layer"]), fields)

    def _publish_usage(self, layer: str, fields: dict[str, Any]) -> None:
        counts = fields["token_counts"]
        routed = max(sum(counts), 1)
        for expert, count in enumerate(counts):
            self.expert_share.set(count / routed, tags={"run": self.run, "layer": layer, "expert": str(expert)})
        self.dropped.set(float(fields["dropped_tokens"]), tags={"run": self.run, "layer": layer})
