"""Issue 34 and issue 35 (items 7, 8, the report parts of 12 and 14): the report's uncertainty, noise, number
formats and hostile inputs, on runs directories written by hand (config.json, metrics.jsonl, a forecast's
metrics.json and per_trajectory.csv, a ledger record) so every number is known in advance; plus real plain-model
forecasts for the results the report used to leave out."""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

import pytest
from conftest import LV_H5, tiny_plan

import forecast
import report as report_cli
import train
from ledger.records import new_record

TABLE_ROW = re.compile(r"^\|.*\|$")


# ---- writing runs and forecasts by hand ----------------------------------------------------------------------------

def write_run(directory: Path, *, seed=0, lr=1e-3, ctx=32, steps=4, vals=((0, 3.0), (4, 2.9)), last=None) -> Path:
    """A finished run as train.py leaves it, as far as the report reads it: config.json and metrics.jsonl (`last`:
    {step: {N: loss}} of the same-position losses)."""
    directory.mkdir(parents=True)
    config = {"model": "tiny", "data": None, "full": False, "rank": 2, "alpha": 2.0, "targets": ["q_proj", "v_proj"],
              "lora_dropout": 0.0, "lr": lr, "batch": 2, "ctx": ctx, "stride": ctx // 2, "decimals": 2, "seed": seed,
              "split_mode": "ordered", "split_seed": 0, "warmup": 0, "schedule": "constant", "grad_clip": 1.0,
              "weight_decay": 0.0, "dtype": "auto", "steps": steps, "val_batches": 1}
    (directory / "config.json").write_text(json.dumps(config))
    lines = [{"step": s, "train_loss": None, "val_loss": v, **({"val_loss_last": last[s]} if last else {})}
             for s, v in vals]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return directory


def write_forecast(out: Path, errors: dict[str, dict[str, list[float]]], split: str = "test", first: int = 850):
    """A forecast's metrics.json and per_trajectory.csv from per-trajectory MSE / MAE per method and species
    ({"model": {"prey_mse": [...], "prey_mae": [...], ...}}): the pooled scores as forecast.py pools them (the mean
    of the trajectories' MSE, their median as medMSE)."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(next(iter(errors.values())).values())))
    metrics = {method: {"n_trajectories": n, **{species: {
        "mse": statistics.fmean(e[f"{species}_mse"]), "mae": statistics.fmean(e[f"{species}_mae"]),
        "median_trajectory_mse": statistics.median(e[f"{species}_mse"]), "mae_by_step": [1.0, 2.0]}
        for species in ("prey", "predator")}} for method, e in errors.items()}
    summary = {"metrics": metrics, "trajectories": list(range(first, first + n)), "n_trajectories": n,
               "n_scored": n, "selection": f"first {n} of {split} split", "protocol": "by hand"}
    (out / "metrics.json").write_text(json.dumps(summary))
    columns = [(method, column) for method, e in errors.items() for column in e]
    with open(out / "per_trajectory.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "split", "scored", *(f"{m}_{c}" for m, c in columns)])
        for row in range(n):
            writer.writerow([first + row, split, True, *(errors[m][c][row] for m, c in columns)])
    return out


def book(runs: Path, run: Path, outs: list[Path]) -> None:
    """The run's ledger record: its training, then the forecasts made with it."""
    record = new_record(run, run.name, "real", runs)
    record.add("train", 4000, steps=4, step=4, per_step_flops=1000)
    for out in outs:
        record.add("forecast", 1000, entry=out.name, label="model", out=str(out.resolve()), source=str(run))
    record.write()


def errors_of(prey_mse, predator_mse=None) -> dict[str, list[float]]:
    predator_mse = predator_mse or prey_mse
    return {"prey_mse": prey_mse, "prey_mae": [math.sqrt(v) for v in prey_mse],
            "predator_mse": predator_mse, "predator_mae": [math.sqrt(v) for v in predator_mse]}


def report_of(runs: Path, capsys=None) -> str:
    assert report_cli.main([str(runs)]) == 0
    return (runs / "report.md").read_text()


def section(text: str, name: str) -> str:
    return text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]


# ---- the bootstrap -------------------------------------------------------------------------------------------------

