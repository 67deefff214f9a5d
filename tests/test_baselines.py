"""The baselines that cannot blow up: seasonal naive against hand-computed periods, and the LV fit staying finite
(logistic variant, bounded integration, persistence fallback) where the classic fit diverged."""
import numpy as np
import pytest
import torch

from data.lotka_volterra import simulate
from forecasting.baselines import (
    FALLBACK_FACTOR,
    estimate_period,
    fit_lotka_volterra,
    lotka_volterra_forecast,
    lotka_volterra_path,
    persistence,
    seasonal_naive,
)


def test_period_of_a_sampled_sine_is_its_period_in_steps():
    t = np.arange(50)
    context = np.stack([2 + np.sin(2 * np.pi * t / 8), 1 + 0.5 * np.cos(2 * np.pi * t / 8)], axis=1)
    assert estimate_period(context) == 8
    # Hand-computed: the last 8 steps are t = 42..49; the forecast repeats them, t = 50 is t = 42 again.
    forecast = seasonal_naive(context, 12)
    np.testing.assert_array_equal(forecast[:8], context[42:50])
    np.testing.assert_array_equal(forecast[8:], context[42:46])
    np.testing.assert_allclose(forecast[:, 0], 2 + np.sin(2 * np.pi * np.arange(50, 62) / 8), atol=1e-12)


def test_an_alternating_series_has_period_2_the_shortest_allowed():
    # 0, 1, 0, 1, ...: the autocorrelation is negative at lag 1 and highest at lag 2 (the minimum period), so the
    # period is 2, and seasonal naive repeats the last two steps (issue 26: a search that starts one lag late, at 3,
    # finds 4).
    context = np.tile([[0.0, 3.0], [1.0, 5.0]], (10, 1))
    assert estimate_period(context) == 2
    np.testing.assert_array_equal(seasonal_naive(context, 5), [[0, 3], [1, 5], [0, 3], [1, 5], [0, 3]])


def test_period_of_a_square_wave_and_of_an_lv_orbit():
    # A square wave of period 12 (6 high, 6 low): autocorrelation -1 at lag 6, +1 (times the overlap) at lag 12.
    square = np.tile(np.r_[np.ones(6), -np.ones(6)], 5)[:, None]
    assert estimate_period(square) == 12
    # A classic LV orbit: its period from the simulation, measured between prey peaks on a fine grid.
    data = simulate(n=1, steps=2001, t_end=200, substeps=2, seed=2, prior="lv")
    prey = data.trajectories[0, :, 0]
    peaks = [i for i in range(1, len(prey) - 1) if prey[i - 1] < prey[i] >= prey[i + 1]]
    true_period = np.diff(data.time[peaks]).mean()  # time units
    coarse = data.trajectories[0, ::40][:50]  # 50 steps of 4 time units
    assert abs(estimate_period(coarse) - true_period / 4) <= 1


def test_no_oscillation_means_persistence():
    t = np.arange(50.0)
    for context in (np.ones((50, 2)), np.stack([t, t ** 2], axis=1)):  # constant; monotone trend
        assert estimate_period(context) is None
        np.testing.assert_array_equal(seasonal_naive(context, 7), persistence(context, 7))
    with pytest.raises(ValueError, match="period 60 must be between 1 and the context's 50 steps"):
        seasonal_naive(np.ones((50, 2)), 5, period=60)


# A Rosenzweig-MacArthur trajectory (logistic prey, saturating predator; the varied prior's equations): trajectory
# 910 of the default simulated set, noise-free and its values rounded. The classic LV fit of its damped context
# integrates to ~1e11 over the horizon (checked below); that is how the LV baseline blew up on the users' file.
DIVERGED_CASE = dict(alpha=0.2934, beta=0.2345, gamma=0.2669, efficiency=0.3475, capacity=7.356, handling=0.2204,
                     x0=0.9708, y0=1.0398, noise=0.0)


def test_lv_fit_stays_finite_where_the_classic_fit_diverged():
    data = simulate(n=1, steps=100, seed=0, **{k: (v, v) for k, v in DIVERGED_CASE.items()})
    context, future = data.trajectories[:, :50], data.trajectories[:, 50:]
    classic = fit_lotka_volterra(context, data.time[:50], variants=("classic",))
    with torch.no_grad():
        unbounded = lotka_volterra_path(torch.tensor(classic.params), torch.tensor(classic.state0), data.time).numpy()
    assert np.abs(unbounded[:, 50:]).max() > 1e6  # the old baseline: the classic fit, integrated unbounded
    forecast, fit = lotka_volterra_forecast(context, data.time, 50)
    assert np.isfinite(forecast).all() and fit.logistic.tolist() == [True] and fit.fallback.tolist() == [False]
    assert fit.variant == ["logistic"] and fit.inv_capacity[0] > 0
    # The orbit settles (the predator dies out, the prey reaches its capacity) and the forecast follows it.
    assert np.abs(forecast - future).max() < 0.05 and future[0, :, 0].max() > 7


def test_a_runaway_forecast_falls_back_to_persistence():
    # Prey growing exponentially with almost no predators: the fitted orbit keeps growing past FALLBACK_FACTOR x
    # the context's maximum over the horizon, so the forecast is persistence, and it is flagged.
    time = np.linspace(0, 200, 100)
    growing = np.stack([np.exp(0.05 * time), np.full(100, 1e-3) * np.exp(-0.1 * time)], axis=1)[None]
    forecast, fit = lotka_volterra_forecast(growing[:, :50], time, 50)
    assert fit.fallback.tolist() == [True]
    np.testing.assert_array_equal(forecast[0], persistence(growing[0, :50], 50))
    assert FALLBACK_FACTOR * growing[0, :50, 0].max() < growing[0, 50:, 0].max()  # it would have left the range


def test_lv_fit_is_finite_on_the_users_test_split():
    """The users' file (skipped where absent): the classic fit alone reached MSE ~1e34 on its test split."""
    from conftest import LV_H5

    from data.lotka_volterra import load, split_indices

    if not LV_H5.is_file():
        pytest.skip("../shared/fixtures/lotka_volterra_data.h5 not present")
    data = load(LV_H5)
    test = data.trajectories[split_indices(len(data)).test]
    forecast, fit = lotka_volterra_forecast(test[:, :50], data.time, 50)
    mse = ((forecast - test[:, 50:]) ** 2).mean(axis=(0, 1))
    assert np.isfinite(mse).all() and (mse < [0.5, 0.1]).all()  # persistence: 0.96 and 0.11
    assert fit.fallback.sum() <= 0.05 * len(test)
