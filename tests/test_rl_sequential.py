"""`aios-ray rl sequential` on the synthetic games: phases, detector-routed evaluation, the retention matrix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from aios_ray.cli import main
from tests.helpers import events

pytestmark = pytest.mark.ray


def test_two_game_run_writes_the_retention_matrix(ray_local, tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    assert main(["rl", "sequential", "--config", "rl_synthetic", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "rl  phase 1/2 synth0" in out and "rl  phase 2/2 synth1" in out and "ETA" in out
    retention = json.loads((run_dir / "retention.json").read_text())
    assert retention["games"] == ["synth0", "synth1"] and retention["phases"] == ["1:synth0", "2:synth1"]
    assert len(retention["matrix"]) == 2 and all(len(row) == 2 for row in retention["matrix"])
    rows = list(csv.reader((run_dir / "retention.csv").open()))
    assert rows[0] == ["after_phase", "synth0", "synth1"] and rows[-1][0] == "random_policy" and len(rows) == 4
    iterations = events(run_dir / "metrics.jsonl", "iteration")
    assert [e["game"] for e in iterations] == ["synth0"] * 6 + ["synth1"] * 6  # 1,536 steps of 256 per game
    assert iterations[-1]["phase_steps"] == 1536 and iterations[-1]["env_steps_per_sec"] > 0
    phase_ends = events(run_dir / "metrics.jsonl", "phase_end")
    # The policy is never told the game at evaluation: the detector names it, right for both games at the end.
    assert phase_ends[-1]["detector_right"] == {"synth0": 1.0, "synth1": 1.0}
    assert len(phase_ends[-1]["detector_frames_to_detect"]) == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--games", "synth0,pong"], "pong"),
    (["--suite", "chess"], "chess"),
    (["--steps-per-game", "0"], "--steps-per-game must be > 0"),
    (["--num-experts", "4", "--shared-experts", "4"], "--num-experts/--shared-experts"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, flags: list[str], message: str):
    run_dir = tmp_path / "run"
    assert main(["rl", "sequential", "--config", "rl_synthetic", "--run-dir", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()
