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
    """Two games, each visited twice (--cycles 2): on a revisit the detector, not the schedule, names the game."""
    run_dir = tmp_path / "run"
    assert main(["rl", "sequential", "--config", "rl_synthetic", "--run-dir", str(run_dir), "--cycles", "2",
                 "--steps-per-game", "768"]) == 0
    out = capsys.readouterr().out
    assert "rl  phase 1/4 synth0" in out and "rl  phase 4/4 synth1" in out and "ETA" in out
    retention = json.loads((run_dir / "retention.json").read_text())
    assert retention["games"] == ["synth0", "synth1"]
    assert retention["phases"] == ["1:synth0", "2:synth1", "3:synth0", "4:synth1"]
    assert len(retention["matrix"]) == 4 and all(len(row) == 2 for row in retention["matrix"])
    rows = list(csv.reader((run_dir / "retention.csv").open()))
    assert rows[0] == ["after_phase", "synth0", "synth1"] and rows[-1][0] == "random_policy" and len(rows) == 6
    iterations = events(run_dir / "metrics.jsonl", "iteration")
    assert [e["game"] for e in iterations] == (["synth0"] * 3 + ["synth1"] * 3) * 2  # 768 steps of 256 per phase
    assert iterations[-1]["phase_steps"] == 768 and iterations[-1]["env_steps_per_sec"] > 0
    assert all(e["learner_samples_per_sec"] > 0 for e in iterations)
    # a weight sync carries a group (2 shared + 2 own of 6 experts, and their 4 ids): the 2 left out are
    # 3 * 128 * 128 floats each
    assert all(e["full_sync_bytes"] - e["sync_bytes"] == 2 * 3 * 128 * 128 * 4 - 4 * 8 for e in iterations)
    assert all(e["moe_lb_loss"] > 0 for e in iterations)  # the balance loss reached the learner
    switches = events(run_dir / "metrics.jsonl", "switch")
    assert [e["game"] for e in switches] == ["synth0", "synth1"] * 2
    # a first visit: the detector has never seen the game, the schedule announces it and its group is prefetched
    assert switches[1]["announced_by"] == "schedule" and switches[1]["prefetched_group"] == [0, 1, 4, 5]
    # a revisit: the detector names the game from the new environment's first frame
    assert [(e["announced_by"], e["announced"]) for e in switches[2:]] == [("detector", "synth0"),
                                                                           ("detector", "synth1")]
    phase_ends = events(run_dir / "metrics.jsonl", "phase_end")
    # The policy is never told the game at evaluation: the detector names it, right for both games at the end.
    assert phase_ends[-1]["detector_right"] == {"synth0": 1.0, "synth1": 1.0}
    # Frames until it named the new game after each switch: on a revisit it knows it from the first frame.
    frames = phase_ends[-1]["detector_frames_to_detect"]
    assert len(frames) == 4 and frames[2:] == [1, 1], frames
    # Routing per game: each game's choices stay in its own group and the shared experts, so the game tells a
    # lot about the chosen expert; a router that ignored the game would give close to 0 bits.
    from aios_ray.rl.metrics import specialisation

    (layer,) = specialisation(phase_ends[-1]["expert_counts"]).values()
    assert layer["mi"] > 0.3 and layer["mi"] > 10 * layer["random_mi"], layer
    assert phase_ends[-1]["specialisation"] == {"0": {"mi": layer["mi"], "random_mi": layer["random_mi"]}}


