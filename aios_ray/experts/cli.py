"""``aios-ray experts ...`` and ``aios-ray goals ...`` (plus the hyphenated ``goals-add`` spellings).

Parsing and printing only: the work is done by :class:`ExpertRegistry` and :class:`GoalsDB`, whose errors
are UserErrors (one line on stderr, exit code 2, nothing changed).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aios_ray.experts.goals import Goal, GoalsDB
from aios_ray.experts.registry import ExpertRegistry, TreeNode

Handler = Callable[[argparse.Namespace], int]


def artifacts_dir() -> Path:
    """``$AIOS_ARTIFACTS`` or ``artifacts`` (relative to the current directory)."""
    return Path(os.environ.get("AIOS_ARTIFACTS") or "artifacts")


def registry_from(args: argparse.Namespace) -> ExpertRegistry:
    return ExpertRegistry(args.registry or artifacts_dir() / "experts" / "registry.json")


def goals_from(args: argparse.Namespace) -> GoalsDB:
    return GoalsDB(args.db or artifacts_dir() / "aios.db", registry_from(args))


def add_commands(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``experts``, ``goals`` and the ``goals-*`` aliases to the top-level subparsers."""
    experts = commands.add_parser("experts", help="the expert registry (subbrains): list, show, freeze, delete ...")
    sub = experts.add_subparsers(dest="experts_command", required=True, parser_class=parser_class)
    _command(sub, "list", "every expert of the registry, one a line", _experts_list)
    show = _command(sub, "show", "one expert's entry (JSON), or without ID the hierarchy as a tree with usage "
                    "counts", _experts_show)
    show.add_argument("expert_id", nargs="?", metavar="ID")
    add = _command(sub, "add", "register an expert (no weights yet; training writes them)", _experts_add)
    add.add_argument("expert_id", metavar="ID")
    add.add_argument("--name", help="display name (default: the id)")
    add.add_argument("--description", default="")
    add.add_argument("--category", default="general")
    add.add_argument("--parent", metavar="PARENT_ID", help="the parent expert in the hierarchy")
    for name, field, value in (("freeze", "is_frozen", True), ("unfreeze", "is_frozen", False),
                               ("activate", "is_active", True), ("deactivate", "is_active", False)):
        flag = _command(sub, name, f"set {field} to {str(value).lower()}", _experts_flag(field, value))
        flag.add_argument("expert_id", metavar="ID")
    delete = _command(sub, "delete", "remove an expert from the registry and its folder (and its goal links)",
                      _experts_delete)
    delete.add_argument("expert_id", metavar="ID")
    delete.add_argument("--recursive", action="store_true", help="also every descendant (refused without it "
                        "when the expert has children)")

    goals = commands.add_parser("goals", help="the goals DB: goals and their links to experts")
    sub = goals.add_subparsers(dest="goals_command", required=True, parser_class=parser_class)
    for prefix, where in (("", sub), ("goals-", commands)):  # `goals add` and the seed's `goals-add`
        _goals_add(_command(where, prefix + "add", "add an active goal", _cmd_goals_add))
        _goals_link(_command(where, prefix + "link-expert", "link a goal to an expert of the registry",
                             _cmd_goals_link))
        _goals_list(_command(where, prefix + "list", "the goals with their status and experts", _cmd_goals_list))
        _expert_arg(_command(where, prefix + "list-for-expert", "the goals linked to an expert",
                             _cmd_goals_for_expert))
    _goals_link(_command(sub, "unlink-expert", "remove a goal's link to an expert", _cmd_goals_unlink))
    for name in ("activate", "deactivate"):
        _command(sub, name, f"{name} a goal", _cmd_goals_active(name == "activate")).add_argument(
            "goal_id", type=int, metavar="GOAL_ID")


def _command(where: Any, name: str, help_text: str, func: Handler) -> argparse.ArgumentParser:
    parser = where.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--registry", help="expert registry JSON (default: $AIOS_ARTIFACTS or artifacts, "
                        "+ /experts/registry.json)")
    parser.add_argument("--db", help="goals DB (default: $AIOS_ARTIFACTS or artifacts, + /aios.db)")
    parser.set_defaults(func=func)
    return parser


def _goals_add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", metavar="TEXT")
    parser.add_argument("--expert-id", metavar="ID", help="link the new goal to this expert")


