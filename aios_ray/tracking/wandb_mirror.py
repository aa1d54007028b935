"""The optional Weights & Biases mirror of the metrics log.

The chief hands every metrics-log record to ``WandbMirror.publish`` (the same hook the Ray gauges use): the
``run_start`` record opens the W&B run with the resolved config, secrets redacted; ``train``/``eval`` records
become W&B history rows, ``expert_usage`` records per-layer expert shares; ``run_end`` uploads the metrics
JSONL, the newest checkpoint and the bundle as artifacts and finishes the run. W&B is a mirror, never a
dependency of training: any failure of it is one warning line and the run goes on without it.
``wandb`` is imported only here, and only when the mirror is on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aios_ray.config import TrackingConfig

Publish = Callable[[str, dict[str, Any]], None]

MASK = "***"
# Config keys whose values are secrets, matched on word parts of the key ("api_key", "hf_token", "authKey").
_SECRET_KEY = re.compile(r"(^|[_\-.])(key|keys|token|tokens|secret|secrets|password|passwd|pwd|api_?key|auth|"
                         r"authorization|credentials?)($|[_\-.])", re.IGNORECASE)
# ``scheme://user:pass@host`` (or ``scheme://token@host``): everything before the ``@`` is a credential.
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")
# The per-step and eval numbers mirrored as history; the rest of a record (paths, dicts) stays in the JSONL.
_SCALAR_EVENTS = ("train", "eval", "store_stats")


def _is_secret_key(key: str) -> bool:
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # authToken -> auth_Token
    return bool(_SECRET_KEY.search(snake))


def redact(value: Any, key: str = "") -> Any:
    """A copy of a config value with secrets masked: the value of any key that names a secret, and the
    credentials part of any URL in a string."""
    if key and _is_secret_key(key) and value not in (None, "", False):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(rf"\g<1>{MASK}@", value)
    return value


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: W&B: {message}\n")
    sys.stderr.flush()


class WandbMirror:
    """Lives in the chief; ``publish`` never raises: the first W&B failure turns the mirror off."""

    def __init__(self, settings: TrackingConfig, log_file: Path, run_name: str) -> None:
        self.settings = settings
        self.log_file = log_file
        self.run_name = settings.wandb_run_name or run_name
        self.run: Any = None
        self.checkpoint: Path | None = None
        self.bundle: Path | None = None
        self.failed = False

    def publish(self, event: str, fields: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            self._handle(event, fields)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            _warn(f"{type(exc).__name__}: {exc}; mirroring stops, the metrics JSONL goes on")
            self.failed = True
            self._finish_quietly()

    def _handle(self, event: str, fields: dict[str, Any]) -> None:
        if event == "run_start":
            self.bundle = Path(fields["bundle"]) if fields.get("bundle") else None
            self._open(fields.get("config") or {})
            return
        if self.run is None:
            return
        step = fields.get("step")
        if event in _SCALAR_EVENTS:
            row = {f"{event}/{k}": v for k, v in fields.items() if k != "step" and _is_number(v)}
            self.run.log({**row, "step": step})
        elif event == "expert_usage":
            self.run.log({**_expert_shares(fields), "step": step})
        elif event == "checkpoint":
            self.checkpoint = Path(fields["path"])
        elif event == "run_end":
            self._close(fields)

    def _open(self, config: dict[str, Any]) -> None:
        import wandb

        modes = ["offline"] if self.settings.wandb_offline else ["online", "offline"]
        for mode in modes:
            try:
                self.run = wandb.init(**self._init_args(config, mode))
                self.run.define_metric("step")
                self.run.define_metric("*", step_metric="step")
                return
            except Exception as exc:  # noqa: BLE001 - no network or no login: fall back to offline
                if mode == modes[-1]:
                    raise
                _warn(f"online run failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''});"
                      f" logging offline (upload later with `wandb sync`)")

    def _init_args(self, config: dict[str, Any], mode: str) -> dict[str, Any]:
        import wandb

        s = self.settings
        # No prompt for a login and a bounded wait: a run on a machine without network starts in seconds.
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", "30"))
        # The run directory goes with the bundle unless WANDB_DIR says otherwise: a Ray worker's own working
        # directory is Ray's, not the one the run was started from.
        run_dir = os.environ.get("WANDB_DIR") or (str(self.bundle) if self.bundle is not None else None)
        return {"dir": run_dir, "project": s.wandb_project, "entity": s.wandb_entity, "group": s.wandb_group,
                "tags": s.tags, "name": self.run_name, "config": redact(config), "mode": mode, "reinit": "create_new",
                "settings": wandb.Settings(init_timeout=timeout, login_timeout=timeout, silent=True,
                                           console="off")}

    def _close(self, fields: dict[str, Any]) -> None:
        for name, value in fields.items():
            if name != "step" and _is_number(value):
                self.run.summary[f"eval/{name}" if name in ("eval_loss", "ppl") else name] = value
        self._log_artifacts()
        run, self.run = self.run, None
        run.finish()

    def _log_artifacts(self) -> None:
        import wandb

        run_id = _artifact_name(self.run_name)
        if self.log_file.is_file():
            metrics = wandb.Artifact(f"{run_id}-metrics", type="metrics")
            metrics.add_file(str(self.log_file), name="metrics.jsonl")
            self.run.log_artifact(metrics)
        if self.checkpoint is not None and self.checkpoint.is_dir():
            checkpoint = wandb.Artifact(f"{run_id}-checkpoint", type="checkpoint",
                                        metadata={"path": str(self.checkpoint)})
            checkpoint.add_dir(str(self.checkpoint))
            self.run.log_artifact(checkpoint)
        if self.bundle is not None and self.bundle.is_dir():
            bundle = wandb.Artifact(f"{run_id}-bundle", type="model")
            # The bundle's top-level files (weights, config, tokenizer, metadata); its checkpoints are above.
            for path in sorted(p for p in self.bundle.iterdir() if p.is_file()):
                bundle.add_file(str(path), name=path.name)
            self.run.log_artifact(bundle)

    def _finish_quietly(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            with contextlib.suppress(Exception):  # the first failure is the one reported
                run.finish(exit_code=1)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _expert_shares(fields: dict[str, Any]) -> dict[str, float]:
    layer = fields["layer"]
    counts = fields["token_counts"]
    routed = max(sum(counts), 1)
    row = {f"experts/layer{layer}/expert{e}_share": count / routed for e, count in enumerate(counts)}
    row[f"experts/layer{layer}/dropped_tokens"] = float(fields.get("dropped_tokens", 0))
    return row


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name)


def with_wandb(publish: Publish, settings: TrackingConfig, log_file: Path, run_name: str) -> Publish:
    """``publish`` and, when ``--wandb`` is on, the W&B mirror after it."""
    if not settings.wandb:
        return publish
    mirror = WandbMirror(settings, log_file, run_name)

    def both(event: str, fields: dict[str, Any]) -> None:
        publish(event, fields)
        mirror.publish(event, fields)

    return both
