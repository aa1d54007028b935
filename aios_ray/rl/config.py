"""Settings of a sequential multi-game RL run (``aios-ray rl sequential``): one dataclass, validated in
``__post_init__``; the CLI builds its flags from these fields (the help text is the ``--help``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from aios_ray.config import ConfigError, StoreConfig, _check_name, _opt, _positive, build_section, read_yaml_sections


@dataclass
class RLConfig:
    suite: str = _opt("minatar", "game suite: 'atari' (ALE, 84x84x4), 'minatar' (10x10 boards) or 'synthetic' "
                                 "(tests only)")
    games: str = _opt("Breakout,SpaceInvaders,Freeway", "games in the order they are played, comma-separated")
    steps_per_game: int = _opt(50_000, "env steps of training per game and visit")
    cycles: int = _opt(1, "visit the list of games this many times")
    num_experts: int = _opt(8, "experts per MoE layer (shared ones included)")
    num_experts_per_tok: int = _opt(2, "experts each observation is routed to (top-k)")
    shared_experts: int = _opt(2, "experts every game may use; the rest are split into one group per game")
    expert_hidden: int = _opt(128, "hidden width of one expert")
    hidden: int = _opt(128, "feature width: the encoder's output and the MoE blocks' residual stream")
    moe_layers: int = _opt(1, "residual MoE blocks between the encoder and the heads")
    dense: bool = _opt(False, "baseline: a dense SwiGLU FFN with the MoE's active parameters per step")
    routing: str = _opt("groups", "'groups': the router is restricted to the active game's group (plus shared "
                                  "experts); 'free': unrestricted (the ablation)")
    shared_training: str = _opt("auto", "'first': the shared parameters (encoder, policy head, shared experts, "
                                        "routers) train in the first phase only, later phases train only the game's "
                                        "own experts and the value head; 'always': everything trains in every phase; "
                                        "'auto': 'first' with routing groups, 'always' for --dense or --routing free")
    game_heads: bool = _opt(True, "one policy head and one value head per game, picked like its expert group (by "
                                  "the schedule in training, by the detector at evaluation); --no-game-heads: one "
                                  "shared pair")
    lb_coef: float = _opt(0.01, "weight of the MoE load-balance loss in the PPO loss")
    lr: float = _opt(5e-4, "PPO learning rate")
    num_env_runners: int = _opt(0, "RLlib env runner actors (0: sample in the driver process)")
    num_envs_per_env_runner: int = _opt(8, "vectorised environments per env runner")
    rollout_length: int = _opt(64, "env steps per environment per sample (rollout fragment length)")
    minibatch_size: int = _opt(256, "PPO minibatch size")
    num_epochs: int = _opt(4, "PPO epochs over each train batch")
    eval_episodes: int = _opt(5, "episodes per game at each evaluation")
    eval_greedy: bool = _opt(False, "evaluate with the policy's most likely action (default: sample from it)")
    detector_frames: int = _opt(128, "frames of the current game the environment detector learns from per "
                                     "training iteration")
    seed: int = _opt(0, "seed of the environments, the module and the detector")
    run_dir: str | None = _opt(None, "where the run writes metrics, the retention matrix and checkpoints; "
                                     "default artifacts/rl/<run-name>")
    run_name: str = _opt("sequential", "name of the run directory under artifacts/rl")
    checkpoint_every: int = _opt(0, "also checkpoint every this many PPO iterations (0: at the end of each phase "
                                    "only)")

    def __post_init__(self) -> None:
        for name in ("steps_per_game", "cycles", "num_experts", "num_experts_per_tok", "expert_hidden", "hidden",
                     "moe_layers", "lr", "num_envs_per_env_runner", "rollout_length", "minibatch_size",
                     "num_epochs", "eval_episodes", "detector_frames"):
            _positive(name, getattr(self, name))
        if min(self.num_env_runners, self.shared_experts, self.lb_coef, self.checkpoint_every) < 0:
            raise ConfigError("--num-env-runners, --shared-experts, --lb-coef and --checkpoint-every must be >= 0")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"--num-experts-per-tok {self.num_experts_per_tok} exceeds --num-experts "
                              f"{self.num_experts}")
        if self.routing not in ("groups", "free"):
            raise ConfigError(f"--routing {self.routing!r}: expected 'groups' or 'free'")
        if self.shared_training not in ("auto", "first", "always"):
            raise ConfigError(f"--shared-training {self.shared_training!r}: expected 'auto', 'first' or 'always'")
        if self.shared_training == "first" and (self.dense or self.routing != "groups"):
            raise ConfigError("--shared-training first needs routing groups: with --dense or --routing free every "
                              "game shares every parameter, and nothing would train after the first phase")
        _check_name("--run-name", self.run_name)

    @property
    def freezes_shared(self) -> bool:
        """Whether phases after the first train only the game's own parameters (see ``shared_training``)."""
        if self.shared_training == "auto":
            return not self.dense and self.routing == "groups"
        return self.shared_training == "first"

    @property
    def train_batch_size(self) -> int:
        """One iteration's samples: every environment of every runner (the driver's when there are none)."""
        return max(self.num_env_runners, 1) * self.num_envs_per_env_runner * self.rollout_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rl_config_from_dict(values: dict[str, Any], source: str = "config") -> RLConfig:
    return build_section(RLConfig, values, source)


def load_rl_yaml(name_or_path: str) -> dict[str, Any]:
    """The ``rl:`` (and optional ``store:``) sections of a preset or YAML file, validated, naming the file."""
    path, data = read_yaml_sections(name_or_path, "rl, and optionally store")
    if "rl" not in data or set(data) - {"rl", "store"}:
        raise ConfigError(f"{path}: expected a mapping section 'rl:' (and optionally 'store:')")
    rl_config_from_dict(data["rl"], source=str(path))  # validate early, naming the file
    build_section(StoreConfig, data.get("store") or {}, str(path))
    return {**data["rl"], **({"store": data["store"]} if data.get("store") else {})}
