"""forecast.py and forecasting/: the number grammar, batched generation, metrics, baselines and the CLI."""
import csv
import json

import numpy as np
import pytest
import torch

import forecast
from data.dataset import make_eval_example
from data.llmtime import decode
from data.lotka_volterra import load, save, simulate, split_indices
from forecasting.baselines import gradient_matching_guess, lotka_volterra_forecast, persistence
from forecasting.forecast import forecast_examples
from forecasting.grammar import NumberGrammar, StepCounter, max_forecast_tokens, single_token_ids
from forecasting.metrics import forecast_metrics, per_trajectory_errors
from qwen_mini import Qwen, QwenConfig, char_tokenizer, load_model_and_tokenizer, save_pretrained

HORIZON = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are far too small to share between threads, and on a busy 2-core machine a second
    spinning thread slows every step a hundredfold; restored for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path, monkeypatch):
    """Should a CLI call fall back to the default data set, it is simulated here, not into the user's cache."""
    monkeypatch.setenv("QWEN_MINI_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny", seed=0)


@pytest.fixture(scope="module")
def examples():
    data = simulate(n=6, steps=40, seed=11)
    return [make_eval_example(data.trajectories[i], i, n_context=20, horizon=HORIZON) for i in range(6)]


def assert_well_formed(text: str, steps: int, n_vars: int = 2, decimals: int = 2):
    """Exactly `steps` steps of `n_vars` numbers "d.dd" (1-3 integer digits, no leading zero), each ending in ";"."""
    assert text.endswith(";") and text.count(";") == steps, text
    for step in text[:-1].split(";"):
        numbers = step.split(",")
        assert len(numbers) == n_vars, text
        for number in numbers:
            integer, fraction = number.split(".")
            assert 1 <= len(integer) <= 3 and (integer == "0" or not integer.startswith("0")), text
            assert len(fraction) == decimals and (integer + fraction).isdigit(), text


# ---- the grammar -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.5, num_samples=3, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_constrained_output_of_a_random_model_always_parses_to_exactly_the_horizon(tiny, examples, sampling):
    model, tokenizer = tiny
    forecasts = forecast_examples(model, tokenizer, examples, batch=4, progress=False, seed=1, **sampling)
    for ex, fc in zip(examples, forecasts):
        assert len(fc.texts) == sampling.get("num_samples", 1)
        for text, report in zip(fc.texts, fc.reports):
            assert_well_formed(text, HORIZON)
            assert report.ok and report.n_steps == HORIZON
            values, _ = decode(text, ex.scaler, decimals=2)
            np.testing.assert_array_equal(fc.samples[fc.texts.index(text)], values)
        assert fc.parse_failures == 0 and fc.samples.shape == (len(fc.texts), HORIZON, 2)


def test_grammar_allows_exactly_the_next_characters_of_a_number(tiny):
    tokenizer = char_tokenizer()
    grammar = NumberGrammar(tokenizer, 32, batch=1, n_vars=2, horizon=1, decimals=2, int_digits=2)
    written, allowed = [], []
    for ch in "10.25,0.50;":
        mask = grammar(len(written), torch.tensor([written], dtype=torch.long))
        allowed.append({tokenizer.decode([i]) for i in mask[0].nonzero().flatten().tolist()})
        written.append(tokenizer.token_to_id(ch))
    mask = grammar(len(written), torch.tensor([written]))
    digits = set("0123456789")
    assert allowed[0] == digits  # a number starts with a digit (no minus: off by default)
    assert allowed[1] == digits | {"."}  # "1": a second integer digit or the point
    assert allowed[2] == {"."}  # "10": int_digits=2 reached
    assert allowed[3] == allowed[4] == digits  # exactly two decimals
    assert allowed[5] == {","}  # first variable done
    assert allowed[7] == {"."}  # "0": no leading zeros
    assert allowed[10] == {";"}  # last variable done: the step ends
    assert {tokenizer.decode([i]) for i in mask[0].nonzero().flatten().tolist()} == {"<|eos|>"}  # horizon reached
    assert max_forecast_tokens(horizon=1, n_vars=2, decimals=2, int_digits=2) == len("10.25,10.25;") + 1


