"""Build the small English sample corpus shipped in ``aios_ray/data/sample``.

The text is the prose found in the docstrings of the CPython standard library installed with the
running interpreter. Modules are read with :mod:`ast` only (never imported), so building the corpus
has no side effects and needs no third-party packages.

Run::

    python -m aios_ray.data.build_sample_corpus [--stdlib-dir DIR] [--out-dir DIR]

The output is byte-for-byte deterministic for a given Python version: files are visited in sorted
order, the train/eval split depends only on each module's relative path, and nothing depends on the
clock, the environment or hash randomisation.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import platform
import re
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "sample"
REBUILD_COMMAND = "python -m aios_ray.data.build_sample_corpus"

# Directory names whose contents are test code or third-party packages, not standard-library prose.
# Matching any path component also covers nested ones such as ``lib2to3/tests`` (whose data files are
# deliberately broken Python) and IDLE's tests, which 3.11 keeps in ``idlelib/idle_test``.
SKIP_DIR_NAMES = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})

EVAL_MODULUS = 20  # About 1 module in 20 goes to eval.
MIN_DOC_CHARS = 50  # Shorter docstrings are mostly one-line signatures ("Return self+value.").
MIN_PARAGRAPH_CHARS = 20
MIN_LETTER_FRACTION = 0.6  # Below this a line is usually a table, signature or expression.
MAX_PROSE_INDENT = 8  # Deeper indentation after cleaning is nearly always a code or table block.

_CODE_LINE = re.compile(
    r"""^(?:
        (?:def|class|import|from|return|raise|yield|assert|async|await|with|for|while|if|elif|else
           |try|except|finally|lambda|print)\b.*[:(=]   # statements (with code punctuation)
        | [\w.\[\]]+\s*[-+*/%|&]?=\s*\S                  # assignments: x = 1, a.b += 2
        | [\w.]+\(.*\)\s*$                               # a bare call: f(x, y)
        | [\w.]+\([^)]*$                                 # an unclosed call: f(a, b,
        | [(#@$%{}\[\]<>|]                               # tuples, comments, decorators, markup, tables
        | .*\s\#\s                                       # code followed by an inline comment
    )""",
    re.VERBOSE,
)
_WHITESPACE = re.compile(r"\s+")


@dataclass
class Corpus:
    """The documents of one split, each with the stdlib module (relative path) it came from."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    @property
    def documents(self) -> list[str]:
        """Documents in output order."""
        return [document for _, document in self.entries]

    @property
    def modules(self) -> int:
        """Number of modules that contributed at least one document."""
        return len({module for module, _ in self.entries})

    def text(self) -> str:
        """Documents separated by one blank line, ending with a single newline."""
        return "\n\n".join(self.documents) + "\n" if self.documents else ""


def iter_source_files(stdlib_dir: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix path, path)`` for every stdlib ``.py`` file, in sorted order."""
    found: list[tuple[str, Path]] = []
    for path in stdlib_dir.rglob("*.py"):
        rel = path.relative_to(stdlib_dir)
        if any(part in SKIP_DIR_NAMES for part in rel.parts[:-1]):
            continue
        if path.is_file():
            found.append((rel.as_posix(), path))
    # rglob order depends on the file system; sorting on the posix string makes it reproducible.
    found.sort(key=lambda item: item[0])
    yield from found


def parse_module(path: Path) -> ast.Module | None:
    """Parse a source file, or return ``None`` when it is not valid Python for this interpreter."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            # Old modules contain invalid escape sequences; those warnings are noise here.
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None


def iter_docstrings(tree: ast.Module) -> Iterator[str]:
    """Yield module, class and function docstrings in source order."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [node for node in ast.walk(tree) if isinstance(node, kinds)]
    # ast.walk is breadth-first; source order keeps related docstrings together in the output.
    nodes.sort(key=lambda node: (getattr(node, "lineno", 0), getattr(node, "col_offset", 0)))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


def letter_fraction(text: str) -> float:
    """Fraction of the non-space characters that are ASCII letters."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(1 for c in chars if c.isascii() and c.isalpha()) / len(chars)


def parses_as_code(text: str) -> bool:
    """Tell whether a line is valid, non-trivial Python (prose almost never parses)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    # A lone word ("Example", "None") or dotted name parses too but is harmless as text.
    trivial = (ast.Name, ast.Constant, ast.Attribute)
    return not (
        len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, trivial)
    )


def is_prose_line(line: str) -> bool:
    """Tell whether one docstring line reads as prose rather than code, doctest or markup."""
    stripped = line.strip()
    if not stripped or stripped.startswith((">>>", "...")):
        return False
    if len(line) - len(line.lstrip(" ")) > MAX_PROSE_INDENT:
        return False
    if _CODE_LINE.match(stripped) or parses_as_code(stripped):
        return False
    return letter_fraction(stripped) >= MIN_LETTER_FRACTION


def prose_lines(doc: str) -> list[str]:
    """Stripped prose lines of a docstring, with ``""`` wherever a paragraph ends or text was dropped.

    A dropped line also ends the paragraph so that text on either side of a code sample is not
    joined into one sentence.
    """
    lines: list[str] = []
    literal_indent: int | None = None  # Set while inside a reST literal block (after "::").
    for raw in doc.expandtabs(8).split("\n"):
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip(" "))
        if literal_indent is not None:
            if not stripped or indent > literal_indent:
                lines.append("")
                continue
            literal_indent = None
        if stripped.endswith("::"):
            # reST: the indented block that follows is a literal (code) block.
            literal_indent = indent
            stripped, raw = stripped[:-1], raw.rstrip()[:-1]
        lines.append(stripped if is_prose_line(raw) else "")
    return lines


def is_clean_paragraph(paragraph: str) -> bool:
    """Keep only printable-ASCII paragraphs that are long and wordy enough to be prose."""
    if len(paragraph) < MIN_PARAGRAPH_CHARS:
        return False
    # Non-ASCII text would need a different tokenizer story; dropping the paragraph is simplest.
    if not all(32 <= ord(c) < 127 for c in paragraph):
        return False
    return letter_fraction(paragraph) >= MIN_LETTER_FRACTION


def clean_docstring(doc: str) -> list[str]:
    """Turn a cleaned docstring into prose paragraphs, one line each."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*prose_lines(doc), ""]:
        if line:
            current.append(line)
            continue
        paragraph = _WHITESPACE.sub(" ", " ".join(current)).strip()
        current = []
        if is_clean_paragraph(paragraph):
            paragraphs.append(paragraph)
    return paragraphs


def build_document(doc: str, seen: set[str]) -> str | None:
    """Return one document for a docstring, or ``None`` when too little new prose remains.

    ``seen`` holds every paragraph already emitted (in either split); it is updated only when the
    document is kept, so a dropped short docstring does not suppress text elsewhere.
    """
    fresh: list[str] = []
    for paragraph in clean_docstring(doc):
        if paragraph not in seen and paragraph not in fresh:
            fresh.append(paragraph)
    document = "\n".join(fresh)
    if len(document) < MIN_DOC_CHARS:
        return None
    seen.update(fresh)
    return document


def is_eval_module(rel_path: str) -> bool:
    """Stable split on the module path: crc32 does not depend on PYTHONHASHSEED."""
    return zlib.crc32(rel_path.encode("utf-8")) % EVAL_MODULUS == 0


def build(stdlib_dir: Path) -> tuple[Corpus, Corpus]:
    """Collect the train and eval corpora from a standard-library directory."""
    train, evaluation = Corpus(), Corpus()
    seen: set[str] = set()
    for rel_path, path in iter_source_files(stdlib_dir):
        tree = parse_module(path)
        if tree is None:
            continue
        documents = [d for d in (build_document(doc, seen) for doc in iter_docstrings(tree)) if d]
        if not documents:
            continue
        target = evaluation if is_eval_module(rel_path) else train
        target.entries.extend((rel_path, document) for document in documents)
    # Paragraph dedup already keeps splits disjoint; this also rules out an eval document that is a
    # substring of a longer train paragraph, so the eval set cannot leak verbatim.
    train_text = train.text()
    evaluation.entries = [entry for entry in evaluation.entries if entry[1] not in train_text]
    return train, evaluation


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_markdown(train: Corpus, evaluation: Corpus, train_path: Path, eval_path: Path) -> str:
    """Provenance notes for the shipped corpus."""
    rows = [
        ("train.txt", train, train_path),
        ("eval.txt", evaluation, eval_path),
    ]
    table = "\n".join(
        f"| {name} | {corpus.modules} | {len(corpus.documents)} | {path.stat().st_size} | "
        f"`{sha256_of(path)}` |"
        for name, corpus, path in rows
    )
    return f"""# Sample corpus: provenance

## Source

Prose taken from the docstrings (module, class and function) of the CPython
{platform.python_version()} standard library, read with `ast` without importing any module.

- Python version: {platform.python_version()}
- `sys.version`: `{sys.version}`

## License

The Python standard library, docstrings included, is distributed under the
Python Software Foundation License Version 2 (PSF License Version 2); Python
documentation since 3.8.6 is also available under the Zero-Clause BSD license.
See https://docs.python.org/3/license.html.

## Rebuild

```
{REBUILD_COMMAND}
```

The output is byte-for-byte deterministic for the same Python version.

## Selection and split

- Files: every `.py` file under the stdlib directory in sorted path order, skipping
  `test/`, `tests/`, `idlelib/idle_test/` and `site-packages/` directories and files
  that do not parse.
- Kept: prose lines only (no doctest, indented/code-like or mostly non-letter lines);
  wrapped lines joined into one line per paragraph; printable-ASCII paragraphs only;
  identical paragraphs kept once; documents shorter than {MIN_DOC_CHARS} characters dropped.
- One document per docstring; documents are separated by one blank line.
- Split by module file: a module goes to eval when
  `zlib.crc32(relative_posix_path) % {EVAL_MODULUS} == 0`, otherwise to train.

## Files

| file | modules | documents | bytes | sha256 |
|---|---|---|---|---|
{table}
"""


def write_outputs(train: Corpus, evaluation: Corpus, out_dir: Path) -> None:
    """Write train.txt, eval.txt and SOURCE.md (ASCII, ``\\n`` line endings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out_dir / "train.txt", out_dir / "eval.txt"
    train_path.write_bytes(train.text().encode("ascii"))
    eval_path.write_bytes(evaluation.text().encode("ascii"))
    notes = source_markdown(train, evaluation, train_path, eval_path)
    (out_dir / "SOURCE.md").write_bytes(notes.encode("utf-8"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stdlib-dir",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="standard-library directory to read (default: the running interpreter's)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"output folder (default: {DEFAULT_OUT_DIR})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the corpus and print its counts."""
    args = parse_args(argv)
    train, evaluation = build(args.stdlib_dir)
    write_outputs(train, evaluation, args.out_dir)
    for name, corpus in (("train", train), ("eval", evaluation)):
        size = (args.out_dir / f"{name}.txt").stat().st_size
        print(f"{name}: modules={corpus.modules} documents={len(corpus.documents)} bytes={size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
