"""The goals DB: goals, links to registry experts (mirrored in the registry's ``goals``), active goals for routing,
a DB that is not ours, and the CLI with the seed's hyphenated spellings."""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest

from aios_ray.errors import GoalsError, RegistryError
from aios_ray.experts.goals import APPLICATION_ID, GoalsDB
from aios_ray.experts.registry import ExpertRegistry
from tests.helpers import run_cli, run_together
from tests.test_experts_registry import snapshot


@pytest.fixture
def registry(tmp_path: Path) -> ExpertRegistry:
    reg = ExpertRegistry(tmp_path / "experts" / "registry.json")
    for expert_id in ("summarize", "code", "math"):
        reg.add(expert_id)
    return reg


@pytest.fixture
def db(tmp_path: Path, registry: ExpertRegistry) -> GoalsDB:
    return GoalsDB(tmp_path / "aios.db", registry)


def test_goals_links_and_active_experts(db: GoalsDB, registry: ExpertRegistry):
    assert db.list() == [] and db.experts_for_active_goals() == set() and not db.path.exists()  # reads create nothing
    first = db.add("  Improve summarization quality ", expert_id="summarize")
    second = db.add("Write clean code")
    assert (first.goal_id, first.text, first.is_active, first.expert_ids) == (1, "Improve summarization quality",
                                                                              True, ("summarize",))
    assert first.created_at.endswith("+00:00")
    db.link_expert(second.goal_id, "code")
    db.link_expert(second.goal_id, "math")
    db.link_expert(second.goal_id, "math")  # twice: no-op
    assert db.get(second.goal_id).expert_ids == ("code", "math")
    assert db.experts_for_active_goals() == {"summarize", "code", "math"}
    assert db.deactivate(first.goal_id).is_active is False
    assert db.experts_for_active_goals() == {"code", "math"}
    assert [g.goal_id for g in db.list(active_only=True)] == [second.goal_id]
    assert [g.goal_id for g in db.list()] == [first.goal_id, second.goal_id]
    assert [g.goal_id for g in db.list_for_expert("summarize")] == [first.goal_id]  # inactive ones too
    assert db.activate(first.goal_id).is_active is True
    db.unlink_expert(second.goal_id, "math")
    assert db.experts_for_active_goals() == {"summarize", "code"}


def test_the_registry_goals_mirror_the_db(db: GoalsDB, registry: ExpertRegistry):
    one = db.add("one", expert_id="code")
    two = db.add("two")
    db.link_expert(two.goal_id, "code")
    assert registry.get("code")["goals"] == [one.goal_id, two.goal_id]
    db.unlink_expert(one.goal_id, "code")
    assert registry.get("code")["goals"] == [two.goal_id]
    registry.update("code", goals=[])  # out of step (e.g. a crash between the two writes) ...
    db.sync_registry()  # ... repaired from the DB
    assert registry.get("code")["goals"] == [two.goal_id]


def test_linking_to_an_unknown_expert_or_goal_is_refused_and_changes_nothing(db: GoalsDB, tmp_path: Path):
    db.add("exists")
    before = snapshot(tmp_path)
    with pytest.raises(RegistryError, match="unknown expert 'ghost'"):
        db.add("new goal", expert_id="ghost")
    with pytest.raises(RegistryError, match="unknown expert 'ghost'"):
        db.link_expert(1, "ghost")
    with pytest.raises(RegistryError, match="expert id"):
        db.link_expert(1, "../x")
    with pytest.raises(GoalsError, match="unknown goal id 7"):
        db.link_expert(7, "code")
    with pytest.raises(GoalsError, match="unknown goal id 7"):
        db.deactivate(7)
    with pytest.raises(GoalsError, match="not linked"):
        db.unlink_expert(1, "code")
    with pytest.raises(GoalsError, match="needs some text"):
        db.add("   ")
    assert snapshot(tmp_path) == before
    assert [g.text for g in db.list()] == ["exists"]


GOAL_WRITER = textwrap.dedent("""
    import sys
    from aios_ray.experts.goals import GoalsDB
    from aios_ray.experts.registry import ExpertRegistry
    db = GoalsDB(sys.argv[1], ExpertRegistry(sys.argv[2]))
    sys.stdin.readline()  # start together
    for i in range(int(sys.argv[4])):
        db.add(f"{sys.argv[3]} goal {i}", expert_id="code")
""")


def test_two_processes_adding_linked_goals_at_once_keep_db_and_registry_consistent(db: GoalsDB,
                                                                                    registry: ExpertRegistry):
    count = 15
    run_together(GOAL_WRITER, [[str(db.path), str(registry.path), tag, str(count)] for tag in ("a", "b")])
    goals = db.list_for_expert("code")
    assert len(goals) == 2 * count
    assert registry.get("code")["goals"] == [goal.goal_id for goal in goals]


