"""demo.py end to end on a small file: LoRA on the shipped series-tiny, the validation forecast choosing the
fine-tuned or the zero-shot model, the test split forecast against every baseline, the report; everything under
--runs-dir, and the same numbers again with the same --seed."""
import json
import math

import pytest

import demo
from data.lotka_volterra import save, simulate
from study.selection import Choice


def test_demo_on_a_users_file_is_complete_and_deterministic(tmp_path, capsys):
    data = tmp_path / "mine.h5"
    save(data, simulate(n=20, steps=100, seed=3))  # ordered split: 14 train, 3 val, trajectories 17-19 test
    runs = tmp_path / "runs"
    for _ in range(2):
        assert demo.main(["--data", str(data), "--runs-dir", str(runs), "--steps", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    first, second = (json.loads((runs / name / "forecast" / "metrics.json").read_text()) for name in ("demo", "demo-2"))
    validation = json.loads((runs / "demo" / "forecast_val" / "metrics.json").read_text())
    assert "val split" in validation["selection"] and validation["trajectories"] == [14, 15, 16]
    # The choice is the lower geometric mean of the two species' validation MSE, by hand:
    gmean = {m: math.sqrt(validation["metrics"][m]["prey"]["mse"] * validation["metrics"][m]["predator"]["mse"])
             for m in ("model", "untrained")}
    fine_tuned_wins = gmean["model"] <= gmean["untrained"]
    assert f"[demo] chosen: {'the fine-tuned model' if fine_tuned_wins else 'the zero-shot base'}" in out
    assert first["trajectories"] == [17, 18, 19] and first["data"] == str(data)
    assert set(first["metrics"]) == {"model", "persistence", "seasonal_naive", "lv_fit"} | (
        {"untrained"} if fine_tuned_wins else set())
    assert first["protocol_settings"]["num_samples"] == 10  # the median of 10 samples is the point forecast
    assert first["metrics"] == second["metrics"]  # deterministic with --seed
    config = json.loads((runs / "demo" / "config.json").read_text())
    assert (config["rank"], config["ctx"], config["full"]) == (8, 768, False)
    assert config["model_dir"] == str(demo.BASE)
    assert (runs / "report.md").is_file() and (runs / "demo" / "adapter").is_dir()
    assert "zero-shot base" in out and "seasonal naive" in out  # the demo's closing table
    report = (runs / "report.md").read_text()
    assert "- **demo** (`forecast_val`), prey:" in report  # the validation forecast's findings say they are its
    if fine_tuned_wins:  # the report's zero-shot row next to the fine-tuned one
        assert "| zero-shot |" in report and "- **demo**, prey:" in report
    assert not list(tmp_path.glob("*.json"))  # nothing written outside --runs-dir


@pytest.mark.parametrize("winner", [0, 1])
def test_demo_forecasts_the_test_split_with_the_model_the_validation_chose(tmp_path, capsys, monkeypatch, winner):
    data = tmp_path / "mine.h5"
    save(data, simulate(n=20, steps=100, seed=3))
    monkeypatch.setattr(demo, "choose", lambda validation: Choice(winner, "by hand", [1.0, 1.0]))
    runs = tmp_path / "runs"
    assert demo.main(["--data", str(data), "--runs-dir", str(runs), "--steps", "1"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    test = json.loads((runs / "demo" / "forecast" / "metrics.json").read_text())
    record = json.loads((runs / "demo" / "forecast" / "flops.json").read_text()) if winner else None
    if winner == 0:  # the fine-tuned run, with the zero-shot base as its "untrained" baseline
        assert "untrained" in test["metrics"] and "the fine-tuned model chosen" in out
    else:  # the base as it is: no adapter, no "untrained" row (the model row is the zero-shot one), booked apart
        assert "untrained" not in test["metrics"] and "the zero-shot base chosen" in out
        assert str(demo.BASE) in json.dumps(record)
    assert test["trajectories"] == [17, 18, 19]


def test_demo_refuses_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--data", str(tmp_path / "nope.h5"), "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "nope.h5: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--data", str(tmp_path), "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and f"--data {tmp_path}: a directory, not an h5 file" in capsys.readouterr().err


def test_demo_stops_with_one_line_when_neither_model_scores(tmp_path, capsys, monkeypatch):
    # Both validation forecasts NaN (or nothing scored): the demo forecasts nothing more and says why.
    data = tmp_path / "mine.h5"
    save(data, simulate(n=20, steps=100, seed=3))
    monkeypatch.setattr(demo, "choose_by_forecast", lambda metrics, methods, what: None)
    runs = tmp_path / "runs"
    assert demo.main(["--data", str(data), "--runs-dir", str(runs), "--steps", "1"]) == 1
    assert "neither model has a finite validation forecast score" in capsys.readouterr().err
    assert not (runs / "demo" / "forecast").exists() and (runs / "demo" / "forecast_val" / "metrics.json").is_file()