def test_grammar_with_negatives_and_without_decimals():
    tokenizer = char_tokenizer()
    grammar = NumberGrammar(tokenizer, 32, batch=2, n_vars=1, horizon=2, decimals=0, allow_negative=True)
    rows = ["-7;", "40;"]
    seen = [[], []]
    for step in range(3):
        generated = torch.tensor([[tokenizer.token_to_id(c) for c in row[:step]] for row in rows]).view(2, step)
        mask = grammar(step, generated)
        for r in range(2):
            seen[r].append({tokenizer.decode([i]) for i in mask[r].nonzero().flatten().tolist()})
    digits = set("0123456789")
    assert seen[0][0] == digits | {"-"} and seen[0][1] == digits and seen[0][2] == digits | {";"}
    assert seen[1][1] == digits | {";"}  # "4": no point when decimals=0
    assert seen[1][2] == digits | {";"}  # "40"


def test_grammar_refuses_a_tokenizer_that_splits_a_character():
    class NoSemicolon:
        eos_id = 1

        def token_to_id(self, ch):
            return None if ch == ";" else 2 + "0123456789.,-".index(ch)

        def encode(self, ch):
            return [self.token_to_id(ch)]

    with pytest.raises(ValueError, match="needs ';' to be exactly one token"):
        NumberGrammar(NoSemicolon(), 32, batch=1, n_vars=2, horizon=1)
    with pytest.raises(RuntimeError, match="new grammar for every generate call"):
        grammar = NumberGrammar(char_tokenizer(), 32, batch=1, n_vars=2, horizon=1)
        grammar(0, torch.zeros(1, 0, dtype=torch.long))
        grammar(5, torch.zeros(1, 5, dtype=torch.long))


