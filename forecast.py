"""Forecast Lotka-Volterra trajectories with a trained run (or a plain model) and compare with baselines.

    python forecast.py --run runs/r8_lr1e-05_ctx768                # the run's test split, all baselines
    python forecast.py --run runs/demo --sample 972                 # one trajectory (by index in the h5), plotted
    python forecast.py --model Qwen/Qwen2.5-0.5B-Instruct --limit 50
    python forecast.py --run runs/demo --num-samples 10 --temperature 0.8 --top-p 0.9   # median + 10-90 % band

Protocol (printed with the results): the first --context steps are the prompt, the next --horizon steps the
target; the LLMTIME scaler is fitted on the context only; decimals as in training. Every method, model and
baselines (persistence, the run's untrained base model, a Lotka-Volterra least-squares fit), sees the same
context. Writes metrics.json, per_trajectory.csv and PNG plots to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from forecasting.evaluate import BASELINES, Protocol, evaluate, format_table, pick_device, untrained_model_of_run
from qwen_mini import load_model_and_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="training run directory (adapter or weights + its config)")
    source.add_argument("--model", help="hub id, local directory or 'tiny': forecast with this model as is")
    p.add_argument("--data", help="h5 file (default: the run's data, else the built-in simulated set)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="(default: %(default)s)")
    p.add_argument("--sample", type=int, nargs="+", help="trajectory index(es) in the h5 file, whatever the split")
    p.add_argument("--samples-idx", help="comma list of trajectory indices (same as --sample)")
    p.add_argument("--limit", type=int, help="only the first N trajectories of the split")
    p.add_argument("--context", type=int, default=50, help="context steps (default: %(default)s)")
    p.add_argument("--horizon", type=int, default=50, help="forecast steps (default: %(default)s)")
    p.add_argument("--decimals", type=int, help="LLMTIME decimals (default: the run's, else 2)")
    p.add_argument("--unconstrained", action="store_true", help="no number grammar: parse failures are counted")
    p.add_argument("--num-samples", type=int, default=1, help="samples per trajectory (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma list of {','.join(BASELINES)} (default: all)")
    p.add_argument("--no-baselines", action="store_true", help="model only")
    p.add_argument("--batch", type=int, default=32, help="rows generated together (default: %(default)s)")
    p.add_argument("--out", help="output directory (default: RUN/forecast, else forecasts/<model>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from data.lotka_volterra import DataError, Split
    from training.run import RunDirError, load_run

    samples = list(args.sample or [])
    try:
        if args.samples_idx:
            samples += [int(s) for s in args.samples_idx.split(",") if s.strip()]
    except ValueError:
        print(f"error: --samples-idx must be a comma list of integers, got {args.samples_idx!r}", file=sys.stderr)
        return 2
    baselines = [] if args.no_baselines else [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        print(f"error: unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    try:
        if args.run:
            model, tokenizer, run_config = load_run(args.run, device=device)
            data_path = args.data or run_config.get("data")
            split = Split.from_dict(run_config["split"]) if "split" in run_config and not args.data else None
            decimals = args.decimals if args.decimals is not None else run_config.get("decimals", 2)
            untrained = untrained_model_of_run(run_config, device) if "untrained" in baselines else None
            out = Path(args.out or Path(args.run) / "forecast")
        else:
            model, tokenizer = load_model_and_tokenizer(args.model, device=device, seed=args.seed)
            data_path, split, untrained = args.data, None, None  # the model itself is the untrained one
            decimals = args.decimals if args.decimals is not None else 2
            out = Path(args.out or Path("forecasts") / Path(args.model).name)
        protocol = Protocol(args.context, args.horizon, decimals, not args.unconstrained, args.num_samples,
                            args.temperature, args.top_p, args.seed)
        result = evaluate(model, tokenizer, data_path=data_path, split=split, split_name=args.split,
                          samples=samples or None, limit=args.limit, protocol=protocol, baselines=baselines,
                          untrained_model=untrained, out_dir=out, batch=args.batch, progress=not args.quiet)
    except (RunDirError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nwrote {out}/metrics.json, per_trajectory.csv and plots: " +
          ", ".join(sorted(p.name for p in out.glob("*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
