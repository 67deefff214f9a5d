"""The main job end to end, offline: LoRA-fine-tune the shipped pretrained base model (models/series-tiny, a small
Qwen2-architecture model pretrained on broad synthetic series) with the real command's flags, choose the fine-tuned
or the zero-shot model by a validation-split forecast, forecast the test split against the baselines and the
zero-shot model, and write the report. A few minutes on 2 CPU cores.

    python demo.py                                  # the built-in simulated data set
    python demo.py --data lotka_volterra_data.h5    # the same demo on your own file
    python demo.py --runs-dir DIR                   # everything under DIR (default: runs)

It is exactly these commands, with a fresh run directory each time (earlier demo runs are kept; a demo stopped before
its test forecast, by Ctrl-C say, is continued by the same command, in its own directory):
    python train.py --model models/series-tiny --rank 8 --ctx 768 {TRAIN} [--data FILE] --out runs/demo
    python forecast.py --run runs/demo {VALIDATION} --out runs/demo/forecast_val
    python forecast.py --run runs/demo {FORECAST}
    python report.py runs
The second command forecasts the validation split with the fine-tuned model and the zero-shot base; the lower
geometric mean of the two species' MSE wins (study.selection.choose_by_forecast). Should the zero-shot base win, the
test forecast is `python forecast.py --model models/series-tiny {FORECAST_BASE} --out runs/demo/forecast` instead,
and the demo says so.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import forecast
import report
import train
from common.args import positive_int, seed_int
from common.exit_codes import EXIT_INTERRUPTED, EXIT_OK
from common.fileio import UnreadableFile, read_json
from data.dataset import TooShort, check_forecast_fits
from data.lotka_volterra import DataError, trajectories_shape
from forecasting.config import ForecastConfig
from forecasting.evaluate import FORECAST_METRICS, band_table, method_rows, validation_lines
from models.recipe import MODEL_DIR
from study.selection import choose_by_forecast
from training.run import CONFIG_NAME, weights_saved
from training.rundir import holds_run, same_setting

BASE = MODEL_DIR  # the shipped pretrained base
# What the small model needs beyond the real command's flags (--rank 8 --ctx 768): adapters on every projection
# (on the users' file, with a candidate base, q/v alone lowered the validation loss 11 % in 150 steps, all seven
# 19 %), a learning rate for its size, and few steps, so the demo stays within minutes on a CPU.
STEPS, WARMUP = 150, 10  # warmup: at most a tenth of --steps
TRAIN = ["--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--lr", "2e-3",
         "--batch", "8", "--schedule", "cosine", "--eval-every", "50", "--val-batches", "2"]
# The point forecast is the median of 10 samples (LLMTIME's): one greedy path puts a sharp peak a few steps off, which
# squared error punishes twice; the median of samples hedges where the timing is uncertain (10, not 20: two models
# forecast 150 trajectories each, and the demo stays within minutes). Rows per generate call come from forecast.py's
# memory budget (all rows in one call here: the samples share their prompt's keys and values); jump-forward, which
# pays at small batches, costs time at this one. The zero-shot model ("untrained": the base before the LoRA)
# forecasts the same trajectories, so the printed table and the report show what the fine-tuning changed.
# The temperature is chosen, not picked by hand (it was 0.5, once, on MSE): --temperature auto forecasts the first
# VALIDATION_TRAJECTORIES of the validation split at 0.3, 0.5, 0.7 and 1.0 and keeps the lowest CRPS, and
# --calibrate widens (or narrows) the bands by split-conformal quantile regression on the same validation
# trajectories (forecasting.calibration). On the users' file it chose 0.7 (validation criterion 0.0979 against
# 0.0985 at 0.5); the test forecast's prey MSE fell from 0.137 to 0.128 (predator 0.0248 to 0.0252), and the
# calibrated 80 % band covers 76 % / 79 % of the values (69-72 % uncalibrated; docs/models.md). It costs the demo
# about two minutes (four validation forecasts of 60 trajectories), booked in the ledger like the test forecast.
VALIDATION_TRAJECTORIES = 60
TEMPERATURE = "0.5"  # the model choice's forecast below: it ranks two models by MSE, the temperature barely matters
SAMPLES = ["--num-samples", "10", "--temperature", "auto", "--calibrate", "--val-limit", str(VALIDATION_TRAJECTORIES)]
FORECAST_BASE = [*SAMPLES, "--baselines", "persistence,seasonal_naive,lv_fit"]
FORECAST = [*SAMPLES, "--baselines", "persistence,seasonal_naive,lv_fit,untrained"]
# The choice between the fine-tuned and the zero-shot model: a forecast of the first validation trajectories (never
# the test split), fewer samples: it only has to rank two models.
VALIDATION = ["--split", "val", "--limit", str(VALIDATION_TRAJECTORIES), "--num-samples", "5",
              "--temperature", TEMPERATURE, "--baselines", "untrained"]
CANDIDATES = {"model": "the fine-tuned model", "untrained": "the zero-shot base"}  # metrics.json keys -> names
BASELINE_ROWS = {"persistence": "persistence", "seasonal_naive": "seasonal naive", "lv_fit": "Lotka-Volterra fit"}
for _key, _flags in (("{TRAIN}", [f"--steps {STEPS} --warmup {WARMUP}", *TRAIN]), ("{VALIDATION}", VALIDATION),
                     ("{FORECAST_BASE}", FORECAST_BASE), ("{FORECAST}", FORECAST)):
    __doc__ = __doc__.replace(_key, " ".join(_flags))


def numbered(base: Path):
    """base, base-2, base-3, ...: one demo directory per demo."""
    yield base
    yield from (base.with_name(f"{base.name}-{n}") for n in itertools.count(2))


def fresh_dir(base: Path) -> Path:
    return next(d for d in numbered(base) if not d.exists())


def unfinished_demo(base: Path, data: str | None, seed: int, steps: int) -> Path | None:
    """The newest demo directory if its demo stopped before its test forecast and trained (or began to train) with
    these settings: the same command continues it there instead of starting again."""
    existing = list(itertools.takewhile(Path.exists, numbered(base)))
    if not existing:
        return None
    newest = existing[-1]
    if (newest / "forecast" / FORECAST_METRICS).is_file():
        return None  # finished: a new demo goes beside it
    if not (newest / CONFIG_NAME).is_file():
        return None if holds_run(newest) else newest  # stopped before training began: nothing of it to differ
    try:
        saved = read_json(newest / CONFIG_NAME)
    except (OSError, UnreadableFile):
        return None
    # --data lv.h5 for the run's /home/me/lv.h5 (or a copy of its bytes) is the same data (training.rundir)
    same = isinstance(saved, dict) and same_setting("data", saved.get("data"), data) \
        and (saved.get("seed"), saved.get("steps")) == (seed, steps)
    return newest if same else None


def read_metrics(forecast_dir: Path) -> dict:
    return json.loads((forecast_dir / "metrics.json").read_text())


def choose(validation: dict):
    """The validation forecast's choice between the fine-tuned model and the zero-shot base (study.selection)."""
    what = (f"the validation split's first {validation['n_scored']} trajectories "
            f"(median of {validation['protocol_settings']['num_samples']} samples)")
    return choose_by_forecast(validation["metrics"], list(CANDIDATES), what)


