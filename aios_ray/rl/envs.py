"""The games an agent plays: ALE Atari, MinAtar, and a tiny synthetic suite for tests.

Every suite has ONE observation space and ONE action space shared by all of its games, so a single
policy module (one set of input and output layers) plays every game of a run:

- ``atari``: ``ALE/<Game>-v5`` with the full 18-action set, v5 sticky actions (0.25), and the standard
  preprocessing (noop starts, frame skip 4 with a max-pool over the last 2 frames, 84x84 grayscale,
  the last 4 frames stacked) -> ``uint8 (84, 84, 4)``.
- ``minatar``: ``MinAtar/<Game>-v0`` (all 6 actions); the game's boolean ``(10, 10, C)`` channels are
  kept in place and zero-padded to 10 -> ``float32 (10, 10, 10)``.
- ``synthetic``: :class:`SyntheticGameEnv`, for fast tests only (never a benchmark); the same spaces
  as MinAtar so the same module plays both.

Observations are channels-last (height, width, channels) in every suite: it is the layout ALE and
MinAtar produce and RLlib's own Atari preprocessing and CNN encoders expect, so a module permutes
once to torch's NCHW inside its forward pass instead of each env transposing every frame.

Gym registration of ALE and MinAtar happens inside :func:`make_env`, never at import: RLlib builds the
envs in EnvRunner processes, which never see a registration done in the driver (ray issue 52486).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from aios_ray.errors import ConfigError

SUITES = ("atari", "minatar", "synthetic")
RLLIB_ENV = "aios_ray_games"  # the name register_rllib_env gives env_creator in Ray's registry

MINATAR_GAMES = ("Breakout", "SpaceInvaders", "Freeway", "Asterix", "Seaquest")
MINATAR_CHANNELS = 10  # Seaquest has the most channels of the five games; the others are padded to it.

SYNTHETIC_GAMES = tuple(f"synth{i}" for i in range(6))

ATARI_FRAME = 84
ATARI_STACK = 4
ATARI_ACTIONS = 18  # the full action set: the same action index means the same joystick move in every game
ATARI_STICKY = 0.25  # the v5 default (Machado et al. 2018)

# The options each suite accepts in make_env(**options); anything else is a typo the user should hear of.
_OPTIONS = {
    "atari": frozenset(
        {"repeat_action_probability", "max_num_frames_per_episode", "noop_max", "terminal_on_life_loss", "render_mode"}
    ),
    "minatar": frozenset({"sticky_action_prob", "difficulty_ramping"}),
    "synthetic": frozenset({"episode_len"}),
}


# ---------------------------------------------------------------------------------------------------------------------
# Names


@functools.cache
def atari_games() -> tuple[str, ...]:
    """Every game ale-py registers as ``ALE/<Game>-v5``, sorted (104 in ale-py 0.12)."""
    _register_ale()
    return tuple(
        sorted(k[len("ALE/") : -len("-v5")] for k in gym.registry if k.startswith("ALE/") and k.endswith("-v5"))
    )


def suite_games(suite: str) -> tuple[str, ...]:
    """The games a suite knows, by their canonical names."""
    suite = validate_suite(suite)
    if suite == "atari":
        return atari_games()
    return MINATAR_GAMES if suite == "minatar" else SYNTHETIC_GAMES


def validate_suite(suite: str) -> str:
    """The suite's canonical (lower-case) name, or ConfigError naming the unknown one."""
    name = str(suite).strip().lower()
    if name not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
    return name


def canonical_game(suite: str, game: str) -> str:
    """The game's canonical name in its suite (matching ignores case), or ConfigError listing the known ones."""
    known = suite_games(suite)
    by_lower = {g.lower(): g for g in known}
    name = by_lower.get(str(game).strip().lower())
    if name is None:
        raise ConfigError(f"unknown {validate_suite(suite)} game {game!r}: known games are {', '.join(known)}")
    return name


