"""The RL environments: one observation and action space per suite, preprocessing, the synthetic games,
seeding, the RLlib creator, and every bad input naming its culprit."""

from __future__ import annotations

import subprocess
import sys
from itertools import combinations

import gymnasium as gym
import numpy as np
import pytest

from aios_ray.errors import ConfigError, UserError
from aios_ray.rl import envs

SUITE_SAMPLES = {
    "atari": ["Pong", "Breakout", "SpaceInvaders"],
    "minatar": list(envs.MINATAR_GAMES),
    "synthetic": list(envs.SYNTHETIC_GAMES),
}
MINATAR_OWN_CHANNELS = {"Breakout": 4, "SpaceInvaders": 6, "Freeway": 7, "Asterix": 4, "Seaquest": 10}


def rollout(env: gym.Env, actions: list[int], seed: int | None = None) -> list[np.ndarray]:
    """Observations of one episode under a fixed action sequence (resetting if the game ends early)."""
    obs, _ = env.reset(seed=seed)
    seen = [obs]
    for action in actions:
        obs, _, terminated, truncated, _ = env.step(action)
        seen.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()
    return seen


def synthetic_cue(obs: np.ndarray) -> int:
    """The cue the synthetic env shows: which 3-row band of channel 9 is lit."""
    return int(np.argmax([obs[3 * c : 3 * c + 3, :, 9].sum() for c in range(envs.SyntheticGameEnv.NUM_CUES)]))


def episode_return(env: gym.Env, policy, seed: int) -> float:
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += float(reward)
        done = terminated or truncated
    return total


@pytest.mark.parametrize("suite", envs.SUITES)
def test_every_game_of_a_suite_has_the_suites_spaces(suite):
    obs_space, act_space = envs.suite_spaces(suite)
    for game in SUITE_SAMPLES[suite]:
        env = envs.make_env(suite, game, seed=0)
        assert env.observation_space == obs_space, game
        assert env.action_space == act_space, game
        obs, info = env.reset()
        obs2, _, _, _, info2 = env.step(act_space.n - 1)  # the highest action index is legal in every game
        assert info["game"] == info2["game"] == game  # the label the environment detector learns from
        for o in (obs, obs2):
            assert o.shape == obs_space.shape and o.dtype == obs_space.dtype, game
            assert obs_space.contains(o), game
        env.close()
    if suite == "atari":
        assert (obs_space.shape, obs_space.dtype, act_space.n) == ((84, 84, 4), np.uint8, 18)
    else:
        assert (obs_space.shape, obs_space.dtype, act_space.n) == ((10, 10, 10), np.float32, 6)


@pytest.mark.filterwarnings("ignore:.*is out of date")  # the raw -v0 env built below, for comparison
@pytest.mark.parametrize("game", envs.MINATAR_GAMES)
def test_minatar_padding_keeps_the_games_channels_and_zero_fills_the_rest(game):
    padded = envs.make_env("minatar", game)
    raw = gym.make(f"MinAtar/{game}-v0")  # make_env registered MinAtar
    own = raw.observation_space.shape[-1]
    assert own == MINATAR_OWN_CHANNELS[game]
    actions = [int(a) for a in np.random.default_rng(1).integers(6, size=60)]
    for p, r in zip(rollout(padded, actions, seed=5), rollout(raw, actions, seed=5), strict=True):
        np.testing.assert_array_equal(p[..., :own], r.astype(np.float32))
        assert not p[..., own:].any()
    # The game's channels carry its objects (not all zero), so the comparison above compared something.
    assert any(p[..., :own].any() for p in rollout(padded, actions[:5], seed=5))


def test_atari_pong_preprocessing():
    env = envs.make_env("atari", "pong", seed=3)  # names match case-insensitively
    ale = env.unwrapped.ale
    obs, _ = env.reset()
    assert obs.shape == (84, 84, 4) and obs.dtype == np.uint8 and obs.flags["C_CONTIGUOUS"]
    # v5 sticky actions and the full action set, with the emulator stepping one frame per ALE call ...
    assert ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert env.action_space.n == 18 and len(ale.getLegalActionSet()) == 18
    # ... and four emulator frames per agent step (frame skip 4).
    frame = ale.getEpisodeFrameNumber()
    for _ in range(20):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not (terminated or truncated)
    assert ale.getEpisodeFrameNumber() - frame == 80
    # After a few steps the ball and paddles move: the stack holds four different frames, oldest first.
    frames = [obs[..., i] for i in range(4)]
    assert all(not np.array_equal(a, b) for a, b in combinations(frames, 2))
    nxt, *_ = env.step(0)
    np.testing.assert_array_equal(nxt[..., :3], obs[..., 1:])


