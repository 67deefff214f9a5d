"""forecasting/scores.py: CRPS, WQL, coverage, MASE and the relative geometric means against hand computations, and
samples.npz (written by a forecast, read back, every score of metrics.json recomputed from it alone)."""
import json

import numpy as np
import pytest
import torch

import forecast
from data.lotka_volterra import save, simulate
from forecasting.evaluate import json_safe
from forecasting.scores import (
    MethodForecast,
    SavedForecasts,
    crps,
    naive_scale,
    pinball_loss,
    probabilistic_scores,
    read_samples,
    sample_quantiles,
    score_methods,
    scores_from_samples,
    trajectory_scores,
    weighted_quantile_loss,
    write_samples,
)

SPECIES = ("prey", "predator")


def crps_by_integral(samples: np.ndarray, y: float) -> float:
    """CRPS by its definition, the integral of (F(z) - 1{z >= y})^2 over z, F the samples' empirical CDF: both are
    step functions, so the integral is a sum over the intervals between the sorted samples and y."""
    points = np.sort(np.append(samples, y))
    total = 0.0
    for left, right in zip(points[:-1], points[1:]):
        cdf = np.mean(samples <= left)
        total += (cdf - float(y <= left)) ** 2 * (right - left)
    return total


def asymmetric_samples(seed=0, n=3, k=3, horizon=2):
    """(n, k, horizon, 2) samples and (n, horizon, 2) targets with different scales per species."""
    rng = np.random.default_rng(seed)
    samples = rng.gamma(2.0, size=(n, k, horizon, 2)) * np.array([10.0, 0.5])
    targets = rng.gamma(2.0, size=(n, horizon, 2)) * np.array([10.0, 0.5])
    return samples, targets


def test_crps_of_three_samples_is_the_closed_form():
    # samples {1, 2, 6}, y = 3: E|X - y| = (2 + 1 + 3)/3 = 2, E|X - X'| = 2 (1 + 5 + 4)/9 = 20/9 -> 2 - 10/9 = 8/9
    assert crps(np.array([1.0, 2.0, 6.0]).reshape(1, 3, 1, 1), np.array([[[3.0]]]))[0, 0, 0] == pytest.approx(8 / 9)
    assert crps_by_integral(np.array([1.0, 2.0, 6.0]), 3.0) == pytest.approx(8 / 9)
    samples, targets = asymmetric_samples()  # N = 3, K = 3, horizon 2: every point against the integral
    expected = np.array([[[crps_by_integral(samples[n, :, h, v], targets[n, h, v]) for v in range(2)]
                          for h in range(2)] for n in range(3)])
    np.testing.assert_allclose(crps(samples, targets), expected, rtol=1e-12)


def test_crps_leaves_out_the_samples_that_did_not_parse():
    samples, targets = asymmetric_samples(k=4)
    broken = samples.copy()
    broken[1, 2, 1:] = np.nan  # trajectory 1's third sample stopped parsing after its first step
    scores = trajectory_scores(MethodForecast(np.median(samples, axis=1), broken), targets, np.ones((3, 5, 2)))
    kept = np.delete(samples[1], 2, axis=0)
    expected = np.mean([crps_by_integral(kept[:, h, 0], targets[1, h, 0]) for h in range(2)])
    assert scores["prey_crps"][1] == pytest.approx(expected, rel=1e-12)


def test_crps_of_a_point_forecast_is_its_absolute_error():
    samples, targets = asymmetric_samples(n=4, horizon=3)
    point = samples[:, 0]
    scores = probabilistic_scores(MethodForecast(point), targets, np.ones((4, 5, 2)))
    for v, species in enumerate(SPECIES):
        assert scores[species]["crps"] == pytest.approx(np.abs(point - targets)[..., v].mean(), rel=1e-12)
        assert "coverage_80" not in scores[species]


