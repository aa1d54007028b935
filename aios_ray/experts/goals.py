"""The goals (directives) DB: ``artifacts/aios.db``, SQLite from the standard library.

Two tables: ``goals`` (id, text, is_active, timestamps) and ``goal_experts`` (which goal is linked to which
expert). The DB is the source of truth for links. Each expert's ``goals`` list in the registry is a mirror,
recomputed from the DB (ids of every goal linked to it, active or not) after each change to that expert's
links; recomputing is idempotent, so a crash between the DB commit and the registry write is repaired by the
next change to that expert or by :meth:`GoalsDB.sync_registry`.

The file is ours when its SQLite header carries our ``application_id`` (a fresh, table-less file becomes
ours on the first write); anything else (another program's DB, a non-SQLite file, a newer schema) raises
:class:`GoalsError` and is left byte for byte as it was. Reads never create the file.

Kept free of torch, ray and the training loop: goal-aware routing calls :meth:`experts_for_active_goals`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from aios_ray.errors import GoalsError
from aios_ray.experts.registry import ExpertRegistry, utc_now, validate_expert_id

APPLICATION_ID = 0x41494F53  # "AIOS" in the SQLite header: how a goals DB of ours is told from any other DB
SCHEMA_VERSION = 1  # PRAGMA user_version
_SCHEMA = """
CREATE TABLE goals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE goal_experts (
    goal_id INTEGER NOT NULL REFERENCES goals(id) ON DELETE CASCADE,
    expert_id TEXT NOT NULL,
    linked_at TEXT NOT NULL,
    PRIMARY KEY (goal_id, expert_id)
);
CREATE INDEX goal_experts_by_expert ON goal_experts(expert_id);
"""


@dataclass(frozen=True)
class Goal:
    goal_id: int
    text: str
    is_active: bool
    created_at: str
    updated_at: str
    expert_ids: tuple[str, ...]


class GoalsDB:
    """The goals DB at ``path``. ``registry`` is needed to link goals to experts (the expert must exist there,
    and its ``goals`` mirror is kept up to date); everything else works without it."""

    def __init__(self, path: Path | str, registry: ExpertRegistry | None = None) -> None:
        self.path = Path(path)
        self.registry = registry

    # ---- reading -------------------------------------------------------------------------------------------

    def list(self, active_only: bool = False) -> list[Goal]:
        """Every goal (or the active ones), oldest first."""
        where = "WHERE g.is_active = 1" if active_only else ""
        return self._goals(where, ())

    def list_for_expert(self, expert_id: str) -> list[Goal]:
        """The goals linked to ``expert_id``, active or not (the id need not be in the registry any more)."""
        validate_expert_id(expert_id)
        return self._goals("WHERE g.id IN (SELECT goal_id FROM goal_experts WHERE expert_id = ?)", (expert_id,))

    def get(self, goal_id: int) -> Goal:
        found = self._goals("WHERE g.id = ?", (goal_id,))
        if not found:
            raise GoalsError(f"unknown goal id {goal_id} (not in {self.path})")
        return found[0]

    def experts_for_active_goals(self) -> set[str]:
        """Ids of the experts linked to at least one active goal: what goal-aware routing biases towards."""
        with self._reading() as conn:
            if conn is None:
                return set()
            rows = conn.execute("SELECT DISTINCT l.expert_id FROM goal_experts l JOIN goals g ON g.id = l.goal_id "
                                "WHERE g.is_active = 1").fetchall()
        return {row[0] for row in rows}

    def check(self) -> None:
        """GoalsError unless the DB is absent, empty or ours: lets a caller validate it before changing
        anything else (e.g. ``experts delete`` drops the deleted experts' links here after the registry)."""
        with self._reading():
            pass

    def _goals(self, where: str, params: tuple[object, ...]) -> list[Goal]:
        with self._reading() as conn:
            if conn is None:
                return []
            rows = conn.execute(f"SELECT g.id, g.text, g.is_active, g.created_at, g.updated_at FROM goals g {where} "
                                f"ORDER BY g.id", params).fetchall()
            links = _links(conn, [row[0] for row in rows])
        return [Goal(row[0], row[1], bool(row[2]), row[3], row[4], tuple(links.get(row[0], ()))) for row in rows]

    # ---- writing -------------------------------------------------------------------------------------------

    def add(self, text: str, expert_id: str | None = None) -> Goal:
        """A new active goal, linked to ``expert_id`` if given (checked against the registry first)."""
        text = text.strip()
        if not text:
            raise GoalsError("a goal needs some text")
        if expert_id is not None:
            self._require_expert(expert_id)
        now = utc_now()
        with self._writing(create=True) as conn:
            goal_id = conn.execute("INSERT INTO goals (text, is_active, created_at, updated_at) VALUES (?, 1, ?, ?)",
                                   (text, now, now)).lastrowid
            if expert_id is not None:
                conn.execute("INSERT INTO goal_experts VALUES (?, ?, ?)", (goal_id, expert_id, now))
        if expert_id is not None:
            self._mirror([expert_id])
        return self.get(goal_id)

    def link_expert(self, goal_id: int, expert_id: str) -> Goal:
        """Link a goal to an expert of the registry (linking twice is a no-op)."""
        self._require_expert(expert_id)
        with self._writing() as conn:
            self._require_goal(conn, goal_id)
            conn.execute("INSERT OR IGNORE INTO goal_experts VALUES (?, ?, ?)", (goal_id, expert_id, utc_now()))
        self._mirror([expert_id])
        return self.get(goal_id)

    def unlink_expert(self, goal_id: int, expert_id: str) -> Goal:
        validate_expert_id(expert_id)
        with self._writing() as conn:
            self._require_goal(conn, goal_id)
            if not conn.execute("SELECT 1 FROM goal_experts WHERE goal_id = ? AND expert_id = ?",
                                (goal_id, expert_id)).fetchone():
                raise GoalsError(f"goal {goal_id} is not linked to expert {expert_id!r}")
            conn.execute("DELETE FROM goal_experts WHERE goal_id = ? AND expert_id = ?", (goal_id, expert_id))
        self._mirror([expert_id])
        return self.get(goal_id)

    def activate(self, goal_id: int) -> Goal:
        return self._set_active(goal_id, True)

    def deactivate(self, goal_id: int) -> Goal:
        return self._set_active(goal_id, False)

    def forget_expert(self, expert_id: str) -> int:
        """Drop every link to ``expert_id`` (it was deleted from the registry); how many there were. An absent
        DB stays absent."""
        validate_expert_id(expert_id)
        if not self.path.exists():
            return 0
        with self._writing() as conn:
            return conn.execute("DELETE FROM goal_experts WHERE expert_id = ?", (expert_id,)).rowcount

    def sync_registry(self) -> None:
        """Rewrite every registry expert's ``goals`` mirror from the DB."""
        if self.registry is not None:
            self._mirror(sorted(self.registry.ids()))

    def _set_active(self, goal_id: int, active: bool) -> Goal:
        with self._writing() as conn:
            self._require_goal(conn, goal_id)
            conn.execute("UPDATE goals SET is_active = ?, updated_at = ? WHERE id = ?",
                         (int(active), utc_now(), goal_id))
        return self.get(goal_id)

    def _require_expert(self, expert_id: str) -> None:
        if self.registry is None:
            raise GoalsError("linking a goal to an expert needs the expert registry")
        self.registry.get(expert_id)  # RegistryError: invalid id, unknown expert, or a registry not ours

    def _require_goal(self, conn: sqlite3.Connection, goal_id: int) -> None:
        if not conn.execute("SELECT 1 FROM goals WHERE id = ?", (goal_id,)).fetchone():
            raise GoalsError(f"unknown goal id {goal_id} (not in {self.path})")

    def _mirror(self, expert_ids: Iterable[str]) -> None:
        """Each expert's registry ``goals`` := the ids of its linked goals in the DB (experts no longer in the
        registry are skipped). The DB is read with the registry's lock held: of two processes changing one
        expert's links at once, the one that writes last has read the DB after both commits."""
        if self.registry is None:
            return
        present = self.registry.ids()
        for expert_id in expert_ids:
            if expert_id in present:
                self.registry.modify(expert_id, lambda entry, e=expert_id: entry.__setitem__(
                    "goals", [goal.goal_id for goal in self.list_for_expert(e)]))

    # ---- connections ---------------------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        """A read-only connection to our DB; None when there is no DB yet (or a fresh, empty one)."""
        if not self.path.exists():
            yield None
            return
        with self._connect("ro") as conn:
            yield conn if self._recognise(conn) else None

    @contextmanager
    def _writing(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: concurrent writers queue on SQLite's lock). Ownership is
        checked before anything is written; an error rolls everything back. Without ``create`` an absent
        DB is not created (the caller then names a goal that cannot exist)."""
        if not self.path.exists() and not create:
            raise GoalsError(f"{self.path}: no goals DB yet (add a goal first)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect("rwc" if create else "rw") as conn:
            self._recognise(conn)  # before the write lock: a file that is not ours is never touched
            _sql(self.path, conn.execute, "BEGIN IMMEDIATE")
            try:
                if not self._recognise(conn):
                    if not create:
                        raise GoalsError(f"{self.path}: empty goals DB (add a goal first)")
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            _sql(self.path, conn.execute, "COMMIT")

    @contextmanager
    def _connect(self, mode: str) -> Iterator[sqlite3.Connection]:
        uri = f"{self.path.resolve().as_uri()}?mode={mode}"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise GoalsError(f"{self.path}: cannot open the goals DB ({exc})") from None
        with closing(conn):
            try:
                yield conn
            except sqlite3.DatabaseError as exc:
                raise GoalsError(f"{self.path}: goals DB error ({exc})") from None

    def _recognise(self, conn: sqlite3.Connection) -> bool:
        """True for a goals DB of ours, False for a fresh empty one; GoalsError for anything else."""
        app_id, = _sql(self.path, conn.execute, "PRAGMA application_id").fetchone()
        version, = conn.execute("PRAGMA user_version").fetchone()
        tables, = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if app_id == 0 and version == 0 and tables == 0:
            return False
        if app_id != APPLICATION_ID:
            raise GoalsError(f"{self.path}: not an aios-ray goals DB (another program's SQLite file); left as it is")
        if version > SCHEMA_VERSION:
            raise GoalsError(f"{self.path}: goals DB schema {version} is newer than this aios-ray reads "
                             f"({SCHEMA_VERSION}); left as it is")
        return True


def _sql(path: Path, execute: Callable[[str], sqlite3.Cursor], statement: str) -> sqlite3.Cursor:
    """``execute(statement)`` with "file is not a database" and friends as a one-line GoalsError."""
    try:
        return execute(statement)
    except sqlite3.DatabaseError as exc:
        raise GoalsError(f"{path}: not an aios-ray goals DB ({exc}); left as it is") from None


def _links(conn: sqlite3.Connection, goal_ids: list[int]) -> dict[int, list[str]]:
    """goal id -> its linked expert ids, sorted (all links are read: the table is small, and an IN list of
    every goal id could pass SQLite's limit on bound variables)."""
    wanted = set(goal_ids)
    out: dict[int, list[str]] = {}
    for goal_id, expert_id in conn.execute("SELECT goal_id, expert_id FROM goal_experts ORDER BY expert_id"):
        if goal_id in wanted:
            out.setdefault(goal_id, []).append(expert_id)
    return out