def summary_table(summary: dict, fine_tuned: bool) -> str:
    """The test split's rows the demo is about: fine-tuned, zero-shot, baselines (forecast.py's point-metric rows),
    the sampled models' central bands (calibrated, and the samples' own) and the temperature the validation split
    chose, from the forecast's metrics.json `summary`. `fine_tuned`: the forecast was the fine-tuned run's (its
    "untrained" baseline is the zero-shot base), else the base's own (its "model" is the zero-shot base)."""
    rows = {"model": "fine-tuned (LoRA)", "untrained": "zero-shot base"} if fine_tuned else {"model": "zero-shot base"}
    metrics = summary["metrics"]
    return "\n".join(method_rows(metrics, {**rows, **BASELINE_ROWS}) + band_table(metrics, rows)
                     + validation_lines(summary.get("validation")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="H5", help="a Lotka-Volterra h5 file (default: the built-in simulated set)")
    p.add_argument("--runs-dir", default="runs", help="where the demo's run, forecasts and report go "
                                                      "(default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="training and sampling seed (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=STEPS, help="LoRA training steps (default: %(default)s)")
    args = p.parse_args(argv)
    if args.data is not None and not Path(args.data).is_file():
        what = "a directory, not an h5 file" if Path(args.data).is_dir() else "no such file"
        p.error(f"--data {args.data}: {what}")
    if args.data is not None:  # before any FLOP: data the forecasts could not use is refused, not trained on first
        try:
            check_forecast_fits(trajectories_shape(args.data)[1], ForecastConfig.context, ForecastConfig.horizon,
                                f"--data {args.data}")
        except (DataError, TooShort) as e:
            p.error(str(e))
    try:
        return run_demo(args)
    except KeyboardInterrupt:  # between the commands (each reports its own stop and returns its status)
        print("[demo] stopped by Ctrl-C; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_demo(args) -> int:
    """The demo's commands, in a fresh run directory or in the one of a stopped demo with these settings; the first
    that fails ends it, with its exit status (130 for a Ctrl-C)."""
    base = Path(args.runs_dir) / "demo"
    run = unfinished_demo(base, args.data, args.seed, args.steps)
    if run is not None:
        print(f"[demo] continuing the stopped demo in {run}/ (same --data, --seed and --steps)", flush=True)
    run = run or fresh_dir(base)
    data = ["--data", args.data] if args.data else []
    seed = ["--seed", str(args.seed)]
    steps = ["--model", str(BASE), "--rank", "8", "--ctx", "768", "--steps", str(args.steps),
             "--warmup", str(min(WARMUP, args.steps // 10)), *TRAIN, *seed, *data,
             "--runs-dir", args.runs_dir, "--out", str(run)]
    if not weights_saved(run):  # (an adapter/ that a kill left half-written is saved again by --resume)
        steps += ["--resume"] if holds_run(run) else []
        print(f"[demo] LoRA-fine-tuning the pretrained {BASE.name}: python train.py {' '.join(steps)}", flush=True)
        status = train.main(steps, again="the same demo.py command")  # demo.py takes no --resume: it continues
        if status != EXIT_OK:
            return status
    validation = [*VALIDATION, *seed, "--out", str(run / "forecast_val")]
    if not (run / "forecast_val" / FORECAST_METRICS).is_file():
        print(f"[demo] fine-tuned or zero-shot? python forecast.py --run {run} {' '.join(validation)}", flush=True)
        status = forecast.main(["--run", str(run), *validation])
        if status != EXIT_OK:
            return status
    choice = choose(read_metrics(run / "forecast_val"))
    if choice is None:
        print("[demo] error: neither model has a finite validation forecast score", file=sys.stderr)
        return 1
    chosen = list(CANDIDATES)[choice.index]
    scores = ", ".join(f"{CANDIDATES[m]} {s:.4g}" for m, s in zip(CANDIDATES, choice.scores) if s is not None)
    print(f"[demo] chosen: {CANDIDATES[chosen]} ({choice.criterion}: {scores})", flush=True)
    if chosen == "model":
        test = ["--run", str(run), *FORECAST, *seed]
    else:
        test = ["--model", str(BASE), *FORECAST_BASE, *seed, *data, "--runs-dir", args.runs_dir,
                "--out", str(run / "forecast")]
    print(f"[demo] forecasting the test split: python forecast.py {' '.join(test)}", flush=True)
    status = forecast.main(test)
    if status != EXIT_OK:
        return status
    print(f"[demo] writing the report of every run in {args.runs_dir}: python report.py {args.runs_dir}", flush=True)
    status = report.main([args.runs_dir])
    if status != EXIT_OK:
        return status
    print(f"\n[demo] test split, {CANDIDATES[chosen]} chosen on validation:\n"
          + summary_table(read_metrics(run / "forecast"), chosen == "model"))
    print(f"\n[demo] done. Training run: {run}/ (metrics.jsonl, loss curve PNG, adapter/, flops.json)\n"
          f"[demo] forecasts: {run}/forecast/ (metrics.json, per_trajectory.csv, samples.npz, trajectory_*.png, "
          f"error_vs_horizon.png, error_distribution.png); the validation one: {run}/forecast_val/\n"
          f"[demo] report: {Path(args.runs_dir) / report.REPORT_NAME} (tables, loss curves, the FLOP ledger)\n"
          f"[demo] next: python forecast.py --run {run} --sample 972 --out {run}/forecast_972 ; "
          f"python flops.py --runs {args.runs_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