@pytest.mark.parametrize(("flags", "message"), [
    (["--games", "synth0,pong"], "pong"),
    (["--suite", "chess"], "chess"),
    (["--steps-per-game", "0"], "--steps-per-game must be > 0"),
    (["--num-experts", "4", "--shared-experts", "4"], "--num-experts/--shared-experts"),
    (["--dense", "--shared-training", "first"], "--shared-training first needs routing groups"),
    (["--shared-training", "sometimes"], "--shared-training 'sometimes'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, flags: list[str], message: str):
    run_dir = tmp_path / "run"
    assert main(["rl", "sequential", "--config", "rl_synthetic", "--run-dir", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.parametrize("experts", [["--experts", "local"], ["--experts", "tiered", "--capacity-gpu", "3"]],
                         ids=["local", "tiered"])
def test_a_run_killed_mid_phase_resumes_from_its_last_checkpoint(ray_local, tmp_path: Path, experts: list[str]):
    """SIGKILL the run during its 5th PPO iteration (checkpoints every 2): `--resume` continues from iteration 4
    of the first game with the detector, schedule and retention rows it had, and the log ends up holding every
    iteration exactly once. Tiered: the store (weights, Adam moments, steps) goes back to that checkpoint's
    snapshot, and the module's restored state is checked against it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    process = subprocess.Popen([sys.executable, "-m", "aios_ray", "rl", "sequential", "--config", "rl_synthetic",
                                "--run-dir", str(run_dir), "--checkpoint-every", "2", *experts], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 600  # a loaded 2-core machine starts Ray and the store's actors slowly
    try:
        while time.time() < deadline and process.poll() is None:
            if log.exists() and any(e.get("iteration", 0) >= 5 for e in _read(log)):
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and the local Ray it started
        process.wait()
    assert max(e.get("iteration", 0) for e in _read(log)) >= 5, "the run ended or stalled before the kill"
    assert main(["rl", "sequential", "--resume", str(run_dir)]) == 0
    (restart,) = events(log, "restart")
    assert (restart["phase"], restart["phase_steps"], restart["step"]) == (0, 1024, 1024)
    if "tiered" in experts:
        assert restart["store_reverted_to"] == "ckpt_000004"
        assert [e["game"] for e in events(log, "store_stats")] == ["synth0", "synth1"]
    iterations = events(log, "iteration")
    assert [e["iteration"] for e in iterations] == list(range(1, 13))
    assert [e["phase_steps"] for e in iterations] == [256 * i for i in range(1, 7)] * 2
    retention = json.loads((run_dir / "retention.json").read_text())
    assert len(retention["matrix"]) == 2
    assert events(log, "phase_end")[-1]["detector_right"] == {"synth0": 1.0, "synth1": 1.0}


def _read(log: Path) -> list[dict]:
    from aios_ray.tracking.jsonl import read_metrics

    return read_metrics(log)  # the run is writing it: its last line may be torn


def test_resume_of_something_that_is_not_a_run_is_one_line(tmp_path: Path, capsys):
    assert main(["rl", "sequential", "--resume", str(tmp_path)]) == 2
    assert "no rl_args.json" in capsys.readouterr().err


@pytest.mark.slow  # ~90 s on 2 loaded cores: every greedy evaluation step leases through the actors
def test_a_run_with_experts_in_the_tiered_store(ray_local, tmp_path: Path):
    """`--experts tiered --capacity-gpu 3`: the learner's 6 experts live in the store (its Ray actors), a game's
    group of 4 does not fit the hot tier and is partly streamed, and the run completes with its store counters in
    the log; the store's actors end with the run and its NVMe files stay in the run directory."""
    run_dir = tmp_path / "run"
    assert main(["rl", "sequential", "--config", "rl_synthetic", "--run-dir", str(run_dir), "--steps-per-game", "512",
                 "--eval-episodes", "1", "--experts", "tiered", "--capacity-gpu", "3"]) == 0
    stats = events(run_dir / "metrics.jsonl", "store_stats")
    assert [e["game"] for e in stats] == ["synth0", "synth1"]
    hot = next(t for t in stats[-1]["tiers"] if t["tier"] == "hot")
    assert hot["slots"] == 3 and hot["streamed"] > 0 and hot["hits"] + hot["misses"] > 0
    assert hot["prefetch_issued"] > 0  # the detector-announced group went ahead of demand
    assert (run_dir / "expert_store" / "manifest.json").is_file()
    with pytest.raises(ValueError):
        ray_local.get_actor("rl-synthetic-seq-dram", namespace="aios-ray")
    args = json.loads((run_dir / "rl_args.json").read_text())
    assert args["store"]["experts"] == "tiered" and args["store"]["capacity_gpu"] == 3


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("rl: [1, 2\n", "malformed YAML"),
    ("model:\n  hidden_size: 8\n", "expected a mapping section 'rl:'"),
    ("rl:\n  steps_per_game: -5\n", "--steps-per-game must be > 0"),
    ("rl:\n  games: synth0\nstore:\n  capacity_gpu: -1\n", "--capacity-gpu must be >= 0"),
])
def test_a_bad_rl_config_file_is_one_line_naming_it(tmp_path: Path, capsys, yaml_text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert main(["rl", "sequential", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