def test_the_paired_bootstrap_interval_is_the_hand_example():
    from reporting import format as fmt
    from reporting.uncertainty import paired_bootstrap

    # Two trajectories: fine-tuned MSE 1 and 3, reference 4 and 4. A resample takes (1, 1), (3, 3) or one of each:
    # the ratio of the means is 1/4, 3/4 or 2/4 with probabilities 1/4, 1/4, 1/2, so the 2.5th and 97.5th
    # percentiles of 2000 resamples are 0.25 and 0.75: -75 % and -25 %, an interval that excludes 0 %.
    low, high = paired_bootstrap([1.0, 3.0], [4.0, 4.0])
    assert (low, high) == (0.25, 0.75)
    assert (fmt.factor_text(low), fmt.factor_text(high)) == ("-75.0 %", "-25.0 %")
    # Against 2 and 2 the ratios are 1/2, 1 and 3/2: the interval holds 1 (no change): not distinguishable.
    assert paired_bootstrap([1.0, 3.0], [2.0, 2.0]) == (0.5, 1.5)
    # Paired: the same draws for both. Unpaired resampling of (1, 3) against (4, 4 + 1e-9 * k) would not give the
    # exact quartile ratios above; medians of 3 values of a constant reference: the new values themselves.
    assert paired_bootstrap([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], "median") == (0.5, 1.5)
    assert paired_bootstrap([5.0, 1.0, 2.0, 8.0], [1.0] * 4, seed=3) == paired_bootstrap([5.0, 1.0, 2.0, 8.0],
                                                                                         [1.0] * 4, seed=3)


def test_changes_read_as_factors_past_100_percent_and_equal_values_as_equal():
    from reporting import format as fmt

    assert fmt.relative(88.737, 1.0) == "x88.7" and fmt.relative(1530.5, 1.0) == "x1530"
    assert fmt.relative(0.51, 1.0) == "-49.0 %" and fmt.relative(1.632, 1.0) == "+63.2 %"
    assert fmt.relative(0.0002492, 0.0002492) == "0 %"  # issue 35 item 14: never "+0.0 %"
    assert fmt.relative(0.0002492 * (1 + 1e-6), 0.0002492) == "+0.0001 %"  # unequal never reads as equal
    assert fmt.relative(8.4e-6, 1.0) == "x8.4e-06" and fmt.relative(1.0, 0.0) == "-"
    assert fmt.loss(-1e308) == "-1e+308" and fmt.loss(0.31449) == "0.3145"


# ---- the noise (issue 35 item 7) -----------------------------------------------------------------------------------

def test_only_runs_that_differ_in_the_seed_alone_are_seed_replicates(tmp_path):
    runs = tmp_path / "runs"
    # Two demo runs: identical settings and the same seed. They repeat one measurement: no noise is measured.
    write_run(runs / "demo", vals=((0, 3.0), (4, 2.9)))
    write_run(runs / "demo-2", vals=((0, 3.0), (4, 2.9)))
    write_run(runs / "other_lr", lr=3e-3, vals=((0, 3.0), (4, 2.8999)))
    text = report_of(runs)
    findings = section(text, "Findings")
    assert "unmeasured" in findings and "beyond the noise" not in findings and "Noise threshold" not in text
    assert "No seed replicates" in text
    # A run that differs from them in the seed alone: now the noise is their spread, 2.9 - 2.87 = 0.03.
    write_run(runs / "seed1", seed=1, vals=((0, 3.0), (4, 2.87)))
    text = report_of(runs)
    assert "Noise of the whole-window validation loss: 0.03, the spread of the best score between seeds 0, 1" in text
    assert "| `runs/demo`, `runs/seed1` | 0, 1 | whole-window validation loss | 2.9000, 2.8700 | 0.03 |" in text


def test_the_noise_of_a_context_stage_is_measured_on_its_last_n_loss(tmp_path):
    """Issue 34 item 2: a stage compared on the last N targets holds its margin against the spread of that loss."""
    runs = tmp_path / "runs"
    last = {0: {"8": 3.5}, 4: {"8": 3.30}}
    write_run(runs / "a", ctx=32, vals=((0, 3.0), (4, 2.90)), last=last)
    write_run(runs / "b", ctx=32, seed=1, vals=((0, 3.0), (4, 2.95)), last={0: {"8": 3.5}, 4: {"8": 3.31}})
    text = report_of(runs)
    assert "Noise of the whole-window validation loss: 0.05" in text  # 2.95 - 2.90
    runs2 = tmp_path / "runs2"
    for name, ctx, seed, best, best_last in (("s0", 32, 0, 2.90, 3.30), ("s1", 32, 1, 2.95, 3.31),
                                             ("long", 64, 0, 2.80, 3.25)):
        write_run(runs2 / "ctx" / name, ctx=ctx, seed=seed, vals=((0, 3.0), (4, best)),
                  last={0: {"8": 3.5}, 4: {"8": best_last}})
    text = report_of(runs2)
    # The ctx group compares on the last 8 targets: its noise is 3.31 - 3.30 = 0.01, not the whole-window 0.05.
    assert "Noise of the validation loss over the last 8 targets: 0.01" in text
    assert "scored +0.05 above it: beyond the noise (0.01)" in text  # 3.30 - 3.25


