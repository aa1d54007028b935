"""What a Ray dashboard user sees: the training gauges on the metrics export port, and a quiet console."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from aios_ray.cli import main
from tests.helpers import debug_config, events

pytestmark = pytest.mark.ray

SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and match["name"].startswith("ray_aios_"):
            samples.append((match["name"], dict(LABEL.findall(match["labels"])), float(match["value"])))
    return samples


def wait_for_gauges(port: int, run: str, wanted: set[str], deadline_s: float = 60.0) -> dict[str, list]:
    """Ray exports metrics every few seconds: poll until every wanted gauge of this run is there (a guard)."""
    found: dict[str, list] = {}
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = {}
        for name, labels, value in scrape(port):
            if labels.get("run") == run:
                found.setdefault(name, []).append((labels, value))
        if wanted <= found.keys():
            return found
        time.sleep(1.0)
    raise AssertionError(f"gauges missing after {deadline_s} s: {sorted(wanted - found.keys())}")


def test_a_tiered_training_run_exports_its_gauges_tagged_with_the_run(ray_local, tmp_path: Path):
    port = next(node["MetricsExportPort"] for node in ray_local.nodes() if node["Alive"])
    brain = f"dash-{uuid.uuid4().hex[:8]}"
    assert main(["train", "--config", "debug", "--steps", "4", "--eval-interval", "2", "--brain-name", brain,
                 "--bundle-dir", str(tmp_path), "--experts", "tiered", "--store-stats-interval", "2"]) == 0
    gauges = wait_for_gauges(port, brain, {
        "ray_aios_train_train_loss", "ray_aios_train_eval_loss", "ray_aios_train_tokens_per_sec",
        "ray_aios_train_mean_halt_steps", "ray_aios_train_step", "ray_aios_train_expert_token_share",
        "ray_aios_store_hit_rate"})

    def single(name: str) -> float:
        (labels, value), = gauges[name]
        return value

    log = tmp_path / brain / "metrics.jsonl"
    last_train, last_eval = events(log, "train")[-1], events(log, "eval")[-1]
    assert single("ray_aios_train_step") == last_train["step"] == 4
    for name in ("train_loss", "tokens_per_sec", "mean_halt_steps"):
        assert single(f"ray_aios_train_{name}") == pytest.approx(last_train[name])
    assert single("ray_aios_train_eval_loss") == pytest.approx(last_eval["eval_loss"])

    # expert usage: one share per (layer, expert), from the last expert_usage record of each layer
    usage = {record["layer"]: record["token_counts"] for record in events(log, "expert_usage")}
    shares = {(labels["layer"], int(labels["expert"])): value
              for labels, value in gauges["ray_aios_train_expert_token_share"]}
    assert {layer for layer, _ in shares} == set(usage)
    for (layer, expert), share in shares.items():
        assert share == pytest.approx(usage[layer][expert] / sum(usage[layer]))

    # store hit rates come from the store's own actors, now tagged with the run as well
    hit_rates = {labels["tier"]: value for labels, value in gauges["ray_aios_store_hit_rate"]}
    assert set(hit_rates) == {"gpu", "dram"} and all(0.0 <= rate <= 1.0 for rate in hit_rates.values())
    assert hit_rates["gpu"] > 0


def test_ray_train_logging_is_warning_unless_verbose(tmp_path: Path):
    from aios_ray.train.ray_train import _REPORT_LOGGER_MODULE, _quiet_worker_logs, ray_train_logging

    cfg = debug_config(tmp_path)
    assert cfg.cluster.verbose is False
    assert ray_train_logging(cfg).log_level == "WARNING"
    verbose = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, verbose=True))
    assert ray_train_logging(verbose).log_level == "INFO"

    import importlib

    loggers = [importlib.import_module(_REPORT_LOGGER_MODULE).logger, logging.getLogger("ray.data"),
               logging.getLogger("ray.data._internal.progress")]
    before = [logger.level for logger in loggers]
    try:
        _quiet_worker_logs()
        report, data, progress = loggers
        # a worker's report lines and a streamed run's Ray Data lines: warnings only (progress-bar notices: none)
        assert not report.isEnabledFor(logging.INFO) and report.isEnabledFor(logging.WARNING)
        assert not data.isEnabledFor(logging.INFO) and data.isEnabledFor(logging.WARNING)
        assert not progress.isEnabledFor(logging.WARNING) and progress.isEnabledFor(logging.ERROR)
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)


def _train_console(tmp_path: Path, *flags: str) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "aios_ray", "train", "--config", "debug", "--steps", "2",
                           "--brain-name", "quiet", "--bundle-dir", str(tmp_path), *flags],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_console_shows_progress_and_ray_train_reports_only_with_verbose(tmp_path: Path):
    quiet = _train_console(tmp_path / "quiet")
    assert "eval  step      2" in quiet and "done: step 2" in quiet
    assert "TrainingReport(" not in quiet and "Checkpoint successfully created" not in quiet
    verbose = _train_console(tmp_path / "verbose", "--verbose")
    assert "done: step 2" in verbose
    assert "TrainingReport(" in verbose and "Checkpoint successfully created" in verbose
