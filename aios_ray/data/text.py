"""Reading user text: .txt, .jsonl (one JSON object with a ``text`` field per line) or a folder of them.

Every failure is a DataError naming the file (and line, for JSONL), raised before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from aios_ray.errors import DataError

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
SAMPLE_TRAIN = SAMPLE_DIR / "train.txt"
SAMPLE_EVAL = SAMPLE_DIR / "eval.txt"
TEXT_SUFFIXES = (".txt", ".jsonl")


def dataset_files(path_str: str, flag: str) -> list[Path]:
    path = Path(path_str)
    if not path.exists():
        raise DataError(f"{flag} {path_str}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{flag} {path_str}: folder holds no .txt or .jsonl files")
        return files
    return [path]


def read_documents(path_str: str, flag: str = "--dataset-file", ascii_only: bool = False) -> list[str]:
    """All documents of a file or folder, in a stable order. Blank-line-separated paragraphs of a
    .txt file and the records of a .jsonl file are documents (an end-of-text token separates them)."""
    documents: list[str] = []
    for file in dataset_files(path_str, flag):
        text = _read_text(file)
        docs = _jsonl_documents(file, text) if file.suffix == ".jsonl" else _txt_documents(text)
        if ascii_only:
            docs = [d.encode("ascii", "ignore").decode("ascii") for d in docs]
        documents.extend(d for d in docs if d.strip())
    if not documents:
        raise DataError(f"{flag} {path_str}: no text in it" + (" after --ascii-only" if ascii_only else ""))
    return documents


def _read_text(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    if not raw.strip():
        raise DataError(f"{file}: empty file")
    if b"\0" in raw[:65536]:
        raise DataError(f"{file}: binary file (NUL bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def _txt_documents(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _jsonl_documents(file: Path, text: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{number}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{file}:{number}: expected an object with a string 'text' field")
        docs.append(record["text"])
    return docs