def test_sample_quantiles_are_numpys_over_the_complete_samples():
    samples, _ = asymmetric_samples(n=3, k=6, horizon=2)
    samples[0, 2] = np.nan  # one sample of trajectory 0 did not parse; trajectory 2 has none that did
    samples[2] = np.nan
    quantiles = sample_quantiles(samples)
    for n, kept in ((0, np.delete(samples[0], 2, axis=0)), (1, samples[1])):
        np.testing.assert_allclose(quantiles[:, n], np.quantile(kept, np.arange(1, 10) / 10, axis=0), rtol=1e-12)
    assert np.isnan(quantiles[:, 2]).all()


def test_pinball_loss_by_hand():
    # level 0.9: a quantile 3 below the target loses 0.9 * 3, one 3 above it 0.1 * 3
    assert pinball_loss(np.array(2.0), np.array(5.0), 0.9) == pytest.approx(2.7)
    assert pinball_loss(np.array(5.0), np.array(2.0), 0.9) == pytest.approx(0.3)
    assert pinball_loss(np.array(5.0), np.array(2.0), 0.1) == pytest.approx(2.7)


def test_wql_of_two_samples_by_hand():
    # samples {0, 10}: the level-q quantile is 10q; y = 4: the pinball losses of q = 0.1..0.9 are 0.3, 0.4, 0.3, 0,
    # 0.5, 0.8, 0.9, 0.8, 0.5 (sum 4.5) -> WQL = 2 * 4.5 / |4| / 9 levels = 0.25
    quantiles = sample_quantiles(np.array([0.0, 10.0]).reshape(1, 2, 1, 1))[..., 0]
    np.testing.assert_allclose(quantiles[:, 0, 0], 10 * np.arange(1, 10) / 10)
    assert weighted_quantile_loss(quantiles, np.array([[4.0]])) == pytest.approx(0.25)


def test_wql_pools_the_points_of_each_species():
    samples, targets = asymmetric_samples(n=3, k=5, horizon=4)
    levels = np.arange(1, 10) / 10
    scores = probabilistic_scores(MethodForecast(np.median(samples, axis=1), samples), targets, np.ones((3, 6, 2)))
    for v, species in enumerate(SPECIES):
        per_level = []
        for level in levels:
            loss = 0.0
            for n in range(3):
                for h in range(4):
                    q, y = np.quantile(samples[n, :, h, v], level), targets[n, h, v]
                    loss += level * (y - q) if y >= q else (1 - level) * (q - y)
            per_level.append(2 * loss / np.abs(targets[..., v]).sum())
        assert scores[species]["wql"] == pytest.approx(np.mean(per_level), rel=1e-12)


def test_wql_of_a_perfect_forecast_is_zero_and_of_a_point_is_its_relative_absolute_error():
    samples, targets = asymmetric_samples(n=3, horizon=4)
    perfect = probabilistic_scores(MethodForecast(targets, np.repeat(targets[:, None], 5, axis=1)), targets,
                                   np.ones((3, 6, 2)))
    point = samples[:, 0]
    scores = probabilistic_scores(MethodForecast(point), targets, np.ones((3, 6, 2)))
    for v, species in enumerate(SPECIES):
        assert perfect[species]["wql"] == 0 and perfect[species]["crps"] == pytest.approx(0, abs=1e-12)
        # every quantile the point: the mean over levels of the pinball loss is |error| / 2
        expected = np.abs(point - targets)[..., v].sum() / np.abs(targets[..., v]).sum()
        assert scores[species]["wql"] == pytest.approx(expected, rel=1e-12)


def test_coverage_counts_the_targets_inside_the_10_90_band():
    # 11 samples 0..10 at every point: the 10 % and 90 % quantiles are 1 and 9 (inclusive)
    samples = np.broadcast_to(np.arange(11.0)[None, :, None, None], (3, 11, 2, 2)).copy()
    targets = np.empty((3, 2, 2))
    targets[..., 0] = [[0.5, 1.0], [5.0, 9.0], [9.5, 12.0]]  # prey: 1, 5, 9 inside -> 3 of 6
    targets[..., 1] = [[2.0, 3.0], [4.0, 8.9], [0.0, 7.0]]  # predator: all but 0.0 -> 5 of 6
    scores = probabilistic_scores(MethodForecast(np.median(samples, axis=1), samples), targets, np.ones((3, 4, 2)))
    assert scores["prey"]["coverage_80"] == pytest.approx(3 / 6)
    assert scores["predator"]["coverage_80"] == pytest.approx(5 / 6)


