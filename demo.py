"""The main job end to end, offline: LoRA-fine-tune the shipped pretrained base model (models/lv-tiny, a small
Qwen2-architecture model pretrained on simulated Lotka-Volterra series) with the real command's flags, forecast the
test split against the baselines, and write the report. A few minutes on 2 CPU cores.

    python demo.py                                  # the built-in simulated data set
    python demo.py --data lotka_volterra_data.h5    # the same demo on your own file
    python demo.py --runs-dir DIR                   # everything under DIR (default: runs)

It is exactly these commands, with a fresh run directory each time (earlier demo runs are kept):
    python train.py --model models/lv-tiny --rank 8 --ctx 768 {TRAIN} [--data FILE] --out runs/demo
    python forecast.py --run runs/demo {FORECAST}
    python report.py runs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import forecast
import report
import train
from models.recipe import MODEL_DIR
from common.args import positive_int

LV_TINY = MODEL_DIR  # the shipped pretrained base
# What the small model needs beyond the real command's flags (--rank 8 --ctx 768): a learning rate for its size and
# few steps, so the demo stays within minutes on a CPU.
STEPS = 40
TRAIN = ["--lr", "5e-4", "--batch", "8", "--schedule", "cosine", "--eval-every", "20", "--val-batches", "2"]
# The point forecast is the median of 20 samples (LLMTIME's): one greedy path puts a sharp peak a few steps off, which
# squared error punishes twice; the median of samples hedges where the timing is uncertain. Rows per generate call
# come from forecast.py's memory budget (all 3,000 rows in one call here: the samples share their prompt's keys and
# values); jump-forward, which pays at small batches, costs time at this one. The untrained (zero-shot) model
# forecasts the same trajectories, so the printed table and the report show what the fine-tuning changed.
FORECAST = ["--num-samples", "20", "--temperature", "1.0", "--baselines", "persistence,seasonal_naive,lv_fit,untrained"]
__doc__ = __doc__.replace("{TRAIN}", f"--steps {STEPS} " + " ".join(TRAIN)).replace("{FORECAST}", " ".join(FORECAST))


def fresh_dir(base: Path) -> Path:
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="H5", help="a Lotka-Volterra h5 file (default: the built-in simulated set)")
    p.add_argument("--runs-dir", default="runs", help="where the demo's run, forecasts and report go "
                                                      "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=STEPS, help="LoRA training steps (default: %(default)s)")
    args = p.parse_args(argv)
    if args.data is not None and not Path(args.data).is_file():
        p.error(f"--data {args.data}: " + ("a directory, not an h5 file" if Path(args.data).is_dir() else "no such file"))
    run = fresh_dir(Path(args.runs_dir) / "demo")
    steps = ["--model", str(LV_TINY), "--rank", "8", "--ctx", "768", "--steps", str(args.steps), *TRAIN,
             "--seed", str(args.seed),
             *(["--data", args.data] if args.data else []), "--runs-dir", args.runs_dir, "--out", str(run)]
    print(f"[demo] LoRA-fine-tuning the pretrained lv-tiny: python train.py {' '.join(steps)}", flush=True)
    if train.main(steps) != 0:
        return 1
    print(f"[demo] forecasting the test split: python forecast.py --run {run} {' '.join(FORECAST)}", flush=True)
    if forecast.main(["--run", str(run), "--seed", str(args.seed), *FORECAST]) != 0:
        return 1
    print(f"[demo] writing the report of every run in {args.runs_dir}: python report.py {args.runs_dir}", flush=True)
    if report.main([args.runs_dir]) != 0:
        return 1
    print(f"\n[demo] done. Training run: {run}/ (metrics.jsonl, loss curve PNG, adapter/, flops.json)\n"
          f"[demo] forecasts: {run}/forecast/ (metrics.json, per_trajectory.csv, samples.npz, trajectory_*.png, "
          f"error_vs_horizon.png, error_distribution.png)\n"
          f"[demo] report: {Path(args.runs_dir) / report.REPORT_NAME} (tables, loss curves, the FLOP ledger)\n"
          f"[demo] next: python forecast.py --run {run} --sample 972 --out {run}/forecast_972 ; "
          f"python flops.py --runs {args.runs_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
