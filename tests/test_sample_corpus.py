"""Checks on the shipped sample corpus in ``aios_ray/data/sample`` and on its builder."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "aios_ray" / "data" / "sample"
FILES = ("train.txt", "eval.txt", "SOURCE.md")


def _documents(text: str) -> list[str]:
    """Documents are separated by one blank line."""
    return [doc for doc in text.split("\n\n") if doc.strip()]


def _recorded_python_version() -> str | None:
    match = re.search(r"^- Python version: (\S+)$", (SAMPLE_DIR / "SOURCE.md").read_text("utf-8"), re.M)
    return match.group(1) if match else None


@pytest.mark.parametrize("name", FILES)
def test_shipped_file_exists(name: str) -> None:
    assert (SAMPLE_DIR / name).is_file()


@pytest.mark.parametrize("name", ["train.txt", "eval.txt"])
def test_corpus_is_printable_ascii(name: str) -> None:
    text = (SAMPLE_DIR / name).read_bytes().decode("ascii")
    assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in text)


def test_source_notes_are_utf8() -> None:
    (SAMPLE_DIR / "SOURCE.md").read_bytes().decode("utf-8")
    assert _recorded_python_version() is not None


def test_sizes() -> None:
    assert (SAMPLE_DIR / "train.txt").stat().st_size >= 1_000_000
    assert _documents((SAMPLE_DIR / "eval.txt").read_text("ascii"))


def test_no_eval_document_in_train() -> None:
    train = (SAMPLE_DIR / "train.txt").read_text("ascii")
    leaked = [doc for doc in _documents((SAMPLE_DIR / "eval.txt").read_text("ascii")) if doc in train]
    assert not leaked, leaked[:3]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the corpus is built from the 3.11 stdlib")
def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    recorded = _recorded_python_version()
    if recorded != platform.python_version():
        # Docstrings change between patch releases; byte equality is promised per Python version.
        pytest.skip(f"shipped corpus was built with Python {recorded}, running {platform.python_version()}")
    subprocess.run(
        [sys.executable, "-m", "aios_ray.data.build_sample_corpus", "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name