# ---- the context stage's margin, split (issue 34 item 1) -----------------------------------------------------------

def test_a_context_margin_is_split_into_step_0_and_training(tmp_path):
    # The untouched model: 3.64 at ctx 32, 3.29 at ctx 64 over the last 8 targets (a longer context helps before any
    # training). Training: -0.13 at ctx 32 (to 3.51), -0.149 at ctx 64 (to 3.141). Margin 0.369 = 0.35 + 0.019.
    runs = tmp_path / "runs"
    write_run(runs / "context" / "short", ctx=32, vals=((0, 3.0), (4, 2.9)), last={0: {"8": 3.64}, 4: {"8": 3.51}})
    write_run(runs / "context" / "long", ctx=64, vals=((0, 2.7), (4, 2.6)), last={0: {"8": 3.29}, 4: {"8": 3.141}})
    text = report_of(runs)
    assert "| `long` | 3.2900 | 3.1410 | -0.149 | +0 | +0 | +0 |" in text
    assert "| `short` | 3.6400 | 3.5100 | -0.13 | +0.35 | +0.019 | +0.369 |" in text
    assert "Of that +0.369, +0.35 was there at step 0, before any training" in text
    assert "+0.019 came from training" in text


# ---- results the report used to leave out (issue 35 item 8) and hostile forecasts (items 12, 14) -------------------

@pytest.fixture(scope="module")
def plain_forecast(tmp_path_factory):
    """A plain `forecast.py --model tiny` forecast in a runs directory of its own (the demo's zero-shot-wins test)."""
    if not LV_H5.is_file():
        pytest.skip("../shared/fixtures/lotka_volterra_data.h5 not present")
    runs = tmp_path_factory.mktemp("plain") / "runs"
    assert forecast.main(["--model", "tiny", "--data", str(LV_H5), "--limit", "5", "--horizon", "3", "--batch", "5",
                          "--baselines", "persistence,seasonal_naive", "--runs-dir", str(runs),
                          "--out", str(runs / "base"), "--quiet"]) == 0
    return runs


def test_a_plain_model_forecast_is_in_the_report(plain_forecast, tmp_path):
    text = report_of(plain_forecast)
    metrics = json.loads((plain_forecast / "base" / "metrics.json").read_text())["metrics"]
    assert "1 forecast (0 of trained runs, 1 of base models)" in text and "0 forecast result(s)" not in text
    assert f"| zero-shot | {metrics['model']['prey']['mse']:.4g} |" in text
    assert f"| persistence | {metrics['persistence']['prey']['mse']:.4g} |" in text
    assert "- **base**, prey: zero-shot MSE" in text  # its Findings
    assert text.splitlines()[0] == "# Report: the random tiny preset (tests only) forecasting zero-shot on " \
                                   "lotka_volterra_data.h5"


def test_a_plan_whose_only_stage_forecasts_the_base_is_in_the_report(tmp_path):
    if not LV_H5.is_file():
        pytest.skip("../shared/fixtures/lotka_volterra_data.h5 not present")
    (tmp_path / "p.toml").write_text(tiny_plan("only", None, """
[forecast]
limit = 5
horizon = 3
batch = 5
baselines = ["persistence"]

[[stage]]
name = "zero_shot"
forecast = "base"
"""))
    runs = tmp_path / "runs"
    assert train.main(["--plan", str(tmp_path / "p.toml"), "--data", str(LV_H5), "--runs-dir", str(runs)]) == 0
    text = report_of(runs)
    metrics = json.loads((runs / "only" / "zero_shot" / "metrics.json").read_text())["metrics"]
    assert "### zero_shot: `zero_shot` (tiny, zero-shot)" in text
    assert f"| zero-shot | {metrics['model']['predator']['mse']:.4g} |" in text


def test_a_forecast_csv_that_is_not_utf8_is_named_and_the_rest_reported(tmp_path, capsys):
    runs = tmp_path / "runs"
    run = write_run(runs / "demo")
    out = write_forecast(run / "forecast", {"model": errors_of([0.1, 0.2]), "untrained": errors_of([0.3, 0.4])})
    book(runs, run, [out])
    (out / "per_trajectory.csv").write_bytes(b"index,split\n\xff\xfe850,test\n")
    assert report_cli.main([str(runs)]) == 0
    err = capsys.readouterr().err
    text = (runs / "report.md").read_text()
    assert f"{out / 'per_trajectory.csv'}: not UTF-8 text" in err and "## Unreadable" in text
    assert "| fine-tuned | 0.15 |" in text  # the scores from metrics.json are still there, without intervals