def test_mase_scales_by_the_context_naive_error():
    contexts = np.empty((3, 4, 2))
    contexts[..., 0] = [[1, 3, 2, 6], [0, 1, 2, 3], [5, 5, 5, 7]]  # naive MAE 7/3, 1, 2/3
    contexts[..., 1] = [[2, 2, 4, 4], [1, 0, 1, 0], [9, 3, 9, 3]]  # 2/3, 1, 6
    np.testing.assert_allclose(naive_scale(contexts), [[7 / 3, 2 / 3], [1, 1], [2 / 3, 6]])
    targets = np.full((3, 2, 2), 10.0)
    error = np.empty((3, 2, 2))
    error[..., 0] = [[7, -7], [1, 3], [-2, 0]]  # MAE 7, 2, 1 -> MASE 3, 2, 1.5
    error[..., 1] = [[1, 1], [0, -4], [6, 0]]  # MAE 1, 2, 3 -> MASE 1.5, 2, 0.5
    point = targets + error
    scores = trajectory_scores(MethodForecast(point), targets, contexts)
    np.testing.assert_allclose(scores["prey_mase"], [3, 2, 1.5], rtol=1e-12)
    np.testing.assert_allclose(scores["predator_mase"], [1.5, 2, 0.5], rtol=1e-12)
    pooled = probabilistic_scores(MethodForecast(point), targets, contexts)
    assert pooled["prey"]["mase"] == pytest.approx(6.5 / 3, rel=1e-12)
    assert pooled["predator"]["mase"] == pytest.approx(4 / 3, rel=1e-12)
    flat = contexts.copy()
    flat[1, :, 0] = 4.0  # a constant context has no scale: left out of the mean and counted
    pooled = probabilistic_scores(MethodForecast(point), targets, flat)
    assert pooled["prey"]["mase"] == pytest.approx(4.5 / 2, rel=1e-12) and pooled["prey"]["mase_undefined"] == 1


def test_relative_geometric_mean_against_seasonal_naive():
    rng = np.random.default_rng(3)
    targets = rng.uniform(1, 5, size=(3, 4, 2))
    reference_error = rng.uniform(0.1, 1, size=(3, 4, 2)) * rng.choice([-1, 1], size=(3, 4, 2))
    # per trajectory, the method's errors are c times the reference's: its WQL and MASE are c times too
    factors = np.array([[2.0, 0.5], [4.0, 0.5], [1.0, 4.0]])  # prey: gmean(2, 4, 1) = 2; predator: gmean = 1
    forecasts = {"seasonal_naive": MethodForecast(targets + reference_error),
                 "model": MethodForecast(targets + factors[:, None, :] * reference_error)}
    contexts = rng.uniform(1, 5, size=(3, 7, 2))
    metrics = score_methods(forecasts, targets, contexts, np.ones(3, bool))
    for score in ("wql", "mase"):
        assert metrics["seasonal_naive"]["prey"][f"{score}_gmean_relative"] == 1.0
        assert metrics["seasonal_naive"]["predator"][f"{score}_gmean_relative"] == 1.0
        assert metrics["model"]["prey"][f"{score}_gmean_relative"] == pytest.approx(2.0, rel=1e-12)
        assert metrics["model"]["predator"][f"{score}_gmean_relative"] == pytest.approx(1.0, rel=1e-12)
    without = score_methods({"model": forecasts["model"]}, targets, contexts, np.ones(3, bool))
    assert "wql_gmean_relative" not in without["model"]["prey"]  # nothing to be relative to


