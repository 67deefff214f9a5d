"""Issue 41: conformal calibration of the bands (forecasting.calibration) against hand computations and its coverage
guarantee on exchangeable data; the calibrated scores (forecasting.scores) and samples.npz; the temperature chosen on
the validation split (forecasting.tuning) by hand; forecast.py --temperature auto --calibrate end to end (the choice,
the validation trajectories apart from the test ones, every validation forecast booked, the bad inputs one line)."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from test_faults import lines_of

import forecasting.cli
from common.exit_codes import EXIT_USAGE
from data.lotka_volterra import save, simulate, split_indices
from forecasting.calibration import Calibration, calibration_levels, conformal_rank, context_scales, fit_calibration
from forecasting.config import ForecastConfig
from forecasting.scores import (
    QUANTILE_LEVELS,
    MethodForecast,
    band_coverage,
    probabilistic_scores,
    read_samples,
    sample_quantiles,
    scores_from_samples,
    weighted_quantile_loss,
)
from forecasting.tuning import Candidate, choose, geometric_crps, validation_temperatures
from ledger import RECORD_NAME
from reporting.calibration import scored_values, verdict
from reporting.uncertainty import bootstrap_mean


def constant_contexts(scales, steps=4, n_vars=1):
    """(n, steps, V) contexts whose 95th percentile of |context| is `scales[i]` in every variable."""
    return np.repeat(np.asarray(scales, float)[:, None, None], steps, axis=1).repeat(n_vars, axis=2)


def test_conformal_rank_by_hand():
    assert conformal_rank(150, 0.8) == 121  # 151 * 0.8 = 120.8 (120.80000000000001 in floats) -> 121
    assert conformal_rank(4, 0.5) == 3 and conformal_rank(9, 0.5) == 5  # 2.5 -> 3; exactly 5 stays 5
    assert conformal_rank(4, 0.95) == 5  # > n: the exact correction is infinite


def test_cqr_corrections_and_bands_by_hand():
    # Four validation trajectories, one step, one variable, samples {0, 4} each: the 0.5 band (levels 0.25, 0.75)
    # is [1, 3], the 0.8 band [0.4, 3.6], the 0.95 band [0.1, 3.9]. Targets 2, 5, -1, 3.5; context scales 1, 2, 1,
    # 0.5. Scores of the 0.5 band: max(1 - y, y - 3) / s = -1, 2/2 = 1, 2/1 = 2, 0.5/0.5 = 1 -> sorted -1, 1, 1, 2.
    samples = np.tile(np.array([0.0, 4.0])[None, :, None, None], (4, 1, 1, 1))
    targets = np.array([2.0, 5.0, -1.0, 3.5]).reshape(4, 1, 1)
    contexts = constant_contexts([1.0, 2.0, 1.0, 0.5])
    calibration = fit_calibration(samples, targets, contexts, bands=(0.5, 0.8, 0.95))
    # 0.5: rank ceil(5 * 0.5) = 3 -> 1. 0.8: scores max(0.4 - y, y - 3.6) / s = -1.6, 0.7, 1.4, -0.2 -> sorted
    # -1.6, -0.2, 0.7, 1.4, rank ceil(4) = 4 -> 1.4. 0.95: rank 5 > 4: capped at the largest, max(0.1 - y, y - 3.9) / s
    # = -1.9, 0.55, 1.1, -0.8 -> 1.1.
    np.testing.assert_allclose(calibration.corrections[:, 0, 0], [1.0, 1.4, 1.1])
    assert calibration.capped == (0.95,) and calibration.n == 4
    # A test trajectory with samples {0, 4} and context scale 3: each band's ends move by Q * 3: 0.95's to
    # [0.1 - 3.3, 3.9 + 3.3] = [-3.2, 7.2], inside 0.8's [0.4 - 4.2, 3.6 + 4.2] = [-3.8, 7.8]; the crossing is sorted
    # away (levels 0.025 and 0.1 read -3.8 and -3.2).
    test = calibration.apply(samples[:1], constant_contexts([3.0]))
    assert calibration.levels == (0.025, 0.1, 0.25, 0.5, 0.75, 0.9, 0.975)
    np.testing.assert_allclose(test[:, 0, 0, 0], [-3.8, -3.2, 1 - 3, 2, 3 + 3, 7.2, 7.8])


def test_a_narrowed_band_that_crosses_is_rearranged():
    # The 0.5 band narrowed by 3 context scales: [1 + 3, 3 - 3] = [4, 0] crosses the median 2 and the 0.8 band
    # [0.4, 3.6]; sorting each point's quantiles gives 0, 0.4, 2, 3.6, 4.
    calibration = Calibration((0.5, 0.8), np.array([-3.0, 0.0]).reshape(2, 1, 1), n=10)
    samples = np.array([0.0, 4.0]).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(calibration.apply(samples, constant_contexts([1.0]))[:, 0, 0, 0],
                               [0.0, 0.4, 2.0, 3.6, 4.0])


def test_calibration_restores_coverage_on_exchangeable_data():
    """Too-narrow bands (samples with half the targets' spread) on trajectories of tenfold different scales:
    calibrated on 1000 validation trajectories, each band covers its share of 3000 test trajectories' values within
    3.5 points (the guarantee is over validation draws: at least b, below b + 1/1001; one draw's coverage is off by
    about sqrt(b (1 - b) / 1000), 1.6 points for the 50 % band), where the samples' 80 % band covers about 48 %."""
    rng = np.random.default_rng(7)

    def draw(n, horizon=3, k=20):
        scales = rng.uniform(0.5, 5.0, size=n)
        spread = scales[:, None, None, None] * np.array([1.0, 0.3])  # two variables, their own spreads
        samples = 0.5 * spread * rng.standard_normal((n, k, horizon, 2))
        targets = spread[:, 0] * rng.standard_normal((n, horizon, 2))
        return samples, targets, constant_contexts(scales, n_vars=2)

    calibration = fit_calibration(*draw(1000))
    samples, targets, contexts = draw(3000)
    forecast = MethodForecast(np.median(samples, axis=1), samples, calibration.apply(samples, contexts),
                              calibration.levels)
    for band in (0.5, 0.8, 0.95):
        covered = band_coverage(forecast, targets, band).mean(axis=0)
        assert np.all(np.abs(covered - band) < 0.035), (band, covered)
    assert np.all(band_coverage(forecast, targets, 0.8, calibrated=False).mean(axis=0) < 0.55)


def test_context_scales_are_the_p95_level():
    contexts = np.stack([np.stack([np.arange(1.0, 101.0), np.zeros(100)], axis=1)])
    np.testing.assert_allclose(context_scales(contexts), [[95.05, 1.0]])  # zeros: 1, no division by 0


def test_calibrated_scores_use_the_calibrated_quantiles_and_keep_the_samples_own_beside():
    rng = np.random.default_rng(3)
    samples = rng.gamma(2.0, size=(3, 5, 4, 2))
    targets = rng.gamma(2.0, size=(3, 4, 2))
    levels = calibration_levels()
    quantiles = sample_quantiles(samples, levels) * 1.5  # any calibrated quantiles, by hand
    plain = MethodForecast(np.median(samples, axis=1), samples)
    calibrated = MethodForecast(plain.point, samples, quantiles, levels)
    scores, raw = (probabilistic_scores(f, targets, np.ones((3, 6, 2))) for f in (calibrated, plain))
    for v, species in enumerate(("prey", "predator")):
        nine = quantiles[[levels.index(q) for q in QUANTILE_LEVELS]]
        assert scores[species]["wql"] == pytest.approx(weighted_quantile_loss(nine[..., v], targets[..., v]))
        low, high = quantiles[levels.index(0.1)], quantiles[levels.index(0.9)]
        inside = (low <= targets) & (targets <= high)
        assert scores[species]["coverage_80"] == pytest.approx(inside[..., v].mean())
        assert scores[species]["crps"] == raw[species]["crps"]  # CRPS: the samples'
        for key in ("wql", "coverage_50", "coverage_80", "coverage_95"):
            assert scores[species][f"{key}_uncalibrated"] == raw[species][key]
        assert "wql_uncalibrated" not in raw[species]


def test_the_temperature_criterion_by_hand():
    # geometric mean of 0.04 and 0.09 = sqrt(0.0036) = 0.06
    assert geometric_crps({"prey": {"crps": 0.04}, "predator": {"crps": 0.09}}) == pytest.approx(0.06)
    assert geometric_crps({"prey": {"crps": 0.04}, "predator": {"crps": None}}) is None
    assert geometric_crps(None) is None
    picked = choose([Candidate(0.3, {}, 0.07, 3), Candidate(0.5, {}, 0.06, 3), Candidate(0.7, {}, None, 0),
                     Candidate(1.0, {}, 0.06, 3)])
    assert picked.temperature == 0.5  # the lowest; of equals the first listed
    assert choose([Candidate(0.3, {}, None, 0)]) is None
    assert validation_temperatures(ForecastConfig(temperature="auto", temperature_grid=(0.2, 0.9))) == [0.2, 0.9]
    assert validation_temperatures(ForecastConfig(temperature=0.6, num_samples=3, calibrate=True)) == [0.6]
    assert validation_temperatures(ForecastConfig(temperature=0.6, num_samples=3)) == []


@pytest.fixture(scope="module")
def lv40(tmp_path_factory):
    path = tmp_path_factory.mktemp("lv") / "lv40.h5"
    save(path, simulate(n=40, steps=30, seed=2, substeps=10))
    return path


QUICK = ["--context", "10", "--horizon", "3", "--num-samples", "4", "--quiet", "--no-baselines"]


@pytest.fixture(scope="module")
def auto_forecast(lv40, tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    out = root / "runs" / "auto"
    status = forecasting.cli.main(["--model", "tiny", "--data", str(lv40), *QUICK, "--temperature", "auto",
                                   "--temperature-grid", "0.5,1", "--calibrate", "--limit", "3", "--val-limit", "5",
                                   "--runs-dir", str(root / "runs"), "--out", str(out)])
    assert status == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_auto_temperature_chooses_the_lowest_validation_crps(auto_forecast):
    _, summary = auto_forecast
    validation = summary["validation"]
    candidates = validation["candidates"]
    assert [c["temperature"] for c in candidates] == [0.5, 1.0]
    for c in candidates:  # the criterion by hand from the recorded per-species CRPS
        assert c["score"] == pytest.approx(math.sqrt(c["crps"]["prey"] * c["crps"]["predator"]))
    best = min(candidates, key=lambda c: c["score"])["temperature"]
    assert validation["temperature"] == best and validation["temperature_chosen"] is True
    assert summary["protocol_settings"]["temperature"] == best and summary["protocol_settings"]["tuned"] is True
    assert f"at temperature {best:g} (chosen on the validation split from 0.5, 1, by CRPS)" in summary["protocol"]


def test_validation_trajectories_never_overlap_the_test_split(auto_forecast):
    _, summary = auto_forecast
    split = split_indices(40)
    validation = summary["validation"]
    assert validation["trajectories"] == split.val[:5].tolist()
    assert summary["trajectories"] == split.test[:3].tolist()
    assert not set(validation["trajectories"]) & set(split.test.tolist())
    assert set(validation["calibration"]["trajectories"]) <= set(validation["trajectories"])
    assert validation["calibration"]["n_trajectories"] == 5


def test_every_validation_forecast_is_booked_and_counted(auto_forecast):
    out, summary = auto_forecast
    record = json.loads((out / RECORD_NAME).read_text())
    by_label = {}
    for entry in record["forecasts"]:
        by_label[entry["label"]] = by_label.get(entry["label"], 0) + entry["flops"]
    assert set(by_label) == {"model", "validation T=0.5", "validation T=1"}
    assert record["by_kind"]["forecast"] == sum(by_label.values())
    assert {k: v["total"] for k, v in summary["flops"].items()} == by_label  # metrics.json says the same
    for label in ("validation T=0.5", "validation T=1"):
        entry = next(e for e in record["forecasts"] if e["label"] == label)
        assert entry["trajectories"] == 5 and entry["selection"] == "first 5 of val split (5 trajectories)"


def test_calibrated_bands_are_the_validation_calibration_applied_to_the_test_samples(auto_forecast, lv40):
    """An independent path: the validation forecast at the chosen temperature run again in-process, its calibration
    fitted and applied to the saved test samples, gives the saved calibrated quantiles; the scores recomputed from
    samples.npz are metrics.json's."""
    from forecasting.evaluate import Protocol
    from forecasting.source import from_model
    from forecasting.tuning import run_validation, validation_selection

    out, summary = auto_forecast
    source = from_model("tiny", data_path=str(lv40))
    protocol = Protocol(context=10, horizon=3, num_samples=4, temperature=summary["validation"]["temperature"],
                        calibrate=True, scaler="p95")
    result = run_validation(source.model, source.tokenizer, source.data, source.split,
                            validation_selection(source.split, 5), protocol, progress=False)
    saved = read_samples(out / "samples.npz")
    model = saved.forecasts["model"]
    np.testing.assert_allclose(model.calibrated, result.calibration.apply(model.samples, saved.contexts))
    recomputed = scores_from_samples(out / "samples.npz")["model"]
    for species in ("prey", "predator"):
        for key in ("wql", "coverage_80", "coverage_80_uncalibrated", "coverage_95", "wql_uncalibrated", "crps"):
            assert recomputed[species][key] == pytest.approx(summary["metrics"]["model"][species][key])


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "auto", "--split", "val"], ["--split", "cannot forecast the validation split"]),
    (["--calibrate", "--temperature", "1", "--sample", "29"], ["trajectory 29 is in the validation split"]),
    (["--temperature", "auto", "--temperature-grid", "0,1"], ["--temperature-grid", "finite numbers > 0"]),
    (["--temperature", "auto", "--temperature-grid", "a,b"], ["--temperature-grid", "'a,b'"]),
    (["--temperature", "1", "--temperature-grid", "0.5,1"], ["--temperature-grid", "give --temperature auto"]),
    (["--temperature", "1", "--val-limit", "3"], ["--val-limit", "--temperature auto and --calibrate"]),
])
def test_bad_validation_settings_are_one_line_exit_2_before_anything_is_booked(tmp_path, lv40, capsys, flags,
                                                                                words):
    assert 29 in split_indices(40).val.tolist()
    runs = tmp_path / "runs"
    status = forecasting.cli.main(["--model", "tiny", "--data", str(lv40), *QUICK, *flags, "--runs-dir", str(runs)])
    lines = [line for line in lines_of(capsys.readouterr().err) if not line.startswith("trajectory ")]
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines
    assert not runs.exists()