def _goals_link(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("goal_id", type=int, metavar="GOAL_ID")
    parser.add_argument("expert_id", metavar="EXPERT_ID")


def _goals_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--active", action="store_true", help="only the active goals")


def _expert_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("expert_id", metavar="ID")


# ---- experts -------------------------------------------------------------------------------------------------

def _experts_list(args: argparse.Namespace) -> int:
    registry = registry_from(args)
    experts = registry.experts()
    if not experts:
        print(f"no experts in {registry.path}")
        return 0
    rows = [("ID", "NAME", "CATEGORY", "ACTIVE", "FROZEN", "ACTIVATIONS", "PARENT")]
    rows += [(e["expert_id"], e["name"], e["category"], _yes(e["is_active"]), _yes(e["is_frozen"]),
              str(e["total_activations"]), e["parent_expert_id"] or "-") for e in experts]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _experts_show(args: argparse.Namespace) -> int:
    registry = registry_from(args)
    if args.expert_id is not None:
        print(json.dumps(registry.get(args.expert_id), indent=2, sort_keys=True))
        return 0
    data = registry.load()
    print(f"{registry.path}: {len(data['experts'])} expert(s), base model {data['base_model'] or '-'}")
    for line in tree_lines(registry.tree()):
        print(line)
    return 0


def tree_lines(roots: list[TreeNode]) -> list[str]:
    """The hierarchy drawn with box characters, one expert a line, with its usage count and flags."""
    lines: list[str] = []

    def walk(node: TreeNode, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        lines.append(prefix + branch + _describe(node.entry))
        inner = prefix + ("" if top else ("    " if last else "│   "))
        for i, child in enumerate(node.children):
            walk(child, inner, i == len(node.children) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return lines


def _describe(entry: dict[str, Any]) -> str:
    name = f" ({entry['name']})" if entry["name"] and entry["name"] != entry["expert_id"] else ""
    flags = [flag for flag, on in (("inactive", not entry["is_active"]), ("frozen", entry["is_frozen"])) if on]
    return (f"{entry['expert_id']}{name}  activations={entry['total_activations']}"
            + (f"  [{', '.join(flags)}]" if flags else ""))


def _experts_add(args: argparse.Namespace) -> int:
    entry = registry_from(args).add(args.expert_id, parent_expert_id=args.parent, name=args.name or args.expert_id,
                                    description=args.description, category=args.category)
    print(f"added expert {entry['expert_id']}")
    return 0


def _experts_flag(field: str, value: bool) -> Handler:
    def run(args: argparse.Namespace) -> int:
        registry_from(args).update(args.expert_id, **{field: value})
        print(f"{args.expert_id}: {field} = {str(value).lower()}")
        return 0

    return run


def _experts_delete(args: argparse.Namespace) -> int:
    registry, goals = registry_from(args), goals_from(args)
    goals.check()  # a goals DB that is not ours fails here, before the registry changes
    removed = registry.delete(args.expert_id, recursive=args.recursive)
    links = sum(goals.forget_expert(expert_id) for expert_id in removed)
    print(f"deleted {', '.join(removed)}" + (f" ({links} goal link(s) dropped)" if links else ""))
    return 0


# ---- goals ---------------------------------------------------------------------------------------------------

def _cmd_goals_add(args: argparse.Namespace) -> int:
    goal = goals_from(args).add(args.text, expert_id=args.expert_id)
    print(f"goal {goal.goal_id} added" + (f", linked to {args.expert_id}" if args.expert_id else ""))
    return 0


def _cmd_goals_link(args: argparse.Namespace) -> int:
    goals_from(args).link_expert(args.goal_id, args.expert_id)
    print(f"goal {args.goal_id} linked to {args.expert_id}")
    return 0


def _cmd_goals_unlink(args: argparse.Namespace) -> int:
    goals_from(args).unlink_expert(args.goal_id, args.expert_id)
    print(f"goal {args.goal_id} unlinked from {args.expert_id}")
    return 0


def _cmd_goals_list(args: argparse.Namespace) -> int:
    _print_goals(goals_from(args).list(active_only=args.active))
    return 0


def _cmd_goals_for_expert(args: argparse.Namespace) -> int:
    _print_goals(goals_from(args).list_for_expert(args.expert_id))
    return 0


def _cmd_goals_active(active: bool) -> Handler:
    def run(args: argparse.Namespace) -> int:
        goal = (goals_from(args).activate if active else goals_from(args).deactivate)(args.goal_id)
        print(f"goal {goal.goal_id}: {'active' if goal.is_active else 'inactive'}")
        return 0

    return run


def _print_goals(goals: list[Goal]) -> None:
    if not goals:
        print("no goals")
        return
    rows = [("ID", "STATUS", "EXPERTS", "TEXT")]
    rows += [(str(g.goal_id), "active" if g.is_active else "inactive", ",".join(g.expert_ids) or "-", g.text)
             for g in goals]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
