"""forecasting/metrics.py against a hand computation that cannot hide an axis or a mean-for-median bug (issue 26):
3 trajectories (one an outlier) of horizon 2 (N != horizon), errors that differ per step and per species, both
species asserted."""
from __future__ import annotations

import numpy as np
import pytest

from forecasting.metrics import forecast_metrics, per_trajectory_errors

# (N=3, horizon=2): rows are trajectories, columns horizon steps. Trajectory 2's prey error is the outlier.
PREY_TARGETS = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
PREY_ERRORS = [[1.0, 0.0], [0.0, 2.0], [10.0, 0.0]]
PREDATOR_TARGETS = [[2.0, 1.0], [1.0, 1.0], [0.0, 3.0]]
PREDATOR_ERRORS = [[0.0, -3.0], [-1.0, 0.0], [0.0, 0.0]]


def hand_example() -> tuple[np.ndarray, np.ndarray]:
    targets = np.stack([PREY_TARGETS, PREDATOR_TARGETS], axis=-1)  # (3, 2, 2)
    errors = np.stack([PREY_ERRORS, PREDATOR_ERRORS], axis=-1)
    return targets + errors, targets


def test_metrics_of_three_trajectories_with_an_outlier_match_a_hand_computation():
    predictions, targets = hand_example()
    m = forecast_metrics(predictions, targets)
    assert m["n_trajectories"] == 3
    prey, predator = m["prey"], m["predator"]
    # prey squared errors [[1, 0], [0, 4], [100, 0]]: pooled MSE 105/6, MAE (1+2+10)/6.
    assert prey["mse"] == pytest.approx(105 / 6) and prey["mae"] == pytest.approx(13 / 6)
    # per-trajectory MSE 0.5, 2, 50: the median is 2 (their mean, 17.5, is what the outlier makes of it).
    assert prey["median_trajectory_mse"] == pytest.approx(2.0)
    # by step, over the 3 trajectories: MSE (1+0+100)/3, (0+4+0)/3; MAE (1+0+10)/3, (0+2+0)/3.
    assert prey["mse_by_step"] == pytest.approx([101 / 3, 4 / 3])
    assert prey["mae_by_step"] == pytest.approx([11 / 3, 2 / 3])
    # prey targets 1..6: mean 3.5, SST 17.5, SSE 105 -> R2 = 1 - 6.
    assert prey["r2"] == pytest.approx(-5.0)
    # predator squared errors [[0, 9], [1, 0], [0, 0]]: MSE 10/6, MAE 4/6; per-trajectory MSE 4.5, 0.5, 0 -> median
    # 0.5 (mean 5/3); by step MSE 1/3, 3 and MAE 1/3, 1.
    assert predator["mse"] == pytest.approx(10 / 6) and predator["mae"] == pytest.approx(4 / 6)
    assert predator["median_trajectory_mse"] == pytest.approx(0.5)
    assert predator["mse_by_step"] == pytest.approx([1 / 3, 3.0])
    assert predator["mae_by_step"] == pytest.approx([1 / 3, 1.0])
    # predator targets 2, 1, 1, 1, 0, 3: mean 4/3, SST 16/3, SSE 10 -> R2 = 1 - 30/16.
    assert predator["r2"] == pytest.approx(1 - 30 / 16)


def test_per_trajectory_errors_are_over_each_trajectorys_horizon():
    predictions, targets = hand_example()
    errors = per_trajectory_errors(predictions, targets)
    assert set(errors) == {"prey_mse", "prey_mae", "predator_mse", "predator_mae"}
    assert errors["prey_mse"] == pytest.approx([0.5, 2.0, 50.0])
    assert errors["prey_mae"] == pytest.approx([0.5, 1.0, 5.0])
    assert errors["predator_mse"] == pytest.approx([4.5, 0.5, 0.0])
    assert errors["predator_mae"] == pytest.approx([1.5, 0.5, 0.0])


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two():
    # 4 trajectories, one error each step: per-trajectory MSE 1, 4, 9, 400 -> median (4 + 9) / 2 = 6.5.
    errors = np.array([1.0, 2.0, 3.0, 20.0])[:, None, None] * np.ones((4, 3, 2))
    m = forecast_metrics(errors, np.zeros_like(errors))
    assert m["prey"]["median_trajectory_mse"] == m["predator"]["median_trajectory_mse"] == pytest.approx(6.5)
    assert m["prey"]["mse_by_step"] == pytest.approx([414 / 4] * 3)


def test_shapes_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match=r"must both be \(N, horizon, V\)"):
        forecast_metrics(np.zeros((3, 2, 2)), np.zeros((3, 2, 1)))
    with pytest.raises(ValueError, match="N >= 1"):
        forecast_metrics(np.zeros((0, 2, 2)), np.zeros((0, 2, 2)))
