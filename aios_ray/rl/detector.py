"""The environment detector: a small CNN that names the game from observation frames.

Why it exists: at evaluation (and in any deployment) the policy is never told which game it plays, yet
the router is restricted to that game's expert group and the store should have that group hot before
the first step. The detector's prediction selects the group and tells the store what to prefetch.

It is trained online and supervised: during training the schedule knows the game of every rollout
frame, so each batch of frames is a labelled batch. Pure torch, no RLlib: the sequential schedule feeds
it frames and labels, and asks it for a prediction.

- ``EnvironmentDetector``: the network, obs -> logits over the run's games. Deliberately smaller than
  the policy's encoder: telling games apart from one frame is far easier than playing them.
- ``DetectorTrainer``: Adam on cross-entropy, one ``update(frames, games)`` per batch; ``predict``
  takes a majority vote over a batch of frames (all from one environment), with its confidence. The
  games come one after another, so a detector trained on the current batch alone would forget the
  earlier games as surely as any network (it would then name only the game being played). It keeps a
  small memory of frames per game and learns from the new batch mixed with as many remembered frames of
  every other game.
- ``SwitchWatch``: after a game switch, how many frames the detector needed until it named the new
  game and kept naming it (the "steps after a switch" the issue asks for).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _as_float_nchw(obs: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) channels-last frames (uint8 Atari or float MinAtar) -> (B, C, H, W) float in [0, 1]."""
    x = obs.permute(0, 3, 1, 2)
    return x.float().div_(255.0) if obs.dtype == torch.uint8 else x.float()


class EnvironmentDetector(nn.Module):
    def __init__(self, obs_shape: tuple[int, int, int], num_games: int, width: int = 32) -> None:
        super().__init__()
        if num_games < 1:
            raise ValueError(f"num_games must be >= 1, got {num_games}")
        height, _, channels = obs_shape
        # Large frames (84x84 Atari) are strided down first; 10x10 MinAtar boards are small already.
        stride = 4 if height >= 42 else 1
        self.conv1 = nn.Conv2d(channels, width, kernel_size=8 if stride == 4 else 3, stride=stride)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=2 if stride == 4 else 1)
        with torch.no_grad():
            flat = self._features(torch.zeros(1, channels, *obs_shape[:2])).shape[1]
        self.head = nn.Linear(flat, num_games)
        self.num_games = num_games

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (B, H, W, C) -> logits (B, num_games)."""
        return self.head(self._features(_as_float_nchw(obs)))


@dataclass
class Prediction:
    game: int  # index into the run's game list
    confidence: float  # share of the batch's frames that voted for it


class DetectorTrainer:
    def __init__(self, detector: EnvironmentDetector, lr: float = 1e-3, seed: int = 0,
                 memory_per_game: int = 1024) -> None:
        self.detector = detector
        self.optimizer = torch.optim.Adam(detector.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.memory_per_game = memory_per_game
        self.memory: dict[int, np.ndarray] = {}  # per game: up to memory_per_game frames (reservoir sample)
        self.seen_per_game: dict[int, int] = {}
        self.frames_seen = 0

    def _remember(self, frames: np.ndarray, games: np.ndarray) -> None:
        """Reservoir sampling per game: every frame seen so far has the same chance to be in memory."""
        for game in np.unique(games):
            for frame in frames[games == game]:
                seen = self.seen_per_game.get(int(game), 0)
                stored = self.memory.get(int(game))
                if stored is None or len(stored) < self.memory_per_game:
                    self.memory[int(game)] = frame[None] if stored is None else np.concatenate([stored, frame[None]])
                else:
                    slot = int(self.rng.integers(seen + 1))
                    if slot < self.memory_per_game:
                        stored[slot] = frame
                self.seen_per_game[int(game)] = seen + 1

    def _replay(self, games: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` remembered frames of every game not in this batch (none before a second game exists)."""
        frames, labels = [], []
        for game, stored in self.memory.items():
            if game in games:
                continue
            pick = self.rng.choice(len(stored), size=min(count, len(stored)), replace=False)
            frames.append(stored[pick])
            labels.append(np.full(len(pick), game))
        return (np.concatenate(frames), np.concatenate(labels)) if frames else (np.empty(0), np.empty(0))

    def update(self, frames: np.ndarray | torch.Tensor, games: np.ndarray | torch.Tensor,
               minibatch: int = 256, epochs: int = 1) -> dict[str, float]:
        """One pass over a labelled batch of frames, mixed with remembered frames of the other games, in
        shuffled minibatches; returns the mean loss and the accuracy on the new batch *before* the update (an
        honest online estimate: these frames were unseen)."""
        new_frames, new_games = np.asarray(frames), np.asarray(games, dtype=np.int64)
        obs, labels = torch.as_tensor(new_frames), torch.as_tensor(new_games)
        with torch.no_grad():
            accuracy = float((self.detector(obs).argmax(dim=1) == labels).float().mean())
        old_frames, old_games = self._replay(new_games, count=len(new_frames))
        self._remember(new_frames, new_games)
        if len(old_frames):
            obs = torch.cat([obs, torch.as_tensor(old_frames)])
            labels = torch.cat([labels, torch.as_tensor(old_games, dtype=torch.long)])
        order = torch.cat([torch.randperm(len(obs), generator=self.generator) for _ in range(epochs)])
        losses = []
        self.detector.train()
        for start in range(0, len(order), minibatch):
            idx = order[start:start + minibatch]
            loss = F.cross_entropy(self.detector(obs[idx]), labels[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.frames_seen += len(new_frames)
        return {"detector_loss": float(np.mean(losses)), "detector_accuracy": accuracy}

    @torch.no_grad()
    def accuracy(self, frames: np.ndarray | torch.Tensor, games: np.ndarray | torch.Tensor) -> float:
        self.detector.eval()
        predicted = self.detector(torch.as_tensor(frames)).argmax(dim=1)
        return float((predicted == torch.as_tensor(games, dtype=torch.long)).float().mean())

    @torch.no_grad()
    def predict_each(self, frames: np.ndarray | torch.Tensor) -> np.ndarray:
        """The game each frame shows, on its own."""
        self.detector.eval()
        return self.detector(torch.as_tensor(frames)).argmax(dim=1).numpy()

    @torch.no_grad()
    def predict(self, frames: np.ndarray | torch.Tensor) -> Prediction:
        """The game of a batch of frames from one environment: the majority of the per-frame predictions."""
        self.detector.eval()
        votes = torch.bincount(self.detector(torch.as_tensor(frames)).argmax(dim=1),
                               minlength=self.detector.num_games)
        game = int(votes.argmax())
        return Prediction(game, float(votes[game]) / max(int(votes.sum()), 1))


@dataclass
class SwitchWatch:
    """Frames from a game switch until the detector named the new game for ``settle`` frames in a row."""

    settle: int = 4
    current: int | None = None
    since_switch: int = 0
    streak: int = 0
    detected_after: list[int] = field(default_factory=list)  # one entry per switch that was detected
    pending: bool = False

    def observe(self, true_game: int, predicted: int) -> None:
        if true_game != self.current:
            self.current, self.since_switch, self.streak, self.pending = true_game, 0, 0, True
        self.since_switch += 1
        self.streak = self.streak + 1 if predicted == true_game else 0
        if self.pending and self.streak >= self.settle:
            self.detected_after.append(self.since_switch - self.settle + 1)  # the first frame of the streak
            self.pending = False
