"""CORA forgetting / forward transfer and routing mutual information on small matrices worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aios_ray.rl.metrics import (
    continual_metrics,
    game_entropy,
    mutual_information,
    normalise_returns,
    random_router_mi,
    specialisation,
)

# Three games a, b, c trained in that order. Random scores 2, -1, 0; best scores 12, 7, 9, so the normalised
# matrix N = (R - random) / (best - random) is
#   after a: 1.0  0.25  1/9
#   after b: 0.6  1.0   1/3
#   after c: 0.4  0.75  1.0
RAW = [[12.0, 1.0, 1.0],
       [8.0, 7.0, 3.0],
       [6.0, 5.0, 9.0]]
RANDOM = [2.0, -1.0, 0.0]


def test_normalisation_puts_random_at_zero_and_the_run_best_at_one() -> None:
    normalised = normalise_returns(np.array(RAW), np.array(RANDOM))
    np.testing.assert_allclose(normalised, [[1.0, 0.25, 1 / 9], [0.6, 1.0, 1 / 3], [0.4, 0.75, 1.0]])
    # A game never played better than random has no scale: NaN, not a division by zero or a fake 0.
    flat = normalise_returns(np.array([[1.0, 5.0], [0.5, 6.0]]), np.array([1.0, 2.0]))
    assert np.isnan(flat[:, 0]).all()
    np.testing.assert_allclose(flat[:, 1], [0.75, 1.0])


def test_forgetting_and_forward_transfer_of_a_three_game_run() -> None:
    m = continual_metrics(RAW, RANDOM, ["a", "b", "c"])
    # Forgetting of a: training b cost 1.0 - 0.6, training c cost 0.6 - 0.4; of b: training c cost 1.0 - 0.75.
    np.testing.assert_allclose(m.forgetting[:2], [(0.4 + 0.2) / 2, 0.25])
    assert math.isnan(m.forgetting[2])  # c is last: nothing came after it
    # Transfer to b from a: 0.25 - 0 (random); to c from a: 1/9 - 0, from b: 1/3 - 1/9.
    assert math.isnan(m.forward_transfer[0])  # a is first: nothing came before it
    np.testing.assert_allclose(m.forward_transfer[1:], [0.25, (1 / 9 + 2 / 9) / 2])
    # Run means pool every (game, phase) pair, as CORA's table corner does.
    assert m.mean_forgetting == pytest.approx((0.4 + 0.2 + 0.25) / 3)
    assert m.mean_forward_transfer == pytest.approx((0.25 + 1 / 9 + 2 / 9) / 3)
    np.testing.assert_allclose(m.final, [0.4, 0.75, 1.0])
    assert m.mean_final == pytest.approx(2.15 / 3)
    assert m.per_game()["b"] == pytest.approx({"forgetting": 0.25, "forward_transfer": 0.25, "final": 0.75})


def test_a_run_that_keeps_every_game_has_zero_forgetting() -> None:
    m = continual_metrics([[5.0, 1.0], [5.0, 3.0]], [1.0, 1.0])
    assert m.forgetting[0] == 0.0
    assert m.mean_forgetting == 0.0
    assert m.forward_transfer[1] == 0.0  # training game 0 left game 1 at the random score
    np.testing.assert_allclose(m.final, [1.0, 1.0])


def test_partial_run_and_a_schedule_in_another_order() -> None:
    # One phase of three done: nothing forgotten yet, every other game's row is zero-shot transfer.
    m = continual_metrics([[10.0, 4.0, 0.0]], [0.0, 0.0, 0.0])
    assert np.isnan(m.forgetting).all() and math.isnan(m.mean_forgetting)
    np.testing.assert_allclose(m.forward_transfer[1:], [1.0, np.nan])  # game 2 never beat random: no scale
    # Game 1 trained first, then game 0: forgetting is game 1's, transfer is game 0's.
    m = continual_metrics([[2.0, 10.0], [10.0, 4.0]], [0.0, 0.0], trained=[1, 0])
    np.testing.assert_allclose(m.forgetting, [np.nan, 1.0 - 0.4])
    np.testing.assert_allclose(m.forward_transfer, [0.2, np.nan])


def test_only_the_first_pass_counts_but_the_best_comes_from_the_whole_run() -> None:
    # Two games, two cycles. Game 0 peaks at 20 only in cycle 2, which sets its scale.
    m = continual_metrics([[10.0, 0.0], [5.0, 10.0], [20.0, 5.0], [20.0, 10.0]], [0.0, 0.0])
    np.testing.assert_allclose(m.forgetting, [(10 - 5) / 20, np.nan])
    np.testing.assert_allclose(m.forward_transfer, [np.nan, 0.0])
    np.testing.assert_allclose(m.final, [1.0, 1.0])


def test_bad_matrices_are_refused() -> None:
    with pytest.raises(ValueError, match="random scores"):
        continual_metrics([[1.0, 2.0]], [0.0])
    with pytest.raises(ValueError, match="at least one row"):
        continual_metrics(np.zeros((0, 2)), [0.0, 0.0])


@pytest.mark.parametrize("games", [2, 4, 8])
def test_perfectly_specialised_router_carries_log2_games_bits(games: int) -> None:
    assert mutual_information(np.eye(games) * 500) == pytest.approx(math.log2(games))
    # Two experts per game, used evenly: still one game per expert set, still log2(games) bits.
    assert mutual_information(np.kron(np.eye(games), np.ones((1, 2))) * 50) == pytest.approx(math.log2(games))


def test_identical_rows_carry_no_information() -> None:
    assert mutual_information([[7, 1, 2], [7, 1, 2], [7, 1, 2]]) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information([[70, 10, 20], [7, 1, 2]]) == pytest.approx(0.0, abs=1e-12)  # totals differ


def test_mutual_information_worked_by_hand() -> None:
    # p = [[3/8, 1/8], [1/8, 3/8]], uniform marginals: I = 1 - H(1/4) bits = 0.188722...
    assert mutual_information([[3, 1], [1, 3]]) == pytest.approx(1 - (0.25 * 2 + 0.75 * math.log2(4 / 3)))
    # Specialised but unequal totals: I = H(G) = H(3/4, 1/4), not a full bit.
    counts = [[300, 0], [0, 100]]
    assert mutual_information(counts) == pytest.approx(game_entropy(counts)) == pytest.approx(0.8112781)
    assert math.isnan(mutual_information(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="non-negative"):
        mutual_information([[1, -1], [0, 2]])


def test_random_router_control() -> None:
    specialised = np.eye(4) * 1000
    control = random_router_mi(specialised, seed=3)
    assert control == random_router_mi(specialised, seed=3)  # seeded: reports are reproducible
    assert mutual_information(specialised) == pytest.approx(2.0)
    assert 0 < control < 0.01  # a router that ignores the game still scores a little above 0
    # The finite-sample bias of I for independent counts is about (G-1)(E-1) / (2 N ln 2) bits.
    expected = (3 - 1) * (3 - 1) / (2 * 300 * math.log(2))
    assert random_router_mi(np.full((3, 3), 100 / 3), samples=512) == pytest.approx(expected, rel=0.15)


def test_specialisation_per_layer() -> None:
    scores = specialisation({"0": np.eye(2) * 100, "1": [[50, 50], [50, 50]]})
    assert scores["0"]["mi"] == pytest.approx(1.0) and scores["0"]["max_mi"] == pytest.approx(1.0)
    assert scores["1"]["mi"] == pytest.approx(0.0, abs=1e-12)
    assert scores["0"]["random_mi"] < 0.05 and scores["1"]["random_mi"] < 0.05
