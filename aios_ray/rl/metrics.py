r"""Continual-learning metrics of a sequential run (CORA) and expert specialisation of the MoE router.

Retention matrix ``R[p, j]``: mean greedy return on game ``j`` evaluated after phase ``p`` (rows: phases in
schedule order, columns: games). ``trained(p)`` is the game phase ``p`` trained.

**Normalisation.** Every return of game ``j`` is scaled by the game's random-policy score ``rand_j`` and the
best score in the run ``best_j = max_p R[p, j]`` (over every phase of the run)::

    N[p, j] = (R[p, j] - rand_j) / (best_j - rand_j)

so 0 is the random policy and 1 the best this run ever did on the game. A game the run never played better
than random (``best_j <= rand_j``) has no scale: its values are NaN (shown as ``--``).

**Isolated forgetting** and **zero-shot forward transfer** follow CORA (Powers et al. 2021, "CORA:
Benchmarks, Baselines, and Metrics as a Platform for Continual Reinforcement Learning Agents",
arXiv:2110.10067), as its released code computes them (AGI-Labs/continual_rl,
``continual_rl/utils/metrics.py``: ``compute_forgetting_metric`` and ``compute_forward_transfer_metric`` with
``USE_ISOLATED_FORGETTING = USE_ISOLATED_ZSFT = True``). Both use the first pass over the games only (CORA's
``num_cycles_for_forgetting = 1``); ``t_j`` is the phase of that pass that trains game ``j``.

* Isolated forgetting of game ``j`` caused by phase ``k > t_j`` (what training game ``trained(k)`` cost
  game ``j``; positive = forgotten)::

      F[j, k] = N[k-1, j] - N[k, j]

* Zero-shot forward transfer to game ``j`` from phase ``k < t_j`` (what training game ``trained(k)`` gave
  game ``j`` before ``j`` was ever trained; positive = helped)::

      Z[j, k] = N[k, j] - N[k-1, j]        with N[-1, j] = 0

* Per game: ``F_j = mean_k F[j, k]`` and ``Z_j = mean_k Z[j, k]`` (CORA's row means; the last game of the
  pass has no forgetting and the first no transfer: NaN). The run's value is the mean over all defined
  ``(j, k)`` pairs (CORA's table corner pools the pairs rather than averaging the per-game means).
* Final normalised return: ``N[last, j]`` per game and its mean.

Where this differs from CORA, and why:

* CORA reads ``R`` off continuously logged (smoothed) evaluation curves at the end of each task's training
  region; here the retention matrix holds exactly those points (an evaluation after every phase).
* CORA's baseline for the first prior task is the first evaluation, before any training. This run has no
  evaluation before phase 1, so the random-policy score stands in for it (``N[-1, j] = 0``).
* CORA scales returns by the largest absolute return seen for the task (and prints them x10); the issue
  asks for ``(r - random) / (best - random)``, which also puts the random policy at 0.

**Expert specialisation.** From a (games x experts) count matrix ``C`` of routed assignments (one per token
and chosen expert), with ``p(g, e) = C[g, e] / sum(C)``, the mutual information in bits between the game and
the chosen expert::

    I(G; E) = sum_{g,e} p(g, e) log2( p(g, e) / (p(g) p(e)) )

It is 0 when every game uses the experts alike and ``H(G)`` (``log2(games)`` for equal totals) when each game
has experts of its own. Finite counts make even a router that ignores the game score above 0, so
``random_router_mi`` gives the control: the expected ``I(G; E)`` of counts drawn uniformly over the experts
with the same per-game totals (a multinomial per game), estimated by sampling with a seeded generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class ContinualMetrics:
    games: list[str]
    normalised: np.ndarray  # (phases, games): N[p, j]
    forgetting_pairs: np.ndarray  # (games, phases): F[j, k], NaN where undefined
    transfer_pairs: np.ndarray  # (games, phases): Z[j, k], NaN where undefined
    forgetting: np.ndarray  # (games,): F_j
    forward_transfer: np.ndarray  # (games,): Z_j
    final: np.ndarray  # (games,): N[last, j]
    mean_forgetting: float
    mean_forward_transfer: float
    mean_final: float

    def per_game(self) -> dict[str, dict[str, float]]:
        return {game: {"forgetting": float(self.forgetting[j]), "forward_transfer": float(self.forward_transfer[j]),
                       "final": float(self.final[j])} for j, game in enumerate(self.games)}


def normalise_returns(matrix: np.ndarray, random_scores: np.ndarray) -> np.ndarray:
    """``(R - random) / (best - random)`` per column, best over the whole run; NaN for a column whose best is
    not above random (no scale to measure against)."""
    matrix = np.asarray(matrix, dtype=float)
    random_scores = np.asarray(random_scores, dtype=float)
    span = matrix.max(axis=0) - random_scores
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = (matrix - random_scores) / span
    normalised[:, ~(span > 0)] = np.nan
    return normalised


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _first_pass(trained: Sequence[int], num_games: int) -> int:
    """Rows of the first pass over the games: up to the first phase that trains a game again."""
    seen: set[int] = set()
    for p, game in enumerate(trained):
        if game in seen:
            return p
        seen.add(game)
    return min(len(trained), num_games)


def continual_metrics(matrix: Sequence[Sequence[float]] | np.ndarray, random_scores: Sequence[float] | np.ndarray,
                      games: Sequence[str] | None = None, trained: Sequence[int] | None = None) -> ContinualMetrics:
    """CORA isolated forgetting and zero-shot forward transfer of a retention matrix (see the module docstring).

    ``matrix[p][j]``: return on game j after phase p; ``random_scores[j]``: the random policy's return on game
    j; ``trained[p]``: the game phase p trained (default: the schedule's order, ``p % games``). A partial run
    (fewer rows than games) gives the pairs its rows define."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"retention matrix must be (phases x games) with at least one row, got {matrix.shape}")
    phases, num_games = matrix.shape
    if len(random_scores) != num_games:
        raise ValueError(f"{len(random_scores)} random scores for {num_games} games")
    games = list(games) if games is not None else [str(j) for j in range(num_games)]
    trained = list(trained) if trained is not None else [p % num_games for p in range(phases)]
    normalised = normalise_returns(matrix, np.asarray(random_scores, dtype=float))
    before = np.vstack([np.zeros((1, num_games)), normalised])  # before[p] = N[p-1]; N[-1] = 0 (random policy)
    forgetting_pairs = np.full((num_games, phases), np.nan)
    transfer_pairs = np.full((num_games, phases), np.nan)
    first_pass = _first_pass(trained, num_games)
    trained_at = {game: p for p, game in enumerate(trained[:first_pass])}
    for j in range(num_games):
        t_j = trained_at.get(j, first_pass)  # not trained yet (partial run): every row so far is zero-shot
        for k in range(first_pass):
            if k > t_j:
                forgetting_pairs[j, k] = before[k, j] - normalised[k, j]
            elif k < t_j:
                transfer_pairs[j, k] = normalised[k, j] - before[k, j]
    with np.errstate(invalid="ignore"):
        forgetting = np.array([_mean(row) for row in forgetting_pairs])
        transfer = np.array([_mean(row) for row in transfer_pairs])
    final = normalised[-1]
    return ContinualMetrics(games, normalised, forgetting_pairs, transfer_pairs, forgetting, transfer, final,
                            _mean(forgetting_pairs.ravel()), _mean(transfer_pairs.ravel()), _mean(final))


def _mi_bits(counts: np.ndarray) -> np.ndarray:
    """I(G; E) in bits of count matrices (..., games, experts); NaN where a matrix has no counts."""
    total = counts.sum(axis=(-2, -1), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        joint = counts / total
        outer = joint.sum(axis=-1, keepdims=True) * joint.sum(axis=-2, keepdims=True)
        terms = np.where(joint > 0, joint * np.log2(joint / outer), 0.0)
    mi = terms.sum(axis=(-2, -1))
    return np.where(total[..., 0, 0] > 0, np.maximum(mi, 0.0), np.nan)  # clip -1e-17 rounding to 0


def _check_counts(counts: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2:
        raise ValueError(f"expert counts must be (games x experts), got shape {counts.shape}")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError("expert counts must be finite and non-negative")
    return counts


def mutual_information(counts: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Mutual information in bits between the game (rows) and the chosen expert (columns); NaN if empty."""
    return float(_mi_bits(_check_counts(counts)))


def game_entropy(counts: Sequence[Sequence[float]] | np.ndarray) -> float:
    """H(G) in bits of the games' shares of the assignments: the most I(G; E) can be."""
    totals = _check_counts(counts).sum(axis=1)
    if totals.sum() <= 0:
        return float("nan")
    shares = totals[totals > 0] / totals.sum()
    return float(-(shares * np.log2(shares)).sum())


def random_router_mi(counts: Sequence[Sequence[float]] | np.ndarray, samples: int = 256, seed: int = 0) -> float:
    """Expected I(G; E) of a router that ignores the game: each game's total (rounded to whole assignments) is
    spread over the experts uniformly at random, ``samples`` times, with a seeded generator."""
    counts = _check_counts(counts)
    totals = np.rint(counts.sum(axis=1)).astype(np.int64)
    num_experts = counts.shape[1]
    rng = np.random.default_rng(seed)
    uniform = np.full(num_experts, 1.0 / num_experts)
    drawn = np.stack([rng.multinomial(n, uniform, size=samples) for n in totals], axis=1)  # (samples, games, E)
    return float(np.nanmean(_mi_bits(drawn.astype(float)))) if totals.sum() > 0 else float("nan")


def specialisation(expert_counts: dict[str, Sequence[Sequence[float]]], samples: int = 256,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """Per MoE layer: ``mi`` (bits), ``random_mi`` (the random-router control) and ``max_mi`` (H(G))."""
    return {layer: {"mi": mutual_information(counts), "random_mi": random_router_mi(counts, samples, seed),
                    "max_mi": game_entropy(counts)} for layer, counts in expert_counts.items()}
