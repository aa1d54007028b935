"""The expert registry: schema, hierarchy, ids that cannot escape, concurrent writers, and its CLI (bad input is
one line + exit 2 with the files untouched, bytes and mtimes)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from aios_ray.errors import RegistryError
from aios_ray.experts.registry import ENTRY_DEFAULTS, ExpertRegistry, validate_expert_id
from tests.helpers import run_cli, run_together


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime: "nothing changed" means this is equal."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def registry(tmp_path: Path) -> ExpertRegistry:
    reg = ExpertRegistry(tmp_path / "experts" / "registry.json")
    reg.add("root", name="Root", description="general knowledge", category="general")
    reg.add("code", parent_expert_id="root", category="programming")
    reg.add("python", parent_expert_id="code")
    reg.add("math")
    return reg


@pytest.mark.parametrize("good", ["a", "test-expert-004", "Expert_1.v2", "x" * 128])
def test_plain_ids_are_accepted(good: str):
    assert validate_expert_id(good) == good


@pytest.mark.parametrize("bad", ["", "..", ".", "../x", "a/b", "a\\b", "/abs", "a..b", ".hidden", "-flag", "a b",
                                 "x" * 129, "C:evil", "é", None, 3])
def test_path_escaping_or_odd_ids_are_refused(bad: object, tmp_path: Path):
    with pytest.raises(RegistryError, match="expert id"):
        validate_expert_id(bad)
    reg = ExpertRegistry(tmp_path / "registry.json")
    with pytest.raises(RegistryError):
        reg.add(bad)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_entries_follow_the_seed_schema(registry: ExpertRegistry):
    data = json.loads(registry.path.read_text())
    assert data["version"] == 1 and "base_model" in data
    assert [e["expert_id"] for e in data["experts"]] == ["root", "code", "python", "math"]
    for entry in data["experts"]:
        assert set(ENTRY_DEFAULTS) | {"expert_id"} == set(entry)
        assert entry["created_at"].endswith("+00:00")  # ISO-8601 UTC
        assert entry["checkpoint_path"] == f"{entry['expert_id']}/expert.safetensors"  # relative, forward slashes
    assert registry.checkpoint_file("code") == registry.root / "code" / "expert.safetensors"
    assert registry.get("root")["name"] == "Root" and registry.get("math")["name"] == "math"


def test_hierarchy_is_two_sided_and_drawn_as_a_tree(registry: ExpertRegistry):
    assert registry.get("root")["child_expert_ids"] == ["code"]
    assert registry.get("code")["parent_expert_id"] == "root"
    assert registry.get("code")["child_expert_ids"] == ["python"]
    roots = registry.tree()
    assert [r.expert_id for r in roots] == ["root", "math"]
    assert [c.expert_id for c in roots[0].children] == ["code"]
    assert [c.expert_id for c in roots[0].children[0].children] == ["python"]
    with pytest.raises(RegistryError, match="unknown expert 'nope'"):
        registry.add("orphan", parent_expert_id="nope")


def test_update_sets_fields_and_refuses_structure_and_wrong_types(registry: ExpertRegistry):
    entry = registry.update("math", total_activations=12, avg_routing_weight=0.25, last_trained="2026-01-01T00:00:00"
                            "+00:00", training_datasets=["data/math.txt"], checkpoint_path="math\\expert.safetensors")
    assert entry["total_activations"] == 12 and entry["checkpoint_path"] == "math/expert.safetensors"
    assert registry.get("math")["training_datasets"] == ["data/math.txt"]
    before = registry.path.read_bytes()
    for fields, message in (({"parent_expert_id": "root"}, "cannot be changed"),
                            ({"child_expert_ids": []}, "cannot be changed"),
                            ({"is_frozen": "yes"}, "wrong type"),
                            ({"total_activations": True}, "wrong type"),
                            ({"checkpoint_path": "../elsewhere.safetensors"}, "without '..'"),
                            ({"checkpoint_path": "/abs/expert.safetensors"}, "relative")):
        with pytest.raises(RegistryError, match=message):
            registry.update("math", **fields)
    with pytest.raises(RegistryError, match="unknown expert"):
        registry.update("ghost", is_frozen=True)
    assert registry.path.read_bytes() == before


def test_modify_refuses_structure_and_wrong_types(registry: ExpertRegistry):
    before = registry.path.read_bytes()
    with pytest.raises(RegistryError, match="parent_expert_id cannot be changed"):
        registry.modify("code", lambda entry: entry.update(parent_expert_id=None))
    with pytest.raises(RegistryError, match="wrong type"):
        registry.modify("code", lambda entry: entry.update(is_active=1))
    assert registry.path.read_bytes() == before


def test_upsert_adds_then_updates(registry: ExpertRegistry):
    registry.upsert("new", category="poetry")
    registry.upsert("new", is_frozen=True)
    assert registry.get("new")["category"] == "poetry" and registry.get("new")["is_frozen"] is True


def test_delete_refuses_children_unless_recursive_and_removes_folders(registry: ExpertRegistry):
    for expert_id in ("code", "python", "math"):
        (registry.expert_dir(expert_id)).mkdir()
        (registry.expert_dir(expert_id) / "expert.safetensors").write_bytes(b"weights")
    with pytest.raises(RegistryError, match="has children"):
        registry.delete("code")
    assert registry.ids() == {"root", "code", "python", "math"}
    assert registry.delete("code", recursive=True) == ["code", "python"]
    assert registry.ids() == {"root", "math"}
    assert registry.get("root")["child_expert_ids"] == []
    assert not (registry.root / "code").exists() and not (registry.root / "python").exists()
    assert registry.delete("math") == ["math"] and not (registry.root / "math").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b'{"version": 1, "experts": [', "corrupt expert registry"),
    (b"\xff\xfe garbage", "corrupt expert registry"),
    (b'{"some": "other file"}', "not an expert registry"),
    (b"[1, 2]", "not an expert registry"),
    (b'{"version": 1, "experts": [{"name": "no id"}]}', "no expert_id"),
    (b'{"version": 1, "experts": [{"expert_id": "../up"}]}', "expert id"),
    (b'{"version": 1, "experts": [{"expert_id": "a"}, {"expert_id": "a"}]}', "listed twice"),
    (b'{"version": 7, "experts": []}', "newer"),
])
def test_a_registry_that_is_not_ours_is_reported_and_never_overwritten(tmp_path: Path, content: bytes,
                                                                       message: str):
    reg = ExpertRegistry(tmp_path / "registry.json")
    reg.path.write_bytes(content)
    before = snapshot(tmp_path)
    for action in (reg.load, lambda: reg.add("fresh"), lambda: reg.update("a", is_frozen=True),
                   lambda: reg.delete("a"), reg.tree):
        with pytest.raises(RegistryError, match=message):
            action()
    assert reg.path.read_bytes() == content
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".lock")} == before


def test_old_entries_are_filled_in_and_unknown_fields_kept(tmp_path: Path):
    reg = ExpertRegistry(tmp_path / "registry.json")
    reg.path.write_text(json.dumps({"version": 1, "experts": [{"expert_id": "old", "custom": {"x": 1}}]}))
    entry = reg.get("old")
    assert entry["is_active"] is True and entry["custom"] == {"x": 1}
    reg.update("old", is_frozen=True)
    assert json.loads(reg.path.read_text())["experts"][0]["custom"] == {"x": 1}


WRITER = textwrap.dedent("""
    import sys
    from aios_ray.experts.registry import ExpertRegistry
    registry, tag, count = ExpertRegistry(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sys.stdin.readline()  # start together
    for i in range(count):
        registry.add(f"{tag}-{i}", parent_expert_id="root" if i % 2 else None)
        registry.modify("root", lambda entry: entry.update(total_activations=entry["total_activations"] + 1))
""")


def test_two_processes_writing_at_once_lose_no_entry(tmp_path: Path):
    reg = ExpertRegistry(tmp_path / "experts" / "registry.json")
    reg.add("root")
    count = 25
    run_together(WRITER, [[str(reg.path), tag, str(count)] for tag in ("a", "b")])
    expected = {"root"} | {f"{tag}-{i}" for tag in ("a", "b") for i in range(count)}
    assert reg.ids() == expected
    children = reg.get("root")["child_expert_ids"]
    assert sorted(children) == sorted(f"{tag}-{i}" for tag in ("a", "b") for i in range(1, count, 2))
    assert reg.get("root")["total_activations"] == 2 * count  # modify() reads and writes in one critical section


# ---- CLI -----------------------------------------------------------------------------------------------------

def test_cli_manages_the_registry(registry: ExpertRegistry, capsys):
    flags = ["--registry", str(registry.path)]
    registry.update("code", total_activations=42)
    code, out, _ = run_cli(["experts", "show", *flags], capsys)
    assert code == 0
    assert out.splitlines()[1:] == ["root (Root)  activations=0", "└── code  activations=42",
                                    "    └── python  activations=0", "math  activations=0"]
    for argv, field, value in ((["freeze", "code"], "is_frozen", True), (["deactivate", "math"], "is_active", False),
                               (["unfreeze", "code"], "is_frozen", False), (["activate", "math"], "is_active", True),
                               (["deactivate", "python"], "is_active", False)):
        assert run_cli(["experts", *argv, *flags], capsys)[0] == 0
        assert registry.get(argv[1])[field] is value
    code, out, _ = run_cli(["experts", "show", *flags], capsys)
    assert "python  activations=0  [inactive]" in out
    code, out, _ = run_cli(["experts", "list", *flags], capsys)
    assert code == 0 and out.splitlines()[0].split() == ["ID", "NAME", "CATEGORY", "ACTIVE", "FROZEN",
                                                          "ACTIVATIONS", "PARENT"]
    assert out.splitlines()[2].split() == ["code", "code", "programming", "yes", "no", "42", "root"]
    code, out, _ = run_cli(["experts", "show", "code", *flags], capsys)
    assert code == 0 and json.loads(out)["child_expert_ids"] == ["python"]
    code, out, _ = run_cli(["experts", "add", "poetry", "--parent", "root", "--category", "art", *flags], capsys)
    assert code == 0 and registry.get("root")["child_expert_ids"] == ["code", "poetry"]
    code, out, _ = run_cli(["experts", "delete", "code", "--recursive", *flags], capsys)
    assert code == 0 and "deleted code, python" in out and registry.ids() == {"root", "math", "poetry"}


def test_cli_default_paths_follow_the_artifacts_dir(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AIOS_ARTIFACTS", raising=False)
    assert run_cli(["experts", "add", "here"], capsys)[0] == 0
    assert ExpertRegistry(tmp_path / "artifacts" / "experts" / "registry.json").ids() == {"here"}
    monkeypatch.setenv("AIOS_ARTIFACTS", str(tmp_path / "elsewhere"))
    assert run_cli(["experts", "add", "there"], capsys)[0] == 0
    assert ExpertRegistry(tmp_path / "elsewhere" / "experts" / "registry.json").ids() == {"there"}


def test_cli_bad_input_is_one_line_exit_2_and_changes_nothing(registry: ExpertRegistry, tmp_path: Path, capsys):
    flags = ["--registry", str(registry.path), "--db", str(tmp_path / "aios.db")]
    before = snapshot(tmp_path)
    for argv, message in ((["show", "ghost"], "unknown expert 'ghost'"),
                          (["freeze", "ghost"], "unknown expert 'ghost'"),
                          (["delete", "ghost"], "unknown expert 'ghost'"),
                          (["show", "../escape"], "expert id '../escape'"),
                          (["delete", "../../etc"], "expert id"),
                          (["add", "a/b"], "expert id"),
                          (["add", "math"], "already exists"),
                          (["add", "kid", "--parent", "ghost"], "unknown expert 'ghost'"),
                          (["delete", "code"], "has children (python)")):
        code, _, err = run_cli(["experts", *argv, *flags], capsys)
        assert code == 2, argv
        assert message in err and err.count("\n") == 1, (argv, err)
        assert snapshot(tmp_path) == before, argv


def test_cli_corrupt_registry_is_one_line_exit_2_and_left_alone(tmp_path: Path, capsys):
    path = tmp_path / "registry.json"
    path.write_bytes(b'{"version": 1, "experts": [{"expert_id": "a"')
    before = snapshot(tmp_path)
    for argv in (["list"], ["show"], ["show", "a"], ["freeze", "a"], ["delete", "a"], ["add", "b"]):
        code, _, err = run_cli(["experts", *argv, "--registry", str(path)], capsys)
        assert code == 2 and "corrupt expert registry" in err and err.count("\n") == 1, (argv, err)
        assert {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".lock")} == before, argv
