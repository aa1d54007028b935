"""The real command line: bad input is one line + exit 2 with artifacts untouched; eval; help."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from aios_ray.cli import main
from tests.helpers import run_cli

DEBUG = ["train", "--config", "debug", "--no-ray"]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}



@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brains")
    assert main([*DEBUG, "--bundle-dir", str(root), "--brain-name", "b"]) == 0
    return root / "b"


def test_eval_prints_loss_and_perplexity(trained_bundle: Path, capsys):
    code, out, _ = run_cli(["eval", "--model", str(trained_bundle), "--eval-file",
                         "aios_ray/data/sample/eval.txt", "--eval-batches", "2"], capsys)
    assert code == 0
    loss = float(out.split("eval_loss=")[1].split()[0])
    ppl = float(out.split("ppl=")[1].split()[0])
    assert 0 < loss < 20 and ppl == pytest.approx(2.718281828 ** loss, rel=1e-3)


def _bad_inputs(tmp: Path, bundle: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "bin.txt").write_bytes(b"\x00\x01\x02 data")
    (tmp / "latin.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    return [
        (["--dataset-file", str(tmp / "missing.txt")], "missing.txt: no such file"),
        (["--dataset-file", str(tmp / "empty.txt")], "empty.txt: empty file"),
        (["--dataset-file", str(tmp / "bin.txt")], "bin.txt: binary file"),
        (["--dataset-file", str(tmp / "latin.txt")], "latin.txt: not UTF-8"),
        (["--dataset-file", str(tmp / "bad.jsonl")], "bad.jsonl:2: malformed JSON"),
        (["--num-experts", "4", "--num-experts-per-tok", "6"], "--num-experts-per-tok 6 exceeds --num-experts 4"),
        (["--steps", "0"], "--steps must be > 0"),
        (["--batch-size", "-1"], "--batch-size must be > 0"),
        (["--hidden-size", "30", "--num-heads", "4"], "not divisible"),
        (["--config", "no-such-preset"], "unknown preset"),
        (["--brain-name", "../escape"], "not a plain directory name"),
        (["--steps", "many"], "invalid int value"),
        (["--model", str(bundle)], "model.safetensors: corrupt or truncated"),
    ]


def test_bad_input_is_one_line_exit_2_and_touches_nothing(trained_bundle: Path, tmp_path: Path, capsys):
    weights = trained_bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    before = _tree_digest(trained_bundle.parent)
    for flags, message in _bad_inputs(tmp_path, trained_bundle):
        code, _, err = run_cli([*DEBUG, "--bundle-dir", str(trained_bundle.parent), "--brain-name", "new", *flags],
                            capsys)
        assert code == 2, flags
        assert message in err, (flags, err)
        assert err.count("\n") == 1, err
        assert _tree_digest(trained_bundle.parent) == before, flags
    code, _, err = run_cli(["eval", "--model", str(trained_bundle), "--eval-file", "aios_ray/data/sample/eval.txt"],
                        capsys)
    assert code == 2 and "corrupt or truncated" in err


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "aios_ray", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--num-experts-per-tok" in result.stdout
    result = subprocess.run([sys.executable, "-m", "aios_ray", "train", "--top-k", "3"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_plot_renders_a_png(trained_bundle: Path, tmp_path: Path, capsys):
    out = tmp_path / "run.png"
    code, _, _ = run_cli(["plot", "--log-file", str(trained_bundle / "metrics.jsonl"), "--out", str(out)], capsys)
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    code, _, err = run_cli(["plot", "--log-file", str(tmp_path / "bad.jsonl")], capsys)
    assert code == 2 and "bad.jsonl" in err and err.count("\n") == 1