def test_grammar_with_qwens_tokenizer_and_vocabulary(qwen_tokenizer, examples):
    """Qwen's vocabulary is mostly multi-character tokens, and the model's vocabulary (151936) exceeds the
    tokenizer's: a random model with that vocabulary still writes only well-formed steps, one character a token."""
    tokenizer = qwen_tokenizer
    assert single_token_ids(tokenizer, "0123456789.,;") == {**{str(d): 15 + d for d in range(10)},
                                                             ".": 13, ",": 11, ";": 26}
    config = QwenConfig(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = Qwen(config).eval()
    for sampling in (dict(), dict(temperature=2.0, num_samples=2)):
        forecasts = forecast_examples(model, tokenizer, examples[:2], batch=4, progress=False, **sampling)
        for fc in forecasts:
            for text in fc.texts:
                assert_well_formed(text, HORIZON)


# ---- batching and unconstrained generation ----------------------------------------------------------------------

def test_batched_forecasting_equals_one_trajectory_at_a_time(tiny):
    model, tokenizer = tiny
    data = simulate(n=6, steps=40, seed=11)
    # Contexts of 15..25 steps: prompts of different lengths, so the batches are left padded.
    examples = [make_eval_example(data.trajectories[i], i, n_context=15 + 2 * i, horizon=HORIZON) for i in range(6)]
    # 6 trajectories in batches of 4 (the second one partly filled) against one at a time: same greedy tokens.
    batched = forecast_examples(model, tokenizer, examples, batch=4, progress=False)
    for ex, fc in zip(examples, batched):
        alone = forecast_examples(model, tokenizer, [ex], batch=1, progress=False)[0]
        assert alone.texts == fc.texts
        np.testing.assert_array_equal(alone.samples, fc.samples)


@pytest.mark.parametrize("constrained", [True, False], ids=["grammar", "step_counter"])
def test_jump_forward_forecasts_are_the_plain_ones(tiny, examples, constrained):
    """Sampled, several per trajectory, batched: the same texts with jump-forward decoding as without."""
    model, tokenizer = tiny
    kwargs = dict(batch=6, progress=False, seed=2, temperature=1.2, num_samples=2, constrained=constrained)
    plain = forecast_examples(model, tokenizer, examples, **kwargs)
    jumped = forecast_examples(model, tokenizer, examples, jump_forward=True, **kwargs)
    assert [fc.texts for fc in jumped] == [fc.texts for fc in plain]


def test_unconstrained_failures_are_counted_not_raised(tiny, examples):
    model, tokenizer = tiny
    forecasts = forecast_examples(model, tokenizer, examples[:3], constrained=False, progress=False)
    for ex, fc in zip(examples, forecasts):
        values, report = decode(fc.texts[0], ex.scaler, decimals=2)
        assert fc.reports[0] == report  # what the forecaster reports is what decoding the text says
        complete = report.n_steps >= HORIZON
        assert fc.parse_failures == (0 if complete else 1)
        assert np.isnan(fc.samples[0, report.n_steps:]).all() and np.isfinite(fc.samples[0, :report.n_steps]).all()
        assert fc.texts[0].count(";") <= HORIZON  # the step counter ends every row at the horizon
    assert sum(fc.parse_failures for fc in forecasts) > 0  # a random model does write garbage


def test_step_counter_stops_a_row_after_horizon_separators():
    tokenizer = char_tokenizer()
    counter = StepCounter(tokenizer, 32, batch=2, horizon=2)
    semicolon, digit = tokenizer.token_to_id(";"), tokenizer.token_to_id("5")
    counter(0, torch.zeros(2, 0, dtype=torch.long))
    counter(1, torch.tensor([[semicolon], [digit]]))
    mask = counter(2, torch.tensor([[semicolon, semicolon], [digit, semicolon]]))
    assert mask[0].nonzero().flatten().tolist() == [tokenizer.eos_id]  # two steps written: only stop
    assert bool(mask[1].all())  # one step written: anything


# ---- metrics and baselines ---------------------------------------------------------------------------------------

def test_metrics_match_a_hand_computation():
    targets = np.array([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 2.0], [2.0, 2.0]]])  # 2 trajectories, 2 steps, 2 species
    predictions = np.array([[[2.0, 2.0], [3.0, 1.0]], [[2.0, 4.0], [0.0, 2.0]]])
    m = forecast_metrics(predictions, targets)
    # prey errors: traj 0 (1, 0), traj 1 (0, -2). MSE = (1 + 0 + 0 + 4) / 4 = 1.25, MAE = 3/4.
    # prey targets 1, 3, 2, 2: mean 2, SST = 1 + 1 + 0 + 0 = 2, SSE = 5 -> R2 = 1 - 5/2 = -1.5.
    # per-trajectory MSE 0.5 and 2 -> median 1.25; by step: MSE (1+0)/2, (0+4)/2; MAE (1+0)/2, (0+2)/2.
    prey = m["prey"]
    assert (prey["mse"], prey["mae"], prey["r2"], prey["median_trajectory_mse"]) == (1.25, 0.75, -1.5, 1.25)
    assert prey["mse_by_step"] == [0.5, 2.0] and prey["mae_by_step"] == [0.5, 1.0]
    # predator errors: traj 0 (0, -3), traj 1 (2, 0). MSE = 13/4, MAE = 5/4; targets 2, 4, 2, 2: mean 2.5,
    # SST = 0.25 + 2.25 + 0.25 + 0.25 = 3 -> R2 = 1 - 13/3; per-trajectory MSE 4.5 and 2 -> median 3.25.
    pred = m["predator"]
    assert (pred["mse"], pred["mae"], pred["median_trajectory_mse"]) == (3.25, 1.25, 3.25)
    assert pred["r2"] == pytest.approx(1 - 13 / 3, rel=1e-15)
    errors = per_trajectory_errors(predictions, targets)
    assert errors["prey_mse"].tolist() == [0.5, 2.0] and errors["predator_mae"].tolist() == [1.5, 1.0]


def test_persistence_is_the_last_context_value():
    context = np.array([[1.0, 2.0], [3.0, 5.0]])
    assert persistence(context, 3).tolist() == [[3.0, 5.0]] * 3