def test_a_missing_rom_is_a_config_error_naming_the_game(monkeypatch, tmp_path):
    monkeypatch.setenv("ALE_ROMS_DIR", str(tmp_path))  # ale-py looks for its ROMs here instead of the wheel
    with pytest.raises(ConfigError, match="Atari game 'Pong'.*pong.bin") as info:
        envs.make_env("atari", "Pong")
    assert "\n" not in str(info.value)


def test_synthetic_games_look_different():
    first = {g: envs.make_env("synthetic", g).reset(seed=0)[0] for g in envs.SYNTHETIC_GAMES}
    for a, b in combinations(envs.SYNTHETIC_GAMES, 2):
        # Compared on the game-pattern channels: the cue and distractor channels are per-step noise.
        assert not np.array_equal(first[a][..., :8], first[b][..., :8]), (a, b)
    # The pattern is the game's own: the same on every step of every episode.
    env = envs.make_env("synthetic", "synth2")
    for obs in rollout(env, [0] * 30, seed=9):
        np.testing.assert_array_equal(obs[..., :8], first["synth2"][..., :8])


def test_the_synthetic_rule_earns_the_max_return_and_random_play_does_not():
    rng = np.random.default_rng(0)
    for k, game in enumerate(envs.SYNTHETIC_GAMES):
        env = envs.make_env("synthetic", game)
        best = env.unwrapped.episode_len
        scripted = [episode_return(env, lambda o, k=k: (synthetic_cue(o) + k) % 6, seed=s) for s in range(3)]
        random_ = [episode_return(env, lambda o: int(rng.integers(6)), seed=s) for s in range(20)]
        assert scripted == [best] * 3, game
        assert np.mean(random_) < best / 2, game
        # Another game's rule scores nothing here: the same cue wants a different action in each game.
        other = (k + 1) % 6
        assert episode_return(env, lambda o, j=other: (synthetic_cue(o) + j) % 6, seed=0) == 0.0


@pytest.mark.parametrize(("suite", "game"), [("atari", "Pong"), ("minatar", "Seaquest"), ("synthetic", "synth3")])
def test_a_seed_fixes_the_trajectory(suite, game):
    actions = [int(a) for a in np.random.default_rng(2).integers(6, size=40)]

    def run(seed: int) -> np.ndarray:
        env = envs.make_env(suite, game, seed=seed)
        observations = np.stack(rollout(env, actions))  # make_env's seed serves the unseeded first reset
        env.close()
        return observations

    np.testing.assert_array_equal(run(11), run(11))
    assert not np.array_equal(run(11), run(12))


def test_an_explicit_reset_seed_wins_over_the_env_seed():
    actions = [0] * 10
    a = rollout(envs.make_env("synthetic", "synth0", seed=1), actions, seed=4)
    b = rollout(envs.make_env("synthetic", "synth0", seed=2), actions, seed=4)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_validate_games_canonicalises_and_game_index_orders():
    assert envs.validate_games("MinAtar", "breakout, SPACEINVADERS,Freeway") == ["Breakout", "SpaceInvaders", "Freeway"]
    assert envs.validate_games("atari", ["pong", "MsPacman"]) == ["Pong", "MsPacman"]
    games = ["Freeway", "Breakout"]
    assert [envs.game_index("minatar", games, g) for g in ("freeway", "Breakout")] == [0, 1]
    assert len(envs.atari_games()) > 50 and "Pong" in envs.atari_games()


