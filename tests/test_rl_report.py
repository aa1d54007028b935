"""``aios-ray rl report`` / ``rl compare`` on run directories written by hand (no RLlib: fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aios_ray.cli import main
from aios_ray.rl.report import compare_runs, render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GAMES = ["alpha", "beta"]
STEPS = 512  # env steps per phase; two iterations of 256 each


def write_run(run_dir: Path, matrix: list[list[float]], random_scores: list[float], *, expert_counts: bool = False,
              store: bool = False) -> Path:
    """A run directory as ``rl sequential`` leaves it after ``len(matrix)`` phases of the games in order."""
    run_dir.mkdir(parents=True)
    phases = [f"{p + 1}:{GAMES[p % len(GAMES)]}" for p in range(len(matrix))]
    (run_dir / "retention.json").write_text(json.dumps({
        "games": GAMES, "phases": phases, "matrix": matrix,
        "random_scores": dict(zip(GAMES, random_scores, strict=True))}))
    events: list[dict[str, Any]] = [{"event": "random_scores", "step": 0, **dict(zip(GAMES, random_scores,
                                                                                     strict=True))}]
    for p, row in enumerate(matrix):
        game = GAMES[p % len(GAMES)]
        for done in (256, 512):
            events.append({"event": "iteration", "step": p * STEPS + done, "game": game, "phase": p,
                           "phase_steps": done, "episode_return_mean": None if done == 256 and p == 0 else done / 100})
        end: dict[str, Any] = {"event": "phase_end", "step": (p + 1) * STEPS, "game": game, "phase": p,
                               "returns": dict(zip(GAMES, row, strict=True))}
        if expert_counts:  # game p's group was trained so far: its experts take its assignments
            end["expert_counts"] = {"0": [[90, 10, 0, 0], [5, 5, 45, 45]], "1": [[50, 50, 0, 0], [0, 0, 50, 50]]}
        events.append(end)
        if store:
            events.append({"event": "store_stats", "step": (p + 1) * STEPS, "tiers": [
                {"tier": "gpu", "hits": 80 * (p + 1), "misses": 20 * (p + 1), "stall_seconds": 0.1 * p,
                 "bytes_in": 2**20 * p}]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


# MoE-like run: game alpha 10 -> 10 (kept); dense-like run: alpha 10 -> 4 with random 0 (forgot 0.6).
KEPT = [[10.0, 1.0], [10.0, 8.0]]
FORGOT = [[10.0, 1.0], [4.0, 8.0]]


def test_report_renders_every_panel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", KEPT, [0.0, 0.0], expert_counts=True, store=True)
    assert main(["rl", "report", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["retention.png", "returns.png", "experts.png", "store.png"]
    assert printed == [str(run / name) for name in names]
    for name in names:
        assert (run / name).read_bytes()[:8] == PNG_MAGIC
        assert (run / name).stat().st_size > 5000  # a drawn figure, not an empty canvas


def test_report_skips_panels_without_data_and_says_so(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", KEPT, [0.0, 0.0])
    heard: list[str] = []
    paths = render_report(run, log=heard.append)
    assert [p.name for p in paths] == ["retention.png", "returns.png"]
    assert any("expert usage" in line and "expert_counts" in line for line in heard)
    assert any("hit rate" in line and "store_stats" in line for line in heard)
    assert not (run / "experts.png").exists() and not (run / "store.png").exists()


def test_report_of_a_run_killed_mid_line(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", KEPT[:1], [0.0, 0.0])
    with (run / "metrics.jsonl").open("a") as log:
        log.write('{"event": "iteration", "step": 7')  # the write the kill interrupted
    paths = render_report(run, log=lambda line: None)
    assert [p.name for p in paths] == ["retention.png", "returns.png"]


def test_compare_prints_both_runs_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    moe = write_run(tmp_path / "moe", KEPT, [0.0, 0.0])
    dense = write_run(tmp_path / "dense", FORGOT, [0.0, 0.0])
    assert main(["rl", "compare", str(moe), str(dense)]) == 0
    out = capsys.readouterr().out
    assert str(moe) in out and str(dense) in out
    rows = {tuple(line.split()[-4:-2]): line.split()[-2:] for line in out.splitlines() if line.startswith(
        ("forgetting", "forward", "final"))}
    # Forgetting of alpha: 1.0 - 1.0 kept vs 1.0 - 0.4 forgot; beta is last, so it has none.
    assert rows[("better)", "alpha")] == ["0.000", "0.600"]
    assert rows[("better)", "beta")] == ["--", "--"]
    # Transfer to beta from phase 1: 1/8 of its best in both runs; final: (1, 1) vs (0.4, 1).
    assert rows[("transfer", "beta")] == ["0.125", "0.125"]
    assert rows[("return", "mean")] == ["1.000", "0.700"]
    assert compare_runs(moe, dense) == out.rstrip("\n")


@pytest.mark.parametrize("damage", ["missing_dir", "no_retention", "corrupt_retention", "bad_matrix",
                                    "corrupt_metrics", "no_metrics"])
def test_bad_run_directories_exit_2_with_one_line_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    run = write_run(tmp_path / "run", KEPT, [0.0, 0.0])
    culprit = {"missing_dir": tmp_path / "nope", "no_retention": run / "retention.json",
               "corrupt_retention": run / "retention.json", "bad_matrix": run / "retention.json",
               "corrupt_metrics": run / "metrics.jsonl", "no_metrics": run / "metrics.jsonl"}[damage]
    if damage in ("no_retention", "no_metrics"):
        culprit.unlink()
    elif damage == "corrupt_retention":
        culprit.write_text('{"games": ["alpha", "beta"], "matrix": [[1')
    elif damage == "bad_matrix":
        culprit.write_text(json.dumps({"games": GAMES, "matrix": [[1.0, 2.0, 3.0]],
                                       "random_scores": {"alpha": 0, "beta": 0}}))
    elif damage == "corrupt_metrics":
        lines = culprit.read_text().splitlines()
        culprit.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    target = tmp_path / "nope" if damage == "missing_dir" else run
    assert main(["rl", "report", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(culprit) in err
    assert not list(run.glob("*.png"))  # nothing half-written
    if damage not in ("corrupt_metrics", "no_metrics"):  # compare reads only retention.json
        assert main(["rl", "compare", str(target), str(run if damage == "missing_dir" else tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(culprit) in err
