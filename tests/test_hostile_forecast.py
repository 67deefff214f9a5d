"""Hostile input, round 3 (issue 35), forecast.py's part: a run's data that moved, a plain model's forecast put in a
run's directory, default output folders that collided, sampling settings that underflowed, memory and position
limits, seeds and budgets too large for their types, --sample with --split, data too small for the scaler; and
issue 34's progress inside one generate call.

Every case runs forecast.py's real `main` in-process and checks the exit status, one line naming the value at fault
(no traceback), and what was (not) written; the numbers are checked against hand computations."""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil

import pytest
import torch
from test_faults import lines_of
from test_forecast import make_run_dir, one_thread  # noqa: F401 (an autouse fixture: one thread)

import forecasting.cli
import qwen_mini
from common.exit_codes import EXIT_FAILED, EXIT_USAGE
from data.lotka_volterra import DataError, LVData, load, save, simulate
from forecasting.config import ForecastConfig, ForecastConfigError
from forecasting.source import from_run
from ledger import RECORD_NAME
from qwen_mini import sample_next

QUICK = ["--horizon", "4", "--context", "10", "--quiet"]


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path, monkeypatch):
    """A fallback to the built-in simulated set would be simulated here (and seen: the cache is not empty)."""
    monkeypatch.setenv("QWEN_MINI_CACHE", str(tmp_path / "cache"))


def forecast_main(capsys, *argv) -> tuple[int, list[str]]:
    status = forecasting.cli.main([str(a) for a in argv])
    return status, lines_of(capsys.readouterr().err)


def notes_and_errors(lines: list[str]) -> list[str]:
    """stderr lines but the selection's own ('forecasting ...', 'trajectory i is in the ... split')."""
    return [line for line in lines if not line.startswith(("forecasting ", "trajectory "))]


@pytest.fixture
def small_h5(tmp_path) -> str:
    path = tmp_path / "lv12.h5"
    save(path, simulate(n=12, steps=40, seed=4, substeps=10))
    return str(path)


