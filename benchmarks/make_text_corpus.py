"""A large text corpus for ``benchmarks/data_stream.py``, built from text already on the machine.

Paragraphs of the shipped sample corpus, of ``/usr/share/common-licenses`` and of the LICENSE files of the
installed Python packages, drawn in a seeded shuffled order until the corpus has the size asked for, written as
``.txt`` files of ``--file-mb`` each (blank lines between paragraphs). Only this generator is in the repository;
the corpus goes under /tmp.

    python benchmarks/make_text_corpus.py --out /tmp/aios_corpus --gib 1.25
"""

from __future__ import annotations

import argparse
import site
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LICENSE_DIRS = [Path("/usr/share/common-licenses"), *(Path(p) for p in site.getsitepackages())]


def source_texts() -> Iterator[str]:
    yield (ROOT / "aios_ray" / "data" / "sample" / "train.txt").read_text(encoding="utf-8")
    for folder in LICENSE_DIRS:
        if not folder.is_dir():
            continue
        pattern = "*" if folder.name == "common-licenses" else "*/LICENSE*"
        for file in sorted(folder.glob(pattern)):
            if file.is_file() and file.stat().st_size < 1 << 20:
                try:
                    yield file.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    continue


def paragraphs() -> list[str]:
    found = {p.strip() for text in source_texts() for p in text.replace("\r\n", "\n").split("\n\n")}
    return sorted(p for p in found if len(p) > 40)


def write_corpus(out: Path, total_bytes: int, file_bytes: int, seed: int) -> int:
    pool = paragraphs()
    encoded = [p.encode("utf-8") + b"\n\n" for p in pool]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < total_bytes:
        size = 0
        with (out / f"part-{index:04d}.txt").open("wb") as handle:
            while size < file_bytes and written + size < total_bytes:
                order = rng.permutation(len(encoded))[:4096]  # a fresh shuffle every 4096 paragraphs
                block = b"".join(encoded[i] for i in order)
                handle.write(block)
                size += len(block)
        written += size
        index += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/aios_corpus")
    parser.add_argument("--gib", type=float, default=1.25, help="corpus size in GiB (at least)")
    parser.add_argument("--file-mb", type=float, default=64.0, help="size of each .txt file (MiB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists: remove it first", file=sys.stderr)
        return 2
    written = write_corpus(out, int(args.gib * (1 << 30)), int(args.file_mb * (1 << 20)), args.seed)
    print(f"corpus: {written / (1 << 30):.2f} GiB in {len(list(out.iterdir()))} files under {out} "
          f"({len(paragraphs())} distinct paragraphs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
