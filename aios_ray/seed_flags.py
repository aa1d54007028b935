"""The flags the project's seed documents gave users (``aios hrm-hf train-actv1``, ``autotune``, ``flow hrm-train``,
the RL prototype's ``run.py``) that this CLI spells differently, or that have no meaning on Ray.

Three kinds, one table each, keyed by the ``aios-ray`` command they belong to:

- ``ALIASES``: the seed's spelling of a flag that exists here with the same meaning (same value, same dest);
- ``TRAIN_PASSTHROUGH``: flags that autotune and the flow accepted and handed to every training run;
- ``ANSWERS``: flags with no meaning here; given one, the command exits 2 with one line naming what to use.

Every other seed flag is an ``aios-ray`` flag under its own name (``tests/test_seed_flags.py`` holds the full list).
"""

from __future__ import annotations

import argparse
from typing import Any

ALIASES: dict[str, dict[str, str]] = {
    "train": {"--world-size": "--num-workers"},
    "autotune": {"--moe-balance-min": "--moe-lb-min", "--moe-balance-max": "--moe-lb-max"},
    "rl sequential": {  # the RL prototype's run.py spelled its flags with underscores
        "--num_experts": "--num-experts", "--top_k": "--num-experts-per-tok",
        "--steps_per_game": "--steps-per-game", "--expert_hidden_dim": "--expert-hidden",
        "--expert_dim": "--hidden", "--hbm_capacity": "--capacity-gpu", "--dram_capacity": "--capacity-dram",
    },
}

TRAIN_PASSTHROUGH: dict[str, tuple[str, ...]] = {"autotune": ("--wandb",), "flow hrm-train": ("--wandb",)}

ANSWERS: dict[str, dict[str, str]] = {
    "rl sequential": {
        "--mode": "`rl sequential` is the training run (--suite synthetic|minatar|atari picks the games: "
                  "train_atari is --suite atari); the prototype's test mode is `pytest tests/test_rl_*.py`",
        "--num_games": "name the games instead: --games Breakout,SpaceInvaders,... (their order is the "
                       "order of play)",
        "--num_layers": "use --moe-layers N (residual MoE blocks between the encoder and the heads)",
        "--context_len": "the agent sees one stacked observation per step, not a window of past steps; "
                         "frame stacking is the suite's (--suite atari stacks 4 frames)",
    },
}


class _Answer(argparse.Action):
    """A seed flag with no meaning here: one line naming the equivalent, exit 2 (at parse time, before any work)."""

    def __init__(self, option_strings: list[str], dest: str, answer: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS, **kwargs)
        self.answer = answer

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} (a seed flag) has no meaning here: {self.answer}")


class _PassToTrain(argparse.Action):
    """A training flag given to autotune or the flow: handed to every training run, after --train-args."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest="seed_train_flags", nargs=0, default=[], **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), str(option_string)])


def seed_train_flags(args: argparse.Namespace) -> list[str]:
    """The training flags autotune / the flow were given directly (``TRAIN_PASSTHROUGH``)."""
    return list(getattr(args, "seed_train_flags", []))


def add_seed_flags(parser: argparse.ArgumentParser) -> None:
    """Register every alias, pass-through and answer on the ``aios-ray`` command it belongs to."""
    for command in {*ALIASES, *TRAIN_PASSTHROUGH, *ANSWERS}:
        sub = _subcommand(parser, command)
        for alias, target in ALIASES.get(command, {}).items():
            _add_alias(sub, alias, target)
        for flag in TRAIN_PASSTHROUGH.get(command, ()):
            sub.add_argument(flag, action=_PassToTrain, help="handed to every training run (as in --train-args)")
        for flag, answer in ANSWERS.get(command, {}).items():
            sub.add_argument(flag, action=_Answer, answer=answer, help=f"seed flag; here: {answer}")


def _subcommand(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for word in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _add_alias(parser: argparse.ArgumentParser, alias: str, target: str) -> None:
    """``alias`` sets what ``target`` sets (same dest, type and constant), so the rest of the CLI never sees it."""
    action = parser._option_string_actions[target]
    kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS, "help": f"the seed's {target}"}
    if isinstance(action, argparse._StoreConstAction):
        kwargs.update(action="store_const", const=action.const)
    else:
        kwargs.update(type=action.type, metavar=action.metavar)
    parser.add_argument(alias, **kwargs)