def sha256_of(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_on(tmp_path, data_path: str):
    """A run directory (test_forecast.make_run_dir) that trained on `data_path`, recording its sha256 as train.py
    does."""
    run = make_run_dir(tmp_path / "runs", data_path, test_indices=[3, 7, 10], n=12)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data_sha256": sha256_of(data_path)}))
    return run


# ---- 1: a run's data moved or deleted -------------------------------------------------------------------------------

def test_a_runs_data_moved_away_is_refused_naming_it_and_data_not_the_simulated_set(tmp_path, small_h5, capsys):
    run = run_on(tmp_path, small_h5)
    moved = tmp_path / "elsewhere.h5"
    shutil.move(small_h5, moved)
    status, lines = forecast_main(capsys, "--run", run, "--runs-dir", run.parent, *QUICK)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert small_h5 in lines[0] and "--data" in lines[0] and "simulated" not in lines[0], lines
    assert not (tmp_path / "cache").exists() and not (run / "forecast").exists()  # nothing simulated, nothing written
    with pytest.raises(DataError, match=re.escape(small_h5)):  # a plan's forecast stage (study.run) gets the same
        from_run(run, context=10)
    # the file at its new place is the run's data (the same bytes): its recorded split, no "not the run's data"
    status, lines = forecast_main(capsys, "--run", run, "--runs-dir", run.parent, "--data", moved, *QUICK)
    assert status == 0, lines
    result = json.loads((run / "forecast" / "metrics.json").read_text())
    assert result["trajectories"] == [3, 7, 10] and result["data"] == str(moved)
    assert not any("not the data run" in note for note in result["notes"]), result["notes"]


def test_a_run_on_the_simulated_set_still_forecasts_it(tmp_path, capsys):
    run = make_run_dir(tmp_path / "runs", None, test_indices=[], n=1000)  # "data": null: the built-in set
    config = json.loads((run / "config.json").read_text())
    split = config["split"]
    split["test"], split["train"] = split["train"][-3:], split["train"][:-3]
    (run / "config.json").write_text(json.dumps(config))
    assert from_run(run, context=10).data.path.startswith(str(tmp_path / "cache"))


# ---- 5: a plain model's forecast in a run's directory ---------------------------------------------------------------

def test_a_plain_models_forecast_into_a_run_directory_is_refused_and_one_beside_it_names_its_model(tmp_path, small_h5,
                                                                                                 capsys):
    run = run_on(tmp_path, small_h5)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    status, lines = forecast_main(capsys, "--model", "tiny", "--data", small_h5, "--runs-dir", run.parent,
                                  "--out", run, "--limit", "1", *QUICK)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert f"--out {run}" in lines[0] and "training run" in lines[0], lines
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before and not (run / RECORD_NAME).exists()
    status, lines = forecast_main(capsys, "--model", "tiny", "--data", small_h5, "--runs-dir", run.parent,
                                  "--out", run / "model", "--limit", "1", *QUICK)  # among the run's weights
    assert status == EXIT_USAGE and len(lines) == 1 and "holds a model's weights (model.safetensors)" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # inside the run's directory (the demo's zero-shot winner): allowed, booked in its own record, and metrics.json
    # says which model forecast, so nothing presents it as the run's
    out = run / "forecast"
    status, lines = forecast_main(capsys, "--model", "tiny", "--data", small_h5, "--runs-dir", run.parent,
                                  "--out", out, "--limit", "1", *QUICK)
    assert status == 0, lines
    assert json.loads((out / "metrics.json").read_text())["forecaster"] == {"model": "tiny", "run": None}
    assert (out / RECORD_NAME).is_file() and not (run / RECORD_NAME).exists()
    status, _ = forecast_main(capsys, "--run", run, "--data", small_h5, "--runs-dir", run.parent,
                              "--out", run / "forecast_run", "--limit", "1", *QUICK)
    assert status == 0
    assert json.loads((run / "forecast_run" / "metrics.json").read_text())["forecaster"] == {
        "model": "tiny", "run": str(run)}


# ---- 6: default output folders per selection ------------------------------------------------------------------------

def test_default_output_folders_differ_per_selection_and_keep_each_others_plots(tmp_path, small_h5, capsys):
    runs = tmp_path / "runs"
    common = ["--model", "tiny", "--data", small_h5, "--runs-dir", runs, "--no-baselines", *QUICK]
    assert forecast_main(capsys, *common, "--sample", *range(1, 8))[0] == 0
    first = runs / "forecasts" / ("tiny_1_2_3_4_5_and_2_more_" + hashlib.sha256(b"1,2,3,4,5,6,7").hexdigest()[:8])
    assert {p.name for p in first.glob("trajectory_*.png")} == {f"trajectory_{i}.png" for i in range(1, 8)}
    assert forecast_main(capsys, *common, "--sample", 1, 2, 3, 4, 5, 8)[0] == 0
    second = runs / "forecasts" / ("tiny_1_2_3_4_5_and_1_more_" + hashlib.sha256(b"1,2,3,4,5,8").hexdigest()[:8])
    assert json.loads((second / "metrics.json").read_text())["trajectories"] == [1, 2, 3, 4, 5, 8]
    assert json.loads((first / "metrics.json").read_text())["trajectories"] == list(range(1, 8))
    assert (first / "trajectory_6.png").is_file() and (first / "trajectory_7.png").is_file()
    # a split and a limit are selections too
    assert forecast_main(capsys, *common, "--split", "val", "--limit", "1")[0] == 0
    assert forecast_main(capsys, *common, "--limit", "1")[0] == 0
    assert (runs / "forecasts" / "tiny_val_first1" / "metrics.json").is_file()
    assert (runs / "forecasts" / "tiny_first1" / "metrics.json").is_file()


# ---- 9: sampling settings that underflow float32 --------------------------------------------------------------------

def test_a_tiny_top_p_or_temperature_draws_the_top_token_not_garbage():
    logits = torch.tensor([[0.0, 2.5, 1.0, -3.0], [4.0, 0.5, 4.5, 0.0]])
    top = logits.argmax(-1)
    for kwargs in ({"temperature": 1.0, "top_p": 1e-50}, {"temperature": 1e-320}, {"temperature": 1e-40},
                   {"temperature": 1e-320, "top_p": 1e-50}):
        for u in (0.0, 0.5, 0.999999):
            drawn = sample_next(logits, uniform=torch.full((2,), u), **kwargs)
            assert torch.equal(drawn, top), (kwargs, u, drawn)
    # two tokens tied for the top at a vanishing temperature: each is drawn with probability 1/2
    tied = torch.tensor([[1.0, 3.0, 3.0]])
    assert sample_next(tied, temperature=1e-320, uniform=torch.tensor([0.25])).item() == 1
    assert sample_next(tied, temperature=1e-320, uniform=torch.tensor([0.75])).item() == 2


def test_a_tiny_top_p_forecast_is_scored_like_the_greedy_one(tmp_path, small_h5, capsys):
    runs = tmp_path / "runs"
    common = ["--model", "tiny", "--data", small_h5, "--runs-dir", runs, "--limit", "2", "--no-baselines", *QUICK]
    assert forecast_main(capsys, *common, "--out", runs / "greedy")[0] == 0
    status, lines = forecast_main(capsys, *common, "--temperature", "1", "--top-p", "1e-50", "--out", runs / "top_p")
    assert status == 0, lines
    greedy, nucleus = (json.loads((runs / name / "metrics.json").read_text()) for name in ("greedy", "top_p"))
    assert nucleus["n_scored"] == 2 and nucleus["parse_failures"] == 0
    assert nucleus["metrics"]["model"] == greedy["metrics"]["model"]  # top-p below every share: the top token


def test_a_forecast_with_nothing_scored_is_an_error_and_writes_no_metrics(tmp_path, small_h5, capsys, monkeypatch):
    import forecasting.forecast

    real = forecasting.forecast.to_forecast

    def unparseable(example, texts, decimals):  # what the underflow did: every sample garbage
        return real(example, ["x" for _ in texts], decimals)
    monkeypatch.setattr(forecasting.forecast, "to_forecast", unparseable)
    out = tmp_path / "runs" / "fc"
    status, lines = forecast_main(capsys, "--model", "tiny", "--data", small_h5, "--runs-dir", tmp_path / "runs",
                                  "--limit", "2", "--out", out, "--baselines", "persistence", *QUICK)
    assert status == EXIT_FAILED and len(notes_and_errors(lines)) == 1, lines
    assert "no trajectory could be scored" in lines[-1] and "2 of 2" in lines[-1], lines
    assert not (out / "metrics.json").exists()
    assert json.loads((out / RECORD_NAME).read_text())["by_kind"]["forecast"] > 0  # the FLOPs spent stay booked


# ---- 11, 12: memory, positions, absurd values -----------------------------------------------------------------------

def refuse_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(qwen_mini, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr("forecasting.source.load_model_and_tokenizer", refuse)


@pytest.mark.parametrize("flags, words", [
    (["--decimals", "1000", "--memory-budget", "4"], ["--decimals", "at most 15", "1000"]),
    # within the limits but not within the budget: refused on lower bounds, before the model or the data is read
    # (at least one variable: 30 steps x "d." + 15 decimals + a separator = 30 * 18 = 540 tokens)
    (["--context", "30", "--decimals", "15", "--memory-budget", "0.001"],
     ["--memory-budget 0.001", "GiB", "one prompt of at least 540 tokens"]),
    (["--seed", str(2 ** 76)], ["--seed", str(2 ** 76)]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--memory-budget", "1e300"], ["--memory-budget", "1e+300"]),
    (["--num-samples", "1000000000", "--temperature", "1"], ["num_samples", "1000000000"]),
    (["--decimals", "100"], ["decimals", "100"]),
    (["--sample", "3", "--split", "val"], ["--sample", "--split"]),
])
def test_absurd_settings_are_one_line_exit_2_before_loading_or_reserving(tmp_path, small_h5, capsys, monkeypatch,
                                                                         flags, words):
    refuse_loading(monkeypatch)
    runs = tmp_path / "runs"
    status, lines = forecast_main(capsys, "--model", "tiny", "--data", small_h5, "--runs-dir", runs, *flags)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines
    assert not runs.exists()  # no reservation, no record


def test_a_prompt_longer_than_the_models_positions_is_refused(tmp_path, capsys):
    runs, long_h5 = tmp_path / "runs", tmp_path / "lv_long.h5"
    save(long_h5, simulate(n=12, steps=200, seed=4))
    # 150 steps x 2 numbers of at least "d." + 15 decimals + a separator: >= 150 * 2 * 18 = 5400 tokens > 4096
    status, lines = forecast_main(capsys, "--model", "tiny", "--data", long_h5, "--runs-dir", runs, "--context", "150",
                                  "--horizon", "2", "--decimals", "15", "--limit", "1", "--quiet")
    assert status == EXIT_USAGE and len(notes_and_errors(lines)) == 1, lines
    assert "4,096" in lines[-1] and "max_position_embeddings" in lines[-1], lines
    assert not (runs / "forecasts").exists()


def test_a_plan_asking_a_billion_samples_is_refused_at_once_not_counted(tmp_path, small_h5, capsys):
    import accounting.cli

    plan = tmp_path / "absurd.toml"
    plan.write_text(f'[study]\nname = "absurd"\n\n[train]\nmodel = "tiny"\ndata = "{small_h5}"\n\n[forecast]\n'
                    'num_samples = 1000000000\ntemperature = 1.0\n\n[[stage]]\nname = "zero_shot"\nforecast = "base"\n')
    status = accounting.cli.main(["--plan", str(plan), "--runs", str(tmp_path / "runs")])
    lines = lines_of(capsys.readouterr().err)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert "[forecast]" in lines[0] and "num_samples must be at most 10000, got 1000000000" in lines[0], lines


def test_forecast_config_limits_keep_a_plan_count_finite():
    for key, value in (("num_samples", 10 ** 9), ("decimals", 10 ** 3), ("int_digits", 10 ** 3), ("seed", 2 ** 76),
                       ("seed", -1), ("memory_gb", 1e300)):
        with pytest.raises(ForecastConfigError) as error:
            ForecastConfig(**{key: value})
        assert error.value.key == key and repr(value) in str(error.value)
    ForecastConfig(num_samples=10_000, decimals=15, int_digits=15, seed=2 ** 63 - 1, memory_gb=2.0 ** 20)  # the limits


# ---- 14: --sample with --split; data below the scaler's zero level --------------------------------------------------

def test_data_below_the_scalers_zero_level_is_noted(tmp_path, small_h5, capsys):
    data = load(small_h5)
    tiny_values = tmp_path / "tiny_values.h5"
    save(tiny_values, LVData(data.trajectories * 1e-14, data.time))
    runs = tmp_path / "runs"
    status, lines = forecast_main(capsys, "--model", "tiny", "--data", tiny_values, "--runs-dir", runs, "--limit", "2",
                                  "--no-baselines", "--out", runs / "fc", *QUICK)
    assert status == 0, lines
    notes = json.loads((runs / "fc" / "metrics.json").read_text())["notes"]
    tiny_notes = [n for n in notes if "1e-12" in n]
    assert len(tiny_notes) == 1 and "2 of 2 trajectories" in tiny_notes[0] and "zeros" in tiny_notes[0], notes


# ---- issue 34 item 7: progress inside a generate call ---------------------------------------------------------------

def test_progress_inside_one_generate_call_counts_decode_steps_with_rate_and_eta(monkeypatch):
    from data.dataset import make_eval_example
    from forecasting.forecast import forecast_examples

    model, tokenizer = qwen_mini.load_model_and_tokenizer("tiny", seed=0)
    data = simulate(n=2, steps=60, seed=5)
    examples = [make_eval_example(data.trajectories[i], i, 20, 30) for i in range(2)]
    quiet = forecast_examples(model, tokenizer, examples, progress=False)
    log = io.StringIO()  # not a terminal: lines
    monkeypatch.setattr("sys.stderr", log)
    shown = forecast_examples(model, tokenizer, examples, progress=True, label="model")
    assert [f.texts for f in shown] == [f.texts for f in quiet]  # progress changes no token
    lines = log.getvalue().splitlines()
    # one call (both trajectories fit in one), about one line per tenth of its decode steps
    assert 8 <= len(lines) <= 12, lines
    assert all(re.match(r"^model: \d+/30 steps \(\d+ %\), \d+ s, [\d.e+-]+ steps/s, ETA \d+ s", line)
               for line in lines), lines
    assert lines[-1].startswith("model: ") and "(100 %)" in lines[-1]
