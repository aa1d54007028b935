"""The environment detector: trained online on labelled frames, it names the game; SwitchWatch counts how many
frames after a switch it needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aios_ray.rl.detector import DetectorTrainer, EnvironmentDetector, SwitchWatch


def test_switch_watch_counts_frames_until_the_new_game_is_named_steadily():
    watch = SwitchWatch(settle=3)
    for predicted in (0, 0, 0, 0):  # game 0 named from its first frame
        watch.observe(0, predicted)
    for predicted in (0, 0, 1, 0, 1, 1, 1, 1):  # game 1: right from the 5th frame on (a relapse at the 4th)
        watch.observe(1, predicted)
    assert watch.detected_after == [1, 5]
    for predicted in (1, 1, 1, 1, 1):  # game 2 never named: no entry, still pending
        watch.observe(2, predicted)
    assert watch.detected_after == [1, 5] and watch.pending


@pytest.mark.parametrize("obs_shape, dtype", [((10, 10, 10), np.float32), ((84, 84, 4), np.uint8)])
def test_detector_output_shape_for_both_frame_kinds(obs_shape, dtype):
    detector = EnvironmentDetector(obs_shape, num_games=3)
    frames = torch.as_tensor(np.zeros((5, *obs_shape), dtype=dtype))
    assert detector(frames).shape == (5, 3)


def _frames(games: list[str], per_game: int, seed: int, suite: str = "synthetic") -> tuple[np.ndarray, np.ndarray]:
    """Frames of each game under random play, labelled with the game's index in the list."""
    from aios_ray.rl.envs import make_env

    frames, labels = [], []
    rng = np.random.default_rng(seed)
    for index, game in enumerate(games):
        env = make_env(suite, game, seed=seed + index)
        obs, _ = env.reset()
        for _ in range(per_game):
            frames.append(obs)
            labels.append(index)
            obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
            if terminated or truncated:
                obs, _ = env.reset()
    return np.stack(frames), np.array(labels)


@pytest.mark.parametrize(("suite", "games"), [("synthetic", ["synth0", "synth1", "synth2"]),
                                             ("minatar", ["Breakout", "SpaceInvaders", "Freeway"])])
def test_detector_trained_online_names_the_games(suite: str, games: list[str]):
    """Online, supervised, on rollout-like frames: >= 95% on frames it never saw, and after a switch it names
    the new game within a few frames."""
    torch.manual_seed(0)
    trainer = DetectorTrainer(EnvironmentDetector((10, 10, 10), num_games=len(games)), lr=3e-3)
    first = None
    for batch in range(6):  # six rollout batches of 3 x 128 frames
        frames, labels = _frames(games, per_game=128, seed=100 + batch, suite=suite)
        result = trainer.update(frames, labels, minibatch=64)
        first = first if first is not None else result["detector_accuracy"]
    held_out, labels = _frames(games, per_game=200, seed=7, suite=suite)
    accuracy = trainer.accuracy(held_out, labels)
    assert accuracy >= 0.95, accuracy
    assert first is not None and first < 0.6  # it learned this: an untrained detector guesses
    watch = SwitchWatch(settle=3)
    for frame, game in zip(held_out, labels, strict=True):
        watch.observe(int(game), trainer.predict(frame[None]).game)
    assert len(watch.detected_after) == len(games) and max(watch.detected_after) <= 5
    vote = trainer.predict(held_out[labels == 1][:32])
    assert vote.game == 1 and vote.confidence >= 0.9


def test_detector_learning_one_game_after_another_remembers_the_earlier_ones():
    """Games come in sequence: each phase's frames are of one game only. The detector's replay memory keeps the
    earlier games named (a detector trained on the current game alone names only that one)."""
    games = ["synth0", "synth1", "synth2"]
    torch.manual_seed(0)
    trainer = DetectorTrainer(EnvironmentDetector((10, 10, 10), num_games=len(games)), lr=3e-3, seed=0)
    for index, game in enumerate(games):
        for batch in range(4):
            frames, _ = _frames([game], per_game=64, seed=10 * index + batch)
            trainer.update(frames, np.full(len(frames), index), minibatch=64, epochs=2)
    held_out, labels = _frames(games, per_game=100, seed=7)
    per_game = [trainer.accuracy(held_out[labels == i], labels[labels == i]) for i in range(len(games))]
    assert min(per_game) >= 0.95, per_game
    assert all(len(trainer.memory[i]) == 256 for i in range(len(games)))