@pytest.mark.parametrize(
    ("call", "culprit"),
    [
        (lambda: envs.validate_games("nes", ["Mario"]), "unknown suite 'nes'.*atari, minatar, synthetic"),
        (lambda: envs.validate_games("minatar", ["Breakout", "Pong"]), "unknown minatar game 'Pong'.*Breakout"),
        (lambda: envs.validate_games("atari", ["Pongg"]), "unknown atari game 'Pongg'.*Pong"),
        (lambda: envs.validate_games("minatar", []), "no games given for suite 'minatar'"),
        (lambda: envs.validate_games("minatar", " , "), "no games given"),
        (lambda: envs.validate_games("minatar", "Breakout,Freeway,breakout"), "'Breakout' is listed twice"),
        (lambda: envs.make_env("synthetic", "synth9"), "unknown synthetic game 'synth9'.*synth0"),
        (lambda: envs.make_env("atari", "Pong", frame_skip=2), "unknown atari env option.*frame_skip"),
        (lambda: envs.make_env("synthetic", "synth0", episode_len=0), "episode_len must be > 0"),
        (lambda: envs.game_index("minatar", ["Breakout"], "Freeway"), "'Freeway' is not in this run's games"),
        (lambda: envs.env_creator({"game": "Breakout"}), "env_config lacks suite"),
        (lambda: envs.env_id("synthetic", "synth0"), "no gymnasium id"),
    ],
)
def test_bad_input_is_a_one_line_config_error_naming_the_culprit(call, culprit):
    with pytest.raises(ConfigError, match=culprit) as info:
        call()
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_env_creator_builds_from_a_dict_and_an_rllib_env_context():
    from ray.rllib.env.env_context import EnvContext

    config = {"suite": "minatar", "game": "asterix", "seed": 7}
    plain = envs.env_creator(config)
    ctx = envs.env_creator(EnvContext(config, worker_index=1, num_workers=2))
    assert plain.observation_space == ctx.observation_space == envs.suite_spaces("minatar")[0]
    actions = [int(a) for a in np.random.default_rng(0).integers(6, size=30)]
    np.testing.assert_array_equal(np.stack(rollout(plain, actions)), np.stack(rollout(ctx, actions)))
    # RLlib's EnvRunner wraps the creator into a gymnasium vector env; options reach make_env.
    gym.register("aios-test-synthetic-v0", entry_point=lambda: envs.env_creator({**config, "suite": "synthetic",
                                                                                "game": "synth1",
                                                                                "options": {"episode_len": 5}}))
    try:
        vec = gym.make_vec("aios-test-synthetic-v0", num_envs=2, vectorization_mode="sync")
        obs, _ = vec.reset(seed=0)
        assert obs.shape == (2, 10, 10, 10)
        ends = [vec.step(np.zeros(2, dtype=np.int64))[2] for _ in range(5)]
        assert ends[-1].all() and not any(e.any() for e in ends[:-1])
    finally:
        gym.registry.pop("aios-test-synthetic-v0")


def test_env_creator_registers_the_games_itself_in_a_fresh_process():
    # An RLlib EnvRunner process imports only the creator's module; nothing registered in the driver reaches it.
    code = (
        "from aios_ray.rl.envs import env_creator\n"
        "for suite, game in [('atari', 'Breakout'), ('minatar', 'Freeway')]:\n"
        "    obs, _ = env_creator({'suite': suite, 'game': game, 'seed': 0}).reset()\n"
        "    print(suite, obs.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "atari (84, 84, 4)" in out.stdout and "minatar (10, 10, 10)" in out.stdout


@pytest.mark.filterwarnings("ignore:.*Overriding environment")  # RLlib re-registers its env id at each make_env
def test_an_rllib_env_runner_plays_the_registered_games_and_switches_in_place():
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    config = (
        PPOConfig()
        .environment(env=envs.register_rllib_env(), env_config={"suite": "synthetic", "game": "synth0"})
        .env_runners(num_envs_per_env_runner=2)
        .rl_module(model_config={"conv_filters": [[8, [3, 3], 1]], "head_fcnet_hiddens": [16]})
    )
    runner = SingleAgentEnvRunner(config=config)
    assert runner.env.single_observation_space == envs.suite_spaces("synthetic")[0]

    def games_played() -> set[str]:
        episodes = runner.sample(num_timesteps=20, random_actions=True)
        return {info["game"] for episode in episodes for info in episode.get_infos()}

    assert games_played() == {"synth0"}
    # The sequential schedule moves a runner to the next game by swapping its env_config and rebuilding the env.
    runner.config.environment(env_config={"suite": "synthetic", "game": "synth4"})
    runner.make_env()
    assert games_played() == {"synth4"}
    runner.stop()