def test_one_sample_scores_as_its_absolute_error_and_says_so():
    samples, targets = asymmetric_samples(n=3, k=1, horizon=4)
    contexts = np.random.default_rng(1).uniform(1, 5, size=(3, 6, 2))
    metrics = score_methods({"model": MethodForecast(samples[:, 0], samples)}, targets, contexts,
                            np.ones(3, bool))["model"]
    assert metrics["probabilistic"].startswith("one sample: CRPS = MAE")
    for species in SPECIES:
        assert metrics[species]["crps"] == pytest.approx(metrics[species]["mae"], rel=1e-12)
        assert "coverage_80" not in metrics[species]
        assert all(np.isfinite(v) for k, v in metrics[species].items() if isinstance(v, float))


def test_samples_file_round_trip(tmp_path):
    samples, targets = asymmetric_samples(n=4, k=3, horizon=5)
    samples[2, 1, 3:] = np.nan
    saved = SavedForecasts(np.array([7, 3, 11, 0]), np.ones((4, 6, 2)), targets, np.array([True, True, False, True]),
                           {"model": MethodForecast(np.nanmedian(samples, axis=1), samples),
                            "persistence": MethodForecast(samples[:, 0] + 1)})
    back = read_samples(write_samples(tmp_path / "samples.npz", saved))
    assert list(back.forecasts) == ["model", "persistence"] and back.forecasts["persistence"].samples is None
    np.testing.assert_array_equal(back.forecasts["model"].samples, samples)
    np.testing.assert_array_equal(back.indices, saved.indices)
    np.testing.assert_array_equal(back.scored, saved.scored)
    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="junk.npz: not a samples file"):
        read_samples(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", methods=np.array(["model"]), indices=np.arange(2))
    with pytest.raises(ValueError, match="partial.npz: not a samples file of a forecast: missing contexts"):
        read_samples(tmp_path / "partial.npz")


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("lv") / "lv24.h5"
    save(path, simulate(n=24, steps=70, seed=4, substeps=10))  # 3 or more in the test split
    return str(path)


@pytest.mark.parametrize("sampling", [[], ["--num-samples", "3", "--temperature", "1.0"]], ids=["greedy", "3"])
def test_forecast_writes_samples_that_reproduce_metrics_json(small_h5, tmp_path, capsys, sampling):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matrices gain nothing from a second thread
    try:
        code = forecast.main(["--model", "tiny", "--data", small_h5, "--limit", "3", "--horizon", "10", "--quiet",
                              "--baselines", "persistence,seasonal_naive", "--out", str(tmp_path / "fc"),
                              "--runs-dir", str(tmp_path), *sampling])
    finally:
        torch.set_num_threads(before)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((tmp_path / "fc" / "metrics.json").read_text())
    assert "samples.npz" in result["files"] and result["n_trajectories"] == 3
    assert json_safe(scores_from_samples(tmp_path / "fc" / "samples.npz")) == result["metrics"]
    saved = read_samples(tmp_path / "fc" / "samples.npz")
    k = 3 if sampling else 1
    assert saved.forecasts["model"].samples.shape == (3, k, 10, 2) and saved.forecasts["seasonal_naive"].samples is None
    model = result["metrics"]["model"]
    assert model["probabilistic"].startswith("3 samples" if sampling else "one sample")
    assert ("coverage_80" in model["prey"]) == bool(sampling)
    assert "coverage_80" not in result["metrics"]["persistence"]["prey"]
    for species in SPECIES:
        assert result["metrics"]["seasonal_naive"][species]["wql_gmean_relative"] == 1.0
        persistence = result["metrics"]["persistence"][species]
        assert persistence["crps"] == pytest.approx(persistence["mae"], rel=1e-12)
    row = next(line for line in captured.out.splitlines() if line.startswith("seasonal_naive") and "prey " in line)
    assert row.split()[-2:] == ["1", "1"]  # the printed table's WQL/SN and MASE/SN of seasonal naive itself
    assert "CRPS" in captured.out and "MASE/SN" in captured.out
