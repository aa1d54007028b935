"""Goal-aware routing: from the goals DB's active goals (or goals named on the command line) to the per-expert
bias the MoE routers add to their logits (``HRMACTv1.set_expert_bias``).

A brain names the registry experts it holds in its ``metadata.json`` (``attached_experts``: expert id -> index in
every MoE layer), written by expert-only training and ``experts attach``. Goals link to expert ids; the bias is
``strength`` on the indices of the linked experts that the brain holds, 0 elsewhere. Resolved on the driver (one
DB read per run), so workers never open the DB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aios_ray.errors import GoalsError
from aios_ray.experts.goals import Goal, GoalsDB
from aios_ray.experts.registry import ExpertRegistry

ATTACHED_EXPERTS = "attached_experts"  # metadata.json key: {expert id: index in every MoE layer}
DEFAULT_GENERATE_STRENGTH = 2.0  # `generate --goal`: a goal was asked for, so the bias is on unless set to 0


def artifacts_dir() -> Path:
    """``$AIOS_ARTIFACTS`` or ``artifacts``: where the registry and the goals DB live by default."""
    return Path(os.environ.get("AIOS_ARTIFACTS") or "artifacts")


def registry_at(path: str | None) -> ExpertRegistry:
    return ExpertRegistry(path or artifacts_dir() / "experts" / "registry.json")


def goals_at(path: str | None, registry: ExpertRegistry | None = None) -> GoalsDB:
    return GoalsDB(path or artifacts_dir() / "aios.db", registry)


@dataclass
class GoalBias:
    """The routing bias of a run: ``strength`` on ``experts`` (id -> index); ``not_in_brain``: ids linked to the
    goals that this brain does not hold (reported, not an error: a DB serves many brains)."""

    strength: float
    num_experts: int
    experts: dict[str, int] = field(default_factory=dict)
    goals: list[int] = field(default_factory=list)
    not_in_brain: list[str] = field(default_factory=list)

    def vector(self) -> torch.Tensor:
        bias = torch.zeros(self.num_experts)
        for index in self.experts.values():
            bias[index] = self.strength
        return bias

    def event(self) -> dict[str, Any]:
        """The ``goal_bias`` metrics event (without its name)."""
        return {"strength": self.strength, "experts": dict(sorted(self.experts.items())), "goals": self.goals,
                "not_in_brain": self.not_in_brain, "bias": self.vector().tolist()}


def for_active_goals(strength: float, db: str | None, attached: dict[str, int], num_experts: int,
                     also: dict[str, int] | None = None) -> GoalBias | None:
    """The bias towards the experts of every active goal of ``db`` that the brain holds (plus ``also``: the expert
    an expert-only run trains counts as goal-linked); None when ``strength`` is 0 (off)."""
    if strength == 0:
        return None
    goals_db = goals_at(db)
    active = [g for g in goals_db.list(active_only=True) if g.expert_ids]
    return _bias(strength, active, attached, num_experts, also or {})


def for_named_goals(names: list[str], strength: float, db: str | None, attached: dict[str, int],
                    num_experts: int) -> GoalBias:
    """The bias towards the experts of the goals named by id or exact text (``generate --goal``). A goal that is
    not in the DB, or none of whose experts this brain holds, is a GoalsError (one line, exit 2)."""
    goals_db = goals_at(db)
    known = goals_db.list()
    chosen = [_find_goal(name, known, goals_db.path) for name in names]
    for goal in chosen:
        if not any(expert in attached for expert in goal.expert_ids):
            held = ", ".join(sorted(attached)) or "none"
            raise GoalsError(f"goal {goal.goal_id} ({goal.text!r}) links no expert of this brain (its experts: "
                             f"{', '.join(goal.expert_ids) or 'none'}; the brain holds: {held})")
    return _bias(strength, chosen, attached, num_experts, {})


def _find_goal(name: str, goals: list[Goal], path: Path) -> Goal:
    for goal in goals:
        if (name.strip().isdigit() and goal.goal_id == int(name)) or goal.text == name.strip():
            return goal
    raise GoalsError(f"unknown goal {name!r} (no goal with this id or text in {path})")


def _bias(strength: float, goals: list[Goal], attached: dict[str, int], num_experts: int,
          also: dict[str, int]) -> GoalBias:
    linked = sorted({e for g in goals for e in g.expert_ids} | set(also))
    held = {**attached, **also}
    return GoalBias(strength, num_experts, {e: held[e] for e in linked if e in held},
                    [g.goal_id for g in goals], [e for e in linked if e not in held])