def validate_games(suite: str, games: str | Iterable[str]) -> list[str]:
    """The run's game list in canonical names; ConfigError for an unknown suite or game, an empty list, duplicates.

    ``games`` is a list or the CLI's comma-separated string (``"Breakout,Freeway"``).
    """
    suite = validate_suite(suite)
    raw = games.split(",") if isinstance(games, str) else list(games)
    names = [canonical_game(suite, g) for g in raw if str(g).strip()]
    if not names:
        raise ConfigError(f"no games given for suite {suite!r}: name at least one of {', '.join(suite_games(suite))}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"game {name!r} is listed twice in {', '.join(names)}: each game is one phase")
        seen.add(name)
    return names


def game_index(suite: str, games: Sequence[str], game: str) -> int:
    """The game's position in the run's list (its expert group, its row in the retention matrix)."""
    names = validate_games(suite, games)
    name = canonical_game(suite, game)
    if name not in names:
        raise ConfigError(f"game {name!r} is not in this run's games ({', '.join(names)})")
    return names.index(name)


def env_id(suite: str, game: str) -> str:
    """The gymnasium id of a real game (``ALE/Pong-v5``, ``MinAtar/Breakout-v0``); the synthetic suite has none."""
    suite = validate_suite(suite)
    name = canonical_game(suite, game)
    if suite == "atari":
        return f"ALE/{name}-v5"
    if suite == "minatar":
        return f"MinAtar/{name}-v0"
    raise ConfigError(f"the synthetic game {name!r} has no gymnasium id; build it with make_env")


def suite_spaces(suite: str) -> tuple[spaces.Box, spaces.Discrete]:
    """The observation and action space every game of the suite shares (to build a module without an env)."""
    suite = validate_suite(suite)
    if suite == "atari":
        shape = (ATARI_FRAME, ATARI_FRAME, ATARI_STACK)
        return spaces.Box(0, 255, shape, np.uint8), spaces.Discrete(ATARI_ACTIONS)
    shape = (10, 10, MINATAR_CHANNELS)
    return spaces.Box(0.0, 1.0, shape, np.float32), spaces.Discrete(6)


# ---------------------------------------------------------------------------------------------------------------------
# Building envs


def make_env(suite: str, game: str, seed: int | None = None, **options: Any) -> gym.Env:
    """One game of a suite, with the suite's shared observation and action spaces (see the module docstring).

    Every ``reset``/``step`` info carries ``"game"``: the canonical name (a label for the environment detector).
    ``seed`` seeds the first ``reset()`` that is not given a seed of its own (and the action space), so the
    env's whole trajectory under a fixed action sequence is reproducible. Options per suite:
    atari: repeat_action_probability, max_num_frames_per_episode, noop_max, terminal_on_life_loss,
    render_mode; minatar: sticky_action_prob, difficulty_ramping; synthetic: episode_len.
    """
    suite = validate_suite(suite)
    name = canonical_game(suite, game)
    unknown = sorted(set(options) - _OPTIONS[suite])
    if unknown:
        raise ConfigError(
            f"unknown {suite} env option(s) {', '.join(unknown)}: accepted are {', '.join(sorted(_OPTIONS[suite]))}"
        )
    if suite == "atari":
        env = _make_atari(name, **options)
    elif suite == "minatar":
        env = _make_minatar(name, **options)
    else:
        env = SyntheticGameEnv(SYNTHETIC_GAMES.index(name), **options)
    env = _GameInInfo(env, name)
    return _SeedFirstReset(env, seed) if seed is not None else env


def env_creator(env_config: Mapping[str, Any]) -> gym.Env:
    """RLlib's env creator, registered by :func:`register_rllib_env`; ``env_config``: ``{"suite", "game", "seed"}``.

    RLlib calls it with an ``EnvContext`` (a dict subclass) in every EnvRunner process; the registration the
    env needs happens in here, so it reaches those processes. ``seed`` (optional) is the env's own default
    seed; RLlib's ``.debugging(seed=...)`` takes precedence and gives each vectorized sub-env its own seed,
    which this creator cannot do: every sub-env of a runner receives the same config. An optional
    ``options`` dict is passed on to :func:`make_env`.
    """
    missing = [k for k in ("suite", "game") if k not in env_config]
    if missing:
        raise ConfigError(f"env_config lacks {', '.join(missing)}: it needs 'suite' and 'game' (and may give 'seed')")
    options = dict(env_config.get("options") or {})
    seed = env_config.get("seed")
    return make_env(env_config["suite"], env_config["game"], None if seed is None else int(seed), **options)


def register_rllib_env(name: str = RLLIB_ENV) -> str:
    """Registers :func:`env_creator` with Ray under ``name`` and returns the name, for
    ``PPOConfig().environment(env=name, env_config={...})``: RLlib's new API stack takes an env class or a
    registered name, not a bare function. Ray ships the registration to every worker process.
    """
    from ray.tune.registry import register_env

    register_env(name, env_creator)
    return name


def _register_ale() -> None:
    import ale_py

    gym.register_envs(ale_py)


def _make_atari(game: str, *, noop_max: int = 30, terminal_on_life_loss: bool = False, **make_kwargs: Any) -> gym.Env:
    _register_ale()
    spec = gym.spec(f"ALE/{game}-v5")
    _check_rom(game, spec.kwargs["game"])
    make_kwargs.setdefault("repeat_action_probability", ATARI_STICKY)
    # frameskip=1 in ALE: AtariPreprocessing skips 4 frames itself and max-pools the last two, which removes
    # the flicker of sprites drawn on alternate frames (ALE's own frameskip keeps only the last frame).
    base = gym.make(spec.id, frameskip=1, full_action_space=True, **make_kwargs)
    env = gym.wrappers.AtariPreprocessing(
        base,
        noop_max=noop_max,
        frame_skip=4,
        screen_size=ATARI_FRAME,
        terminal_on_life_loss=terminal_on_life_loss,
        grayscale_obs=True,
        scale_obs=False,
    )
    env = gym.wrappers.FrameStackObservation(env, ATARI_STACK)
    return _ChannelsLast(env)


def _check_rom(game: str, rom_id: str) -> None:
    """A ConfigError naming the game when its ROM is absent or damaged (ale-py would fail deep inside reset)."""
    from ale_py import roms

    try:
        path = roms.get_rom_path(rom_id)
    except (OSError, NotADirectoryError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"Atari game {game!r}: its ROM {rom_id}.bin cannot be loaded ({detail})") from exc
    if path is None:
        raise ConfigError(f"Atari game {game!r}: ale-py has no ROM {rom_id}.bin")


def _make_minatar(game: str, **kwargs: Any) -> gym.Env:
    if f"MinAtar/{game}-v0" not in gym.registry:  # registering twice makes gymnasium warn about every id
        from minatar.gym import register_envs

        register_envs()
    with warnings.catch_warnings():
        # gymnasium flags every -v0 as out of date because a -v1 exists; -v1 is each game's minimal action
        # set, and a module that plays all five games needs v0's full 6-action set.
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(f"MinAtar/{game}-v0", **kwargs)
    return _PadChannels(env, MINATAR_CHANNELS)


# ---------------------------------------------------------------------------------------------------------------------
# Wrappers


class _ChannelsLast(gym.ObservationWrapper):
    """(stack, H, W) from FrameStackObservation -> (H, W, stack), the layout of the module docstring."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        stack, height, width = env.observation_space.shape
        self.observation_space = spaces.Box(0, 255, (height, width, stack), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(observation, 0, -1))


class _PadChannels(gym.ObservationWrapper):
    """MinAtar's bool (10, 10, C) -> float32 (10, 10, channels): the game's C channels first, zeros after."""

    def __init__(self, env: gym.Env, channels: int) -> None:
        super().__init__(env)
        height, width, own = env.observation_space.shape
        if own > channels:
            raise ConfigError(
                f"{env.spec.id if env.spec else env} has {own} channels, more than the {channels} padded to"
            )
        self.own_channels = own
        self.observation_space = spaces.Box(0.0, 1.0, (height, width, channels), np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        out = np.zeros(self.observation_space.shape, np.float32)
        out[..., : self.own_channels] = observation
        return out


class _GameInInfo(gym.Wrapper):
    """Adds ``info["game"]``, so frames collected from a vector env or an RLlib episode keep their label."""

    def __init__(self, env: gym.Env, game: str) -> None:
        super().__init__(env)
        self.game_name = game

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, {**info, "game": self.game_name}

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "game": self.game_name}


class _SeedFirstReset(gym.Wrapper):
    """Seeds the first reset that comes without a seed (and the action space), once; an explicit seed wins."""

    def __init__(self, env: gym.Env, seed: int) -> None:
        super().__init__(env)
        self._pending_seed: int | None = seed
        self.action_space.seed(seed)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic suite


class SyntheticGameEnv(gym.Env):
    """A tiny multi-game env for fast tests only (never a benchmark): game ``synth<k>`` of :data:`SYNTHETIC_GAMES`.

    Observation: float32 (10, 10, 10), the MinAtar space, so the module that plays MinAtar plays this too.
    - channels 0-7: the game's fixed random pattern (density 0.2, drawn from the game index), the same on every
      step, so a small CNN tells the games apart from a single frame;
    - channel 8: one random distractor cell per step;
    - channel 9: the cue ``c`` in {0, 1, 2}, a lit band of rows ``3c .. 3c+2``, drawn afresh each step.
    Reward: 1 when the action equals ``(c + k) % 6``, else 0. The same cue wants a different action in every
    game, so a policy must recognise the game (and a policy trained on one game alone loses the others).
    Episodes are ``episode_len`` steps (default 20, then ``terminated``): the best return is ``episode_len``,
    a uniformly random policy averages a sixth of it. Everything random comes from the env's seeded np_random.
    """

    metadata = {"render_modes": []}
    NUM_CUES = 3
    NUM_ACTIONS = 6

    def __init__(self, game: int, episode_len: int = 20) -> None:
        if not 0 <= int(game) < len(SYNTHETIC_GAMES):
            raise ConfigError(f"synthetic game index {game} is outside 0..{len(SYNTHETIC_GAMES) - 1}")
        if int(episode_len) <= 0:
            raise ConfigError(f"synthetic episode_len must be > 0, got {episode_len}")
        self.game = int(game)
        self.episode_len = int(episode_len)
        self.observation_space = spaces.Box(0.0, 1.0, (10, 10, MINATAR_CHANNELS), np.float32)
        self.action_space = spaces.Discrete(self.NUM_ACTIONS)
        pattern_rng = np.random.default_rng(1000 + self.game)
        self._pattern = (pattern_rng.random((10, 10, 8)) < 0.2).astype(np.float32)
        self._cue = 0
        self._t = 0

    def correct_action(self, cue: int | None = None) -> int:
        """The rewarded action for ``cue`` (default: the cue now shown)."""
        return ((self._cue if cue is None else cue) + self.game) % self.NUM_ACTIONS

    @property
    def cue(self) -> int:
        return self._cue

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return self._draw(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = 1.0 if int(action) == self.correct_action() else 0.0
        self._t += 1
        terminated = self._t >= self.episode_len
        return self._draw(), reward, terminated, False, {}

    def _draw(self) -> np.ndarray:
        self._cue = int(self.np_random.integers(self.NUM_CUES))
        obs = np.zeros(self.observation_space.shape, np.float32)
        obs[..., :8] = self._pattern
        row, col = self.np_random.integers(10, size=2)
        obs[row, col, 8] = 1.0
        obs[3 * self._cue : 3 * self._cue + 3, :, 9] = 1.0
        return obs