# ---- the report's calibration section -----------------------------------------------------------------------------

NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def test_verdicts_and_bootstrap_by_hand():
    assert verdict(0.8, (0.6, 0.75)) == "too narrow beyond the noise"
    assert verdict(0.8, (0.85, 0.9)) == "too wide beyond the noise"
    assert verdict(0.8, (0.7, 0.9)) == "within the noise" and verdict(0.8, None) == "-"
    assert bootstrap_mean(np.full(7, 0.6)) == (0.6, 0.6)  # no spread between trajectories: no interval width
    # Half the trajectories fully covered, half not at all: the resampled mean is Binomial(n, 1/2) / n, whose 95 %
    # interval is about 1/2 -/+ 1.96 sqrt(1/4n): +-0.098 for n = 100.
    low, high = bootstrap_mean(np.repeat([0.0, 1.0], 50))
    assert low == pytest.approx(0.5 - 0.098, abs=0.02) and high == pytest.approx(0.5 + 0.098, abs=0.02)
    assert bootstrap_mean([]) is None


def test_the_report_shows_the_bands_the_choice_and_a_finding_backed_by_its_tables(auto_forecast, tmp_path, capsys):
    import report as report_cli

    out, summary = auto_forecast
    assert report_cli.main([str(out.parent), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    text = (tmp_path / "report.md").read_text()
    # The coverage table: every band's share recomputed from samples.npz by hand (values inside the quantiles).
    saved = read_samples(out / "samples.npz")
    model, targets = saved.forecasts["model"], saved.targets
    for v, species in enumerate(("prey", "predator")):
        for band, levels in ((0.5, (0.25, 0.75)), (0.8, (0.1, 0.9)), (0.95, (0.025, 0.975))):
            raw_low, raw_high = sample_quantiles(model.samples, levels)
            raw = ((raw_low <= targets) & (targets <= raw_high))[..., v].mean()
            low, high = (model.calibrated[model.levels.index(q)] for q in levels)
            calibrated = ((low <= targets) & (targets <= high))[..., v].mean()
            row = next(line for line in text.splitlines() if line.startswith(f"| {species} | {round(100 * band)} % |"))
            assert row.split(" | ")[2] == f"{100 * raw:.1f} %" and row.split(" | ")[5] == f"{100 * calibrated:.1f} %"
    assert "![reliability of the bands](report_figures/reliability_auto.png)" in text
    assert (tmp_path / "report_figures" / "reliability_auto.png").is_file()
    chosen = summary["validation"]["temperature"]
    assert f"| {chosen:g} |" in text and "| temperature | prey CRPS | predator CRPS | criterion |" in text
    # The Findings line, and every number of the Findings in a table (tests/test_report_study.py's rule).
    findings = text.split("## Findings")[1].split("\n## ")[0]
    line = next(x for x in findings.splitlines() if "bands of the zero-shot model" in x)
    assert "the 80 % band covers" in line and "calibrated on the validation split, it covers" in line
    assert "bootstrap intervals over 3 trajectories" in line
    tables = {n for x in text.splitlines() if x.startswith("|") for n in NUMBER.findall(x)}
    assert [n for n in NUMBER.findall(findings) if n not in tables] == []


# ---- a plan's forecasts: counted before they run, and run ----------------------------------------------------------

PLAN = """[study]
name = "{name}"

[train]
model = "tiny"
data = "{data}"

[forecast]
context = 10
horizon = 3
num_samples = 2
baselines = []
{extra}

[[stage]]
name = "zero_shot"
forecast = "base"
"""


def test_a_plan_counts_and_runs_the_validation_forecasts(lv40, tmp_path, capsys):
    """flops.py --plan: a forecast with temperature "auto" over two temperatures and calibrate counts exactly its
    test forecast and two validation forecasts, each counted as the same plan forecasting the val split would count
    it; train.py --plan then runs them and metrics.json says what they chose."""
    import train
    from study.estimate import estimate_plan
    from study.plan import load_plan

    def estimate(name, extra):
        path = tmp_path / f"{name}.toml"
        path.write_text(PLAN.format(name=name, data=lv40, extra=extra))
        return estimate_plan(load_plan(path, runs_dir=tmp_path / "runs")).stages[0].forecast, path

    auto, path = estimate("auto", 'limit = 2\ntemperature = "auto"\ntemperature_grid = [0.5, 1.0]\n'
                                  "calibrate = true\nval_limit = 3")
    plain, _ = estimate("plain", "limit = 2\ntemperature = 0.5")
    val, _ = estimate("val", 'limit = 3\ntemperature = 0.5\nsplit = "val"')
    assert auto == plain + 2 * val and val > 0
    calibrate_only, _ = estimate("cal", "limit = 2\ntemperature = 0.5\ncalibrate = true\nval_limit = 3")
    assert calibrate_only == plain + val
    assert train.main(["--plan", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    summary = json.loads((tmp_path / "runs" / "auto" / "zero_shot" / "metrics.json").read_text())
    assert [c["temperature"] for c in summary["validation"]["candidates"]] == [0.5, 1.0]
    assert summary["validation"]["calibration"]["n_trajectories"] == 3
    assert "coverage_80_uncalibrated" in summary["metrics"]["model"]["prey"]


@pytest.mark.parametrize("splits, words", [(["test"], "test values"), (["val"], "validation values"),
                                           (["test", "val"], "values")])
def test_the_coverage_names_the_split_it_was_measured_on(splits, words):
    """The demo's model choice forecasts the validation split: its Findings line once said "test values"."""
    assert scored_values(SimpleNamespace(splits=splits)) == words
