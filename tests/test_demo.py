"""demo.py end to end on a small file: LoRA on the shipped series-tiny, the validation forecast choosing the
fine-tuned or the zero-shot model, the test split forecast against every baseline, the report; everything under
--runs-dir, and the same numbers again with the same --seed."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import demo
from data.lotka_volterra import save, simulate
from study.selection import Choice

ROOT = Path(__file__).resolve().parents[1]


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


def test_demo_refuses_data_too_short_for_its_forecasts_before_training(tmp_path, capsys):
    """60 steps cannot hold the forecasts' context of 50 and horizon of 50: refused at once, not after training."""
    data = tmp_path / "short.h5"
    save(data, simulate(n=20, steps=60, seed=3))
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--data", str(data), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--data {data} has 60 steps" in err and "horizon of 50" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("seed", ["-1", str(2 ** 76)])
def test_demo_refuses_a_seed_no_generator_takes(tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--seed", seed, "--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2 and "--seed: expected an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_demo_stopped_by_ctrl_c_exits_130_and_the_same_command_continues_it(tmp_path, capsys, monkeypatch):
    """Ctrl-C during training: exit 130 (not 1); the same command again resumes that run in its directory (not a
    fresh demo-2 from scratch), and a Ctrl-C between the demo's commands is 130 too."""
    data = tmp_path / "mine.h5"
    save(data, simulate(n=20, steps=100, seed=3))
    runs = tmp_path / "runs"
    argv = ["--data", str(data), "--runs-dir", str(runs), "--steps", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWEN_MINI_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), *argv], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = runs / "demo" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # step 0's validation and step 1
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    # demo.py has no --resume: the line says how the demo continues (issue 42, item 10)
    assert "to continue, run the same demo.py command" in err and "--resume" not in err, err
    stopped_at = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]

    def ctrl_c(argv):  # the validation forecast is where this rerun is stopped
        raise KeyboardInterrupt
    monkeypatch.setattr(demo.forecast, "main", ctrl_c)
    assert demo.main(argv) == 130
    out, err = capsys.readouterr()
    assert f"continuing the stopped demo in {runs / 'demo'}/" in out and "--resume" in out
    assert "stopped by Ctrl-C; run the same command again to continue" in err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[:len(stopped_at)] == stopped_at and steps == list(range(4))  # resumed, each step once
    assert (runs / "demo" / "adapter").is_dir() and not (runs / "demo-2").exists()
