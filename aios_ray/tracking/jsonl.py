"""Metrics JSONL (the source of truth for every run) and the human-readable progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from aios_ray.durable import atomic_write_bytes


class MetricsLog:
    """Appends one JSON object per line; each line is flushed so a crash loses at most one line."""

    def __init__(self, path: Path | None, publish: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self.publish = publish  # also hands every record to e.g. the Ray metrics gauges
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        if self.publish is not None:
            self.publish(event, fields)

    def rewind(self, step: int) -> tuple[int, int]:
        """Drop every line about a step after ``step`` (those steps are about to run again), so that the log
        holds each step once. Returns (lines dropped, the last step the log had reached). The file is
        replaced atomically: a crash here leaves the old log or the rewound one."""
        if self._file is None or self.path is None:
            return 0, step
        self._file.close()
        kept, dropped, last = [], 0, step
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the crash that forced the replay
                dropped += 1
                continue
            line_step = record.get("step") if isinstance(record, dict) else None
            if isinstance(line_step, int) and line_step > step:
                dropped += 1
                last = max(last, line_step)
                continue
            kept.append(line + "\n")
        if dropped:
            atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))
        self._file = self.path.open("a", encoding="utf-8")
        return dropped, last

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every event of a metrics JSONL file. A torn last line (a run killed, or still writing, mid-line) is left
    out; any other line that is not a JSON object raises ``ValueError`` naming its number."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    events = []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise ValueError(f"line {number} is not JSON") from None
        if not isinstance(event, dict):
            raise ValueError(f"line {number} is not a JSON object")
        events.append(event)
    return events


def say(line: str, stream: TextIO | None = None) -> None:
    """One console line. Not print(): Ray Train patches print() in workers and the line would show twice."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


class Progress:
    """A periodic line: step, loss, tokens/s, s/step and ETA for the steps left in this run."""

    def __init__(self, total_steps: int, stream: TextIO = sys.stdout) -> None:
        self.total_steps = total_steps
        self.stream = stream
        self.started = time.perf_counter()
        self.done = 0

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        left = max(self.total_steps - self.done, 0)
        eta = elapsed / self.done * left
        line = (f"step {step:>6d} | {self.done}/{self.total_steps} | loss {metrics['train_loss']:.4f} "
                f"(lm {metrics['lm_loss']:.4f}) | {metrics['tokens_per_sec']:,.0f} tok/s | "
                f"{metrics['sec_per_step']:.2f} s/step | halt {metrics['mean_halt_steps']:.2f} | "
                f"lr {metrics['lr']:.2e} | ETA {format_seconds(eta)}")
        say(line, self.stream)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