def _other_programs_db(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE directives (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO directives (text) VALUES ('keep me')")
    conn.close()


def _newer_schema_db(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 99")
        conn.execute("CREATE TABLE goals (id INTEGER PRIMARY KEY)")
    conn.close()


@pytest.mark.parametrize(("make", "message"), [
    (_other_programs_db, "not an aios-ray goals DB"),
    (lambda p: p.write_bytes(b"this is a text file, not SQLite\n" * 40), "not an aios-ray goals DB"),
    (_newer_schema_db, "newer"),
])
def test_a_db_that_is_not_ours_is_reported_and_left_alone(make, message: str, db: GoalsDB, tmp_path: Path):
    make(db.path)
    before = snapshot(tmp_path)
    for action in (db.list, lambda: db.add("x"), lambda: db.add("x", expert_id="code"),
                   lambda: db.link_expert(1, "code"), lambda: db.activate(1), db.experts_for_active_goals,
                   lambda: db.list_for_expert("code"), lambda: db.forget_expert("code")):
        with pytest.raises(GoalsError, match=message):
            action()
    assert snapshot(tmp_path) == before


def test_a_fresh_empty_file_becomes_ours(db: GoalsDB):
    db.path.write_bytes(b"")
    assert db.list() == []
    assert db.add("first").goal_id == 1
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    conn.close()


# ---- CLI -----------------------------------------------------------------------------------------------------

def test_cli_goals_and_the_seed_spellings(registry: ExpertRegistry, tmp_path: Path, capsys):
    flags = ["--registry", str(registry.path), "--db", str(tmp_path / "aios.db")]
    code, out, _ = run_cli(["goals", "add", "Improve summarization quality", "--expert-id", "summarize", *flags],
                           capsys)
    assert code == 0 and "goal 1 added, linked to summarize" in out
    assert run_cli(["goals-add", "Write clean code", *flags], capsys)[0] == 0
    assert run_cli(["goals-link-expert", "2", "code", *flags], capsys)[0] == 0
    assert run_cli(["goals", "link-expert", "2", "math", *flags], capsys)[0] == 0
    assert run_cli(["goals", "deactivate", "1", *flags], capsys)[0] == 0
    code, out, _ = run_cli(["goals", "list", *flags], capsys)
    assert [line.split()[:3] for line in out.splitlines()] == [["ID", "STATUS", "EXPERTS"],
                                                               ["1", "inactive", "summarize"],
                                                               ["2", "active", "code,math"]]
    assert out.splitlines()[1].endswith("Improve summarization quality")
    code, out, _ = run_cli(["goals-list", "--active", *flags], capsys)
    assert [line.split()[0] for line in out.splitlines()] == ["ID", "2"]
    for argv in (["goals", "list-for-expert", "math"], ["goals-list-for-expert", "math"]):
        code, out, _ = run_cli([*argv, *flags], capsys)
        assert [line.split()[0] for line in out.splitlines()] == ["ID", "2"]
    assert run_cli(["goals", "activate", "1", *flags], capsys)[0] == 0
    assert registry.get("code")["goals"] == [2]
    # deleting an expert drops its links too
    code, out, _ = run_cli(["experts", "delete", "math", *flags], capsys)
    assert code == 0 and "1 goal link(s) dropped" in out
    code, out, _ = run_cli(["goals", "list-for-expert", "math", *flags], capsys)
    assert out.strip() == "no goals"


def test_cli_goals_bad_input_is_one_line_exit_2_and_changes_nothing(registry: ExpertRegistry, tmp_path: Path,
                                                                     capsys):
    db_path = tmp_path / "aios.db"
    flags = ["--registry", str(registry.path), "--db", str(db_path)]
    assert run_cli(["goals", "add", "exists", *flags], capsys)[0] == 0
    before = snapshot(tmp_path)
    for argv, message in ((["goals", "link-expert", "1", "ghost"], "unknown expert 'ghost'"),
                          (["goals-add", "new", "--expert-id", "ghost"], "unknown expert 'ghost'"),
                          (["goals", "link-expert", "9", "code"], "unknown goal id 9"),
                          (["goals", "activate", "9"], "unknown goal id 9"),
                          (["goals", "deactivate", "x"], "invalid int value"),
                          (["goals", "list-for-expert", "../x"], "expert id")):
        code, _, err = run_cli([*argv, *flags], capsys)
        assert code == 2, argv
        assert message in err and err.count("\n") == 1, (argv, err)
        assert snapshot(tmp_path) == before, argv


def test_cli_db_not_ours_is_one_line_exit_2_and_left_alone(registry: ExpertRegistry, tmp_path: Path, capsys):
    db_path = tmp_path / "aios.db"
    _other_programs_db(db_path)
    flags = ["--registry", str(registry.path), "--db", str(db_path)]
    before = snapshot(tmp_path)
    for argv in (["goals", "list"], ["goals-add", "x"], ["goals", "link-expert", "1", "code"],
                 ["goals", "activate", "1"], ["goals-list-for-expert", "code"], ["experts", "delete", "math"]):
        code, _, err = run_cli([*argv, *flags], capsys)
        assert code == 2 and "not an aios-ray goals DB" in err and err.count("\n") == 1, (argv, err)
        assert snapshot(tmp_path) == before, argv
    assert registry.ids() == {"summarize", "code", "math"}