def test_lv_fit_recovers_known_parameters_from_a_noise_free_context():
    data = simulate(n=4, steps=100, seed=21, prior="lv")
    forecasts, fit = lotka_volterra_forecast(data.trajectories[:, :50], data.time, 50)
    true = np.stack([data.params[k] for k in ("alpha", "beta", "gamma", "delta")], axis=1)
    assert (np.abs(fit.params - true) / true).max() <= 1e-2
    np.testing.assert_allclose(fit.state0, np.stack([data.params["x0"], data.params["y0"]], 1), rtol=1e-2)
    future = data.trajectories[:, 50:]
    assert np.abs(forecasts - future).max() <= 1e-3 * future.max()  # 50 steps ahead, ~2 orbits


def test_gradient_matching_guess_is_close_on_clean_data():
    data = simulate(n=3, steps=400, seed=5, t_end=200, prior="lv")  # fine sampling: finite differences are accurate
    guess = gradient_matching_guess(data.trajectories, data.time)
    true = np.stack([data.params[k] for k in ("alpha", "beta", "gamma", "delta")], axis=1)
    assert (np.abs(guess[:, :4] - true) / true).max() < 0.1


# ---- the command line --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thousand_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("lv") / "lv1000.h5"
    save(path, simulate(n=1000, steps=100, seed=3, substeps=10, prior="lv"))
    return str(path)


