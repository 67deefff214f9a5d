"""train.py's command line, run in-process: grids, the FLOP budget refusal, help."""
from __future__ import annotations

import json

import pytest
from test_train import write_small_data

from common.exit_codes import EXIT_OVER_BUDGET
from ledger import Ledger, read_records
from qwen_mini.flop_report import format_flops
from training import TrainConfig, read_metrics, read_run_config
from training.budget import per_step_flops, plan_run_flops
from training.cli import main

TINY = ["--model", "tiny", "--ctx", "64", "--batch", "2", "--val-batches", "1"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5")


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path, monkeypatch):
    """The default data set would be simulated into this directory, not the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QWEN_MINI_CACHE", str(cache))
    return cache


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_grid_makes_one_run_per_combination_and_a_summary(capsys, tmp_path, small_data):
    runs = tmp_path / "runs"
    status, out, err = run(capsys, *TINY, "--data", small_data, "--lr", "1e-3", "2e-3", "--rank", "2", "4",
                           "--steps", "2", "--runs-dir", runs)
    assert status == 0, err
    grid = runs / "grid_tiny_r2-4_lr0.001-0.002_ctx64"
    names = sorted(p.name for p in grid.iterdir() if p.is_dir())
    assert names == ["tiny_r2_lr0.001_ctx64", "tiny_r2_lr0.002_ctx64", "tiny_r4_lr0.001_ctx64",
                     "tiny_r4_lr0.002_ctx64"]
    for name in names:
        config = read_run_config(grid / name)
        assert name == f"tiny_r{config['rank']}_lr{config['lr']:g}_ctx64" and config["steps"] == 2
        assert (grid / name / "adapter" / "adapter_model.safetensors").is_file()
        assert (grid / name / "loss_curve.png").is_file()
        metrics = [json.loads(line) for line in (grid / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [0, 1, 2] and metrics[-1]["val_loss"] is not None

    summary = json.loads((grid / "summary.json").read_text())
    assert sorted(row["run"] for row in summary["runs"]) == names
    assert summary["values"] == {"lr": [0.001, 0.002], "rank": [2, 4], "ctx": [64]}
    ledger = {record.run_name: record.flops_used for record in read_records(runs)}
    for row in summary["runs"]:
        config = TrainConfig(model="tiny", ctx=64, batch=2, val_batches=1, steps=2, rank=row["rank"], lr=row["lr"])
        assert row["flops_used"] == ledger[row["run"]] == plan_run_flops(config).total > 2 * row["per_step_flops"] > 0
        assert row["final_val_loss"] is not None and row["initial_val_loss"] is not None
        assert row["run"] in out  # the printed table
    assert summary["flops_used"] == sum(ledger.values())
    assert str(grid / "summary.json") in out


def test_over_budget_run_is_refused_before_data_or_weights_are_loaded(capsys, tmp_path, private_data_cache):
    runs = tmp_path / "runs"
    status, out, err = run(capsys, *TINY, "--full", "--steps", "10", "--runs-dir", runs, "--max-flops", "1e9")
    plan = plan_run_flops(TrainConfig(model="tiny", full=True, ctx=64, batch=2, val_batches=1, steps=10))
    per_step = plan.per_step
    assert plan.total == 10 * per_step + 11 * plan.eval_pass  # validation at step 0 and after every step
    assert status == EXIT_OVER_BUDGET and out == ""
    assert "refused by the FLOP budget" in err
    assert f"planned {format_flops(plan.total)} FLOPs + 0 already spent or reserved in {runs} = " in err
    assert "> budget 1.0e9" in err and f"enough for {10**9 // per_step:,} steps" in err
    # Nothing but lock files written, no data simulated, no record in the ledger.
    assert all(p.name.endswith(".lock") for p in runs.rglob("*") if p.is_file())
    assert not private_data_cache.exists()


def test_spending_in_the_runs_directory_counts_against_the_budget(capsys, tmp_path, small_data):
    runs = tmp_path / "runs"
    per_step = per_step_flops(TrainConfig(model="tiny", rank=4, ctx=64, batch=2))
    two_steps = plan_run_flops(TrainConfig(model="tiny", rank=4, ctx=64, batch=2, val_batches=1, steps=2)).total
    budget = 8 * per_step + two_steps
    Ledger(runs).recorder(runs / "earlier", run_name="earlier").add("train", 8 * per_step, steps=8, step=8)
    status, _, err = run(capsys, *TINY, "--data", small_data, "--steps", "3", "--runs-dir", runs,
                         "--max-flops", budget)
    assert status == EXIT_OVER_BUDGET and "already spent" in err and "FLOPs left, enough for" in err
    status, _, err = run(capsys, *TINY, "--data", small_data, "--steps", "2", "--runs-dir", runs,
                         "--max-flops", budget)
    assert status == 0, err
    assert sum(record.flops_used for record in read_records(runs)) == budget  # exactly used up
    assert not any(record.reservations for record in read_records(runs))  # settled


def test_a_grid_is_checked_as_a_whole(capsys, tmp_path, small_data):
    runs = tmp_path / "runs"
    per_step = per_step_flops(TrainConfig(model="tiny", rank=4, ctx=64, batch=2))
    # Each of the two runs fits on its own; together they do not.
    status, _, err = run(capsys, *TINY, "--data", small_data, "--steps", "3", "--lr", "1e-3", "2e-3",
                         "--runs-dir", runs, "--max-flops", 5 * per_step)
    assert status == EXIT_OVER_BUDGET and "grid of 2 runs does not fit" in err
    assert all(p.name.endswith(".lock") for p in runs.rglob("*") if p.is_file())


def test_help_lists_the_flags_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("--model", "Qwen/Qwen2.5-0.5B-Instruct", "--rank R [R ...]", "(default: [4])", "--lr LR [LR ...]",
                     "(default: [1e-05])", "--ctx TOKENS", "(default: [512])", "--max-flops", "1e17", "--full",
                     "--resume", "--runs-dir", "--checkpoint-every", "--warmup", "--schedule", "--grad-clip",
                     "--activation-checkpointing", "--device", "--val-batches", "--dtype", "Exit status"):
        assert expected in text, expected


def test_bad_settings_are_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--stride", "100", "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "stride 100 > ctx 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*TINY, "--full", "--rank", "2", "4"])
    assert "--full trains every weight" in capsys.readouterr().err


def test_extending_a_finished_run_with_resume_equals_running_it_whole(capsys, tmp_path, small_data):
    flags = [*TINY, "--data", small_data, "--rank", "2", "--lr", "5e-3", "--eval-every", "3", "--checkpoint-every",
             "3", "--runs-dir", tmp_path]
    assert run(capsys, *flags, "--steps", "6", "--out", tmp_path / "whole")[0] == 0
    assert run(capsys, *flags, "--steps", "3", "--out", tmp_path / "extended")[0] == 0
    status, _, err = run(capsys, *flags, "--steps", "6", "--out", tmp_path / "extended")
    assert status == 1 and "already holds a run" in err and "--resume" in err
    assert run(capsys, *flags, "--steps", "6", "--out", tmp_path / "extended", "--resume")[0] == 0

    def losses(name):
        return [(m["step"], m["train_loss"], m["val_loss"]) for m in read_metrics(tmp_path / name)]
    assert losses("extended") == losses("whole") and len(losses("whole")) == 7