def test_a_loss_of_minus_1e308_is_reported_not_a_traceback(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "grid" / "a", vals=((0, 3.0), (4, -1e308)))
    write_run(runs / "grid" / "b", lr=3e-3, vals=((0, 3.0), (4, 2.9)))
    text = report_of(runs)
    assert "| `a` | 4/4 | 3.0000 | -1e+308 |" in text


def test_equal_scores_are_equal_not_worse(tmp_path):
    """Issue 35 item 14: "worse than zero-shot (0.0002492, +0.0 %)" when the two are the same."""
    runs = tmp_path / "runs"
    run = write_run(runs / "demo")
    same = errors_of([0.0002492, 0.0002492, 0.0002492, 0.0002492, 0.0002492])
    write_forecast(run / "forecast", {"model": same, "untrained": same, "persistence": errors_of([1.0] * 5)})
    book(runs, run, [run / "forecast"])
    findings = section(report_of(runs), "Findings")
    assert "fine-tuned MSE 0.0002492 against zero-shot 0.0002492: 0 %" in findings
    assert "worse than zero-shot" not in findings and "+0.0 %" not in findings


# ---- the demo's report (issue 34 item 6) ---------------------------------------------------------------------------

def test_the_demos_report_keeps_each_forecasts_figures_and_names_what_chose(tmp_path):
    runs = tmp_path / "runs"
    run = write_run(runs / "demo")  # one run at the top level, as demo.py leaves it
    write_forecast(run / "forecast_val", {"model": errors_of([0.04, 0.02, 0.03], [0.01] * 3),
                                          "untrained": errors_of([0.09, 0.08, 0.10], [0.001] * 3)},
                   split="val", first=700)
    write_forecast(run / "forecast", {"model": errors_of([0.1, 0.3, 0.2, 0.4, 0.5]),
                                      "untrained": errors_of([0.2, 0.5, 0.3, 0.9, 0.6]),
                                      "lv_fit": errors_of([0.05, 0.1, 0.1, 0.2, 0.2])})
    book(runs, run, [run / "forecast_val", run / "forecast"])
    text = report_of(runs)
    assert "(top level)" not in text and "2 forecasts (2 of trained runs, 0 of base models)" in text
    assert "\nWinner:" not in text  # one run wins nothing
    validation = text.split("### demo: `forecast_val`", 1)[1].split("\n### ", 1)[0]
    assert "horizon_demo_forecast_val.png" in validation and "horizon_demo.png" not in validation
    assert "lv_fit" not in validation  # its baselines were never run on validation
    # The validation forecast's choice by the geometric mean of the species' MSE, by hand: fine-tuned
    # sqrt(0.03 * 0.01) = 0.01732, zero-shot sqrt(0.09 * 0.001) = 0.009487: zero-shot is chosen.
    assert "| zero-shot | 0.009487 | yes |" in validation and "| fine-tuned | 0.01732 |  |" in validation
    assert "chooses the zero-shot model by the geometric mean over the species of the MSE (0.01732 fine-tuned, " \
           "0.009487 zero-shot)" in text
    # The test forecast: fine-tuned MSE 0.3 vs zero-shot 0.5 (-40.0 %), and against the LV fit (0.13, x2.31) it
    # loses; every table at most 10 columns.
    assert "fine-tuned MSE 0.3 against zero-shot 0.5: -40.0 % [" in text
    assert "worse than lv_fit on MSE x2.31 [" in text
    assert all(line.count("|") - 1 <= 10 for line in text.splitlines() if TABLE_ROW.match(line))


def test_a_hand_edited_study_record_is_reported_not_a_traceback(tmp_path):
    """study.json's newer fields as a hand edit leaves them: "data" not a list, a search record without its rungs,
    a run's split not lists; the stage's runs are still reported and the search is said to have no rung yet."""
    runs = tmp_path / "runs"
    first = write_run(runs / "s" / "grid" / "a", vals=((0, 3.0), (4, 2.9)))
    second = write_run(runs / "s" / "grid" / "b", lr=3e-3, vals=((0, 3.0), (4, 2.8)))
    config = json.loads((first / "config.json").read_text())
    (first / "config.json").write_text(json.dumps({**config, "split": {"train": 5, "val": [], "test": ["x"]}}))
    (runs / "s" / "study.json").write_text(json.dumps({
        "name": "s", "data": 5, "stages": [{"name": "grid", "kind": "train", "varied": ["lr"], "search": "halving",
                                             "runs": [str(first), str(second)], "best": str(second)}]}))
    text = report_of(runs)
    assert "| `b` | 4/4 | 3.0000 | 2.8000 |" in text
    assert "Successive halving: no rung recorded yet (2 configurations)." in text
