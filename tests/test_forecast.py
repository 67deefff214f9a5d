"""forecast.py and forecasting/: the grammar, batching, metrics, baselines and the CLI."""
import json

import numpy as np
import pytest
import torch

import forecast
from data.dataset import make_eval_example
from data.llmtime import decode
from data.lotka_volterra import save, simulate
from forecasting.baselines import fit_lotka_volterra, lotka_volterra_forecast, persistence
from forecasting.forecast import forecast_examples
from forecasting.grammar import NumberGrammar
from forecasting.metrics import forecast_metrics
from qwen_mini import char_tokenizer, load_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny", seed=0)


@pytest.fixture(scope="module")
def examples():
    data = simulate(n=6, steps=40, seed=11)
    return [make_eval_example(data.trajectories[i], i, n_context=20, horizon=8) for i in range(6)]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.5, num_samples=3, top_p=0.95)])
def test_constrained_output_always_parses_to_exactly_the_horizon(tiny, examples, sampling):
    model, tokenizer = tiny
    forecasts = forecast_examples(model, tokenizer, examples, batch=4, progress=False, seed=1, **sampling)
    for fc in forecasts:
        for text, report in zip(fc.texts, fc.reports):
            assert report.ok and report.n_steps == 8, text
            assert text.count(";") == 8 and all(len(number.split(".")[1]) == 2
                                                for step in text.split(";")[:-1] for number in step.split(","))
        assert np.isfinite(fc.samples).all() and fc.samples.shape == (sampling.get("num_samples", 1), 8, 2)


def test_batched_forecasting_equals_one_trajectory_at_a_time(tiny, examples):
    model, tokenizer = tiny
    batched = forecast_examples(model, tokenizer, examples, batch=6, progress=False)
    for ex, fc in zip(examples, batched):
        alone = forecast_examples(model, tokenizer, [ex], batch=1, progress=False)[0]
        assert alone.texts == fc.texts


def test_unconstrained_failures_are_counted_not_raised(tiny, examples):
    model, tokenizer = tiny
    forecasts = forecast_examples(model, tokenizer, examples[:2], constrained=False, progress=False)
    for fc in forecasts:  # a random model writes garbage: it is reported, the valid prefix kept
        report = fc.reports[0]
        values, again = decode(fc.texts[0], examples[0].scaler, decimals=2)
        assert report.n_steps == again.n_steps
        assert np.isnan(fc.samples[0, report.n_steps:]).all() if report.n_steps < 8 else True


def test_grammar_by_hand():
    tok = char_tokenizer()
    grammar = NumberGrammar(tok, 32, batch=1, n_vars=2, horizon=1, decimals=2, int_digits=2)
    allowed_text = []

    def allowed_chars(step, generated):
        mask = grammar(step, generated)[0]
        return {tok.decode([i]) for i in mask.nonzero().flatten().tolist()}

    written = []
    for ch in "10.25,0.50;":
        allowed_text.append(allowed_chars(len(written), torch.tensor([written])))
        written.append(tok.encode(ch)[0])
    digits = set("0123456789")
    assert allowed_text[0] == digits  # first digit
    assert allowed_text[1] == digits | {"."}
    assert allowed_text[2] == {"."}  # int_digits=2 reached
    assert allowed_text[3] == allowed_text[4] == digits
    assert allowed_text[5] == {","}
    assert allowed_text[7] == {"."}  # after a leading zero only the point
    assert allowed_text[10] == {";"}
    assert allowed_chars(len(written), torch.tensor([written])) == {"<|eos|>"}  # horizon reached


def test_metrics_match_a_hand_computation():
    targets = np.array([[[1.0, 2.0], [3.0, 4.0]]])  # one trajectory, 2 steps, 2 species
    predictions = np.array([[[2.0, 2.0], [3.0, 1.0]]])
    m = forecast_metrics(predictions, targets)
    # prey errors (1, 0): MSE 0.5, MAE 0.5, SST = (1-2)^2 + (3-2)^2 = 2 -> R2 = 1 - 1/2
    assert m["prey"]["mse"] == 0.5 and m["prey"]["mae"] == 0.5 and m["prey"]["r2"] == 0.5
    # predator errors (0, -3): MSE 4.5, MAE 1.5, SST = 1 + 1 = 2 -> R2 = 1 - 9/2
    assert m["predator"]["mse"] == 4.5 and m["predator"]["mae"] == 1.5 and m["predator"]["r2"] == -3.5
    assert m["prey"]["mse_by_step"] == [1.0, 0.0] and m["predator"]["mae_by_step"] == [0.0, 3.0]


def test_persistence_is_the_last_context_value():
    context = np.array([[1.0, 2.0], [3.0, 5.0]])
    assert persistence(context, 3).tolist() == [[3.0, 5.0]] * 3


def test_lv_fit_recovers_known_parameters_from_a_noise_free_context():
    data = simulate(n=8, steps=100, seed=21)
    forecast_values, fit = lotka_volterra_forecast(data.trajectories[:, :50], data.time, 50)
    true = np.stack([data.params[k] for k in ("alpha", "beta", "gamma", "delta")], axis=1)
    assert (np.abs(fit["params"] - true) / true).max() <= 1e-2
    np.testing.assert_allclose(fit["state0"], np.stack([data.params["x0"], data.params["y0"]], 1), rtol=1e-2)
    error = np.abs(forecast_values - data.trajectories[:, 50:]).max() / data.trajectories[:, 50:].max()
    assert error <= 1e-2


@pytest.fixture(scope="module")
def thousand_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("lv") / "lv1000.h5"
    save(path, simulate(n=1000, steps=100, seed=3))
    return str(path)


def test_cli_sample_972_writes_plots_and_metrics(thousand_h5, tmp_path, capsys):
    out = tmp_path / "fc"
    code = forecast.main(["--model", "tiny", "--data", thousand_h5, "--sample", "972", "--out", str(out), "--quiet",
                          "--horizon", "20", "--baselines", "persistence"])
    assert code == 0
    for name in ("metrics.json", "per_trajectory.csv", "trajectory_972.png", "error_vs_horizon.png",
                 "error_distribution.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "metrics.json").read_text())
    assert result["parse_failures"] == 0 and set(result["metrics"]) == {"model", "persistence"}
    assert "scaler fitted on the context only" in capsys.readouterr().out


def test_cli_errors_are_clear(thousand_h5, tmp_path, capsys):
    assert forecast.main(["--model", "tiny", "--data", thousand_h5, "--sample", "1000", "--quiet"]) == 2
    assert "trajectory index 1000 is out of range" in capsys.readouterr().err
    assert forecast.main(["--run", str(tmp_path / "missing_run"), "--quiet"]) == 2
    assert "missing_run: no such run directory" in capsys.readouterr().err
    assert forecast.main(["--model", "tiny", "--baselines", "oracle", "--quiet"]) == 2
    assert "unknown baseline(s) ['oracle']" in capsys.readouterr().err
