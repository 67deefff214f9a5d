"""The main job end to end, offline: train the tiny model on the built-in simulated data, forecast the test split
against the baselines, and say where the plots and metrics are. A few minutes on 2 CPU cores.

    python demo.py [--steps N] [--seed S]

It is exactly these three commands, with a fresh run directory each time (earlier demo runs are kept):
    python train.py --model tiny --full --steps 600 --batch 16 --ctx 256 --lr 3e-3 --warmup 50 --schedule cosine \
        --out runs/demo
    python forecast.py --run runs/demo
    python report.py runs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import forecast
import report
import train


def fresh_dir(base: Path) -> Path:
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="training steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--runs-dir", default="runs", help="(default: %(default)s)")
    args = p.parse_args(argv)
    run = fresh_dir(Path(args.runs_dir) / "demo")
    steps = ["--model", "tiny", "--full", "--steps", str(args.steps), "--batch", "16", "--ctx", "256", "--lr", "3e-3",
             "--warmup", "50", "--schedule", "cosine", "--eval-every", "100", "--seed", str(args.seed),
             "--runs-dir", args.runs_dir, "--out", str(run)]
    print(f"[demo] training the tiny model: python train.py {' '.join(steps)}", flush=True)
    if train.main(steps) != 0:
        return 1
    print(f"[demo] forecasting the test split: python forecast.py --run {run}", flush=True)
    if forecast.main(["--run", str(run), "--seed", str(args.seed)]) != 0:
        return 1
    print(f"[demo] writing the report of every run in {args.runs_dir}: python report.py {args.runs_dir}", flush=True)
    if report.main([args.runs_dir]) != 0:
        return 1
    print(f"\n[demo] done. Training run: {run}/ (metrics.jsonl, loss curve PNG, weights, flops.json)\n"
          f"[demo] forecasts: {run}/forecast/ (metrics.json, per_trajectory.csv, trajectory_*.png, "
          f"error_vs_horizon.png, error_distribution.png)\n"
          f"[demo] report: {Path(args.runs_dir) / report.REPORT_NAME} (tables, loss curves, the FLOP ledger)\n"
          f"[demo] next: python forecast.py --run {run} --sample 972 --out {run}/forecast_972 ; "
          f"python flops.py --runs {args.runs_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
