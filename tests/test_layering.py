"""The package's layering, read from the source with ``ast`` (imports anywhere in a module, nested ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aios_ray"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function; relative imports made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
    return found


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        hits = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            bad[str(path.relative_to(PACKAGE.parent))] = hits
    return bad


def test_the_import_reader_sees_nested_and_relative_imports(tmp_path: Path):
    """The check below would pass vacuously if the reader missed imports; show that it does not."""
    module = PACKAGE / "store" / "_probe_for_test.py"
    module.write_text("def f():\n    import ray.util\n    from ..train import loop\n    from . import policy\n")
    try:
        assert imported_modules(module) == {"ray.util", "aios_ray.train", "aios_ray.store"}
        assert offenders("store", ("ray", "aios_ray.train")) == {
            "aios_ray/store/_probe_for_test.py": ["aios_ray.train", "ray.util"]}
    finally:
        module.unlink()


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("store", ("ray", "aios_ray.train", "actors")),  # the store is a component: any training loop may use it
    ("model", ("ray", "aios_ray.train", "aios_ray.store", "actors", "aios_ray.tracking",
               "transformers", "aios_ray.hf")),  # pure torch
    ("hf", ("ray", "actors")),  # the transformers glue loads a bundle for inference, without a cluster
    # registry + goals DB: any tool (CLI, expert training, routing) builds on them; stdlib only, no torch either
    ("experts", ("ray", "aios_ray.train", "aios_ray.store", "actors", "aios_ray.tracking", "torch")),
])
def test_lower_layers_do_not_import_higher_ones(folder: str, forbidden: tuple[str, ...]):
    assert offenders(folder, forbidden) == {}


def test_the_training_loop_has_no_branch_on_where_experts_live():
    """The loop calls the expert backend unconditionally; choosing one happens in ``store.backend``."""
    tree = ast.parse((PACKAGE / "train" / "loop.py").read_text(encoding="utf-8"))
    branches = [ast.unparse(node.test) for node in ast.walk(tree) if isinstance(node, ast.If | ast.IfExp)]
    assert branches, "the reader found no branch at all"
    assert [b for b in branches if "tiered" in b or "experts ==" in b] == []