def test_cli_sample_972_writes_plots_and_metrics(thousand_h5, tmp_path, capsys):
    out = tmp_path / "fc"
    code = forecast.main(["--model", "tiny", "--data", thousand_h5, "--sample", "972", "--out", str(out), "--quiet",
                          "--runs-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("metrics.json", "per_trajectory.csv", "trajectory_972.png", "error_vs_horizon.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "error_distribution.png").exists()  # no histogram of one trajectory
    result = json.loads((out / "metrics.json").read_text())
    assert result["trajectories"] == [972] and result["parse_failures"] == 0 and result["n_scored"] == 1
    # (no untrained baseline: --model forecasts with the untrained model itself)
    assert set(result["metrics"]) == {"model", "persistence", "seasonal_naive", "lv_fit"}
    assert result["protocol_settings"]["context"] == 50 and result["protocol_settings"]["horizon"] == 50
    assert result["metrics"]["lv_fit"]["prey"]["mse"] < 1e-4  # noise-free LV data: the fit is near exact
    assert result["lv_fit"]["fallbacks_to_persistence"] == 0 and result["seasonal_naive"]["no_period_found"] == 0
    with open(out / "per_trajectory.csv") as f:
        row, = csv.DictReader(f)
    assert row["lv_variant"] in ("classic", "logistic") and row["lv_fallback"] == "False"
    assert 10 <= int(row["seasonal_period"]) <= 40 and float(row["seasonal_naive_prey_mse"]) >= 0
    assert "scaler fitted on the context only" in captured.out and "tokens/s" in captured.out
    assert split_indices(1000).which(972) == "test"  # a plain model's data is split as train.py splits it
    assert "trajectory 972 is in the test split" in captured.err


def test_cli_errors_name_the_bad_value(thousand_h5, tmp_path, capsys):
    assert forecast.main(["--model", "tiny", "--data", thousand_h5, "--sample", "1000", "--quiet"]) == 2
    assert "trajectory index 1000 is out of range" in capsys.readouterr().err
    assert forecast.main(["--run", str(tmp_path / "missing_run"), "--quiet"]) == 2
    assert "missing_run: no such run directory" in capsys.readouterr().err
    assert forecast.main(["--model", "tiny", "--baselines", "oracle", "--quiet"]) == 2
    assert "unknown baseline(s) ['oracle']" in capsys.readouterr().err
    assert forecast.main(["--model", "tiny", "--data", thousand_h5, "--context", "60", "--quiet"]) == 2
    assert "--context 60 + --horizon 50 steps exceed the 100 steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        forecast.main(["--model", "tiny", "--top-p", "1.5"])
    assert exit_info.value.code == 2 and "1.5" in capsys.readouterr().err


def make_run_dir(root, data_path, test_indices, n):
    """A --full run directory as train.py lays it out (training/run.py): config.json and model/ (weights of a
    tiny model with other random weights than the base, and the tokenizer)."""
    run = root / "run"
    torch.manual_seed(1)
    trained = Qwen(QwenConfig.from_name("tiny")).eval()
    save_pretrained(trained, run / "model")
    char_tokenizer().save_pretrained(run / "model")
    rest = [i for i in range(n) if i not in test_indices]
    split = {"seed": 0, "fractions": [0.7, 0.15, 0.15], "n": n, "train": rest[:-2], "val": rest[-2:],
             "test": list(test_indices)}
    config = {"model": "tiny", "full": True, "data": data_path, "decimals": 2, "split": split, "fit_steps": 50,
              "model_seed": 0}
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_cli_run_uses_its_split_and_compares_with_its_untrained_base(tmp_path, capsys):
    data_path = tmp_path / "lv12.h5"
    save(data_path, simulate(n=12, steps=70, seed=4, substeps=10))
    run = make_run_dir(tmp_path, str(data_path), test_indices=[3, 7, 10], n=12)
    code = forecast.main(["--run", str(run), "--horizon", "10", "--quiet", "--baselines", "persistence,untrained",
                          "--runs-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((run / "forecast" / "metrics.json").read_text())
    assert result["trajectories"] == [3, 7, 10] and result["n_scored"] == 3
    with open(run / "forecast" / "per_trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["index"], r["split"]) for r in rows] == [("3", "test"), ("7", "test"), ("10", "test")]
    # the untrained baseline is the tiny base (seed 0), forecast exactly as `--model tiny` forecasts it
    base, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    data = load(data_path)
    examples = [make_eval_example(data.trajectories[i], i, 50, 10) for i in (3, 7, 10)]
    expected = np.stack([f.median for f in forecast_examples(base, tokenizer, examples, progress=False)])
    targets = np.stack([ex.target for ex in examples])
    assert result["metrics"]["untrained"]["prey"]["mse"] == pytest.approx(
        float(((expected - targets)[..., 0] ** 2).mean()), rel=1e-12)
    # persistence, scored by hand
    last = np.stack([ex.context[-1] for ex in examples])[:, None, :]
    assert result["metrics"]["persistence"]["predator"]["mae"] == pytest.approx(
        float(np.abs(last - targets)[..., 1].mean()), rel=1e-12)
    assert result["metrics"]["model"] != result["metrics"]["untrained"]  # the run's weights are not the base's


def test_plot_legends_name_the_forecaster_as_the_tables_do(tmp_path, capsys, monkeypatch):
    """A plain --model forecast is the zero-shot model, a --run forecast the fine-tuned one, in every figure's
    legend, with or without the untrained baseline beside it (issue 34: one vocabulary)."""
    import importlib

    evaluate = importlib.import_module("forecasting.evaluate")  # (the package exports a function of that name)
    labels = []
    for name in ("plot_trajectory", "plot_error_vs_horizon"):
        real = getattr(evaluate, name)
        monkeypatch.setattr(evaluate, name,
                            lambda *a, _real=real, **k: labels.append(k.get("model_label")) or _real(*a, **k))
    data_path = tmp_path / "lv12.h5"
    save(data_path, simulate(n=12, steps=70, seed=4, substeps=10))
    run = make_run_dir(tmp_path, str(data_path), test_indices=[3, 7, 10], n=12)
    common = ["--horizon", "10", "--quiet", "--baselines", "persistence", "--runs-dir", str(tmp_path)]
    assert forecast.main(["--run", str(run), *common]) == 0, capsys.readouterr().err
    assert labels and set(labels) == {"fine-tuned"}
    labels.clear()
    assert forecast.main(["--model", "tiny", "--data", str(data_path), "--out", str(tmp_path / "zs"), *common]) == 0
    assert labels and set(labels) == {"zero-shot"}
