"""The forecast.py command line: flags -> ForecastConfig -> a forecast source and its trajectories ->
`budgeted_evaluate` under the FLOP ledger -> metrics.json, per_trajectory.csv, plots and the printed table."""
from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
from pathlib import Path

from common.args import bounded
from common.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_OVER_BUDGET, EXIT_USAGE
from common.fileio import ensure_writable_dir, os_error_text
from ledger import (
    RECORD_NAME,
    BudgetExceeded,
    Ledger,
    LedgerError,
    MixedConventions,
    OutsideRunsDir,
    is_inside,
    read_record,
    record_present,
    recorded_runs_dir,
)
from ledger.flags import CHANGE_MAX_FLOPS_HELP, MAX_FLOPS_HELP, add_budget_arguments
from qwen_mini.generate import NonFiniteLogits
from training.stopping import Interrupted, StopSignals

from .budget import Booking, NothingScored, budgeted_evaluate, check_fits, check_fits_unloaded, check_run_record
from .config import (
    AUTO,
    BASELINES,
    DEFAULT_DECIMALS,
    DEFAULT_RUNS_DIR,
    DTYPES,
    SPLITS,
    ForecastConfig,
    ForecastConfigError,
)
from .evaluate import (
    OutputBusy,
    Protocol,
    check_output_names,
    format_table,
    lock_output,
    select_trajectories,
    write_outputs,
)
from .forecast import GenerationTooLarge, check_samples_fit
from .grammar import max_forecast_tokens
from .source import from_model, from_run, parse_dtype, pick_device
from .tuning import check_apart, validation_selection

DESCRIPTION = """\
Forecast Lotka-Volterra trajectories with a trained run (or a plain model) and compare with baselines.

    python forecast.py --run runs/demo                              # the run's test split, all baselines
    python forecast.py --run runs/demo --sample 972                 # one trajectory (its index in the h5), plotted
    python forecast.py --model Qwen/Qwen2.5-0.5B-Instruct --limit 50   # the untrained model, 50 test trajectories
    python forecast.py --run runs/demo --num-samples 10 --temperature 0.8 --top-p 0.9   # median + 10-90 % band
    python forecast.py --run runs/demo --num-samples 20 --temperature auto --calibrate  # tuned and calibrated

Protocol (printed with the results and written to metrics.json): the first --context steps (default 50) of each
trajectory are the prompt and the next --horizon steps (default 50) the target; each trajectory's LLMTIME scaler
is fitted on its context only, by the run's rule (--scaler: p95 for a plain model); the decimals are the run's (2
for a plain model). --temperature auto first forecasts the validation split (--val-limit of it) at each
--temperature-grid value and keeps the lowest CRPS; --calibrate calibrates the model's bands on that validation
forecast (conformal, per species and horizon step); both are booked like the test forecast, and metrics.json's
"validation" records the candidates, the choice and the calibration. Generation is batched over
trajectories with a KV cache, greedy unless sampling is asked for, and constrained to the number grammar, so every
forecast parses to exactly --horizon steps. Metrics (MSE, MAE, R2, error per horizon step) are on original units,
per species, over all forecast trajectories. Baselines on the same contexts: persistence (the last context
value), seasonal_naive (the context's last period repeated; the period from its autocorrelation), untrained (the
run's base model, before training), lv_fit (classic and logistic Lotka-Volterra least-squares fits of the context,
the better one integrated over the horizon on the data's time grid; a runaway forecast falls back to persistence,
and how often is reported).

Writes metrics.json (point and probabilistic scores: CRPS, WQL, coverage_80, MASE; WQL and MASE also relative to
seasonal naive, a geometric mean over trajectories),
per_trajectory.csv, samples.npz (every method's forecasts: any score can be recomputed, forecasting.scores),
trajectory_<index>.png, error_vs_horizon.png and error_distribution.png to --out. FLOPs (prefill once per prompt,
every KV-cache decode step; the untrained baseline's too) are reserved
before the first forecast and booked into the FLOP ledger of --runs-dir: into the run's flops.json, or for a plain
--model into flops.json in --out, which then must lie inside --runs-dir (default RUNS_DIR/forecasts/<model>) and not be
a training run's directory (metrics.json names the model and run that forecast: "forecaster"). The default --out
names the selection: _val / _first<N> for another split or --limit, the --sample indices (the first five, then
_and_<K>_more_<hash>), so two selections never share a folder. The ledger's cap is the runs directory's (--max-flops).
Exit status: 0 done, 1 the forecast failed (non-finite logits: NaN or infinity from the model; no trajectory could be
scored, every forecast failing to parse; the output could not be written, e.g. a full disk), 2 bad arguments, run
directory, model, data (a run's data file that is gone) or an output location that cannot be written (or a record
outside --runs-dir), or a forecast that cannot fit --memory-budget or the model's positions, 3 refused by the FLOP
budget or by the ledger's gqa convention or cap (another --max-flops than the runs directory's), 130 / 143
stopped by Ctrl-C / SIGTERM (nothing written: the files appear together at the end, metrics.json last).
One forecast at a time writes into an --out: a second one is refused (2), naming the first.
"""


def build_parser() -> argparse.ArgumentParser:
    d = ForecastConfig()
    p = argparse.ArgumentParser(prog="forecast.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="training run directory (train.py --out): its weights or "
                        "adapter, data, split and decimals")
    source.add_argument("--model", help="hub id, local directory or 'tiny': forecast with this model as it is")

    which = p.add_argument_group("which trajectories")
    which.add_argument("--data", metavar="H5", help="h5 file (default: the run's data, else the built-in simulated "
                       "set)")
    which.add_argument("--split", choices=SPLITS,
                       help=f"the split to forecast (default: {d.split}; not with --sample)")
    which.add_argument("--limit", type=bounded(int, 1), help="only the first N trajectories of the split")
    which.add_argument("--sample", type=bounded(int, 0), nargs="+", metavar="INDEX",
                       help="trajectory index(es) in the h5 file, whatever their split (the split is reported; "
                            "a training-split one is warned about; so neither --split nor --limit)")
    which.add_argument("--samples-idx", metavar="I,J,...", help="comma list of indices: the same as --sample")
    which.add_argument("--val-limit", type=bounded(int, 1),
                       help="--temperature auto / --calibrate: forecast only the first N trajectories of the "
                            "validation split (default: --limit, else all of it)")

    protocol = p.add_argument_group("protocol")
    protocol.add_argument("--context", type=bounded(int, 1), default=d.context,
                          help="prompt steps (default: %(default)s)")
    protocol.add_argument("--horizon", type=bounded(int, 1), default=d.horizon,
                          help="forecast steps (default: %(default)s)")
    protocol.add_argument("--decimals", type=bounded(int, 0),
                          help=f"LLMTIME decimals (default: the run's, else {DEFAULT_DECIMALS})")
    protocol.add_argument("--unconstrained", action="store_true",
                          help="no number grammar (a step counter still ends each row): unparseable forecasts are "
                               "counted and left unscored")
    protocol.add_argument("--int-digits", type=bounded(int, 1), default=d.int_digits,
                          help="integer digits the grammar allows per scaled number (default: %(default)s)")
    protocol.add_argument("--allow-negative", action="store_true",
                          help="let the grammar write negative numbers (off: populations are non-negative)")
    protocol.add_argument("--num-samples", type=bounded(int, 1), default=d.num_samples,
                          help="samples per trajectory; > 1 reports their median and 10-90 %% band "
                               "(default: %(default)s)")
    protocol.add_argument("--temperature", type=temperature_value, default=d.temperature,
                          help="0 = greedy; auto = forecast the validation split at each --temperature-grid value "
                               "first and keep the lowest CRPS (the geometric mean over the species; booked like "
                               "every forecast) (default: %(default)s)")
    protocol.add_argument("--temperature-grid", metavar="T,T,...",
                          help="the temperatures --temperature auto tries (default: "
                               f"{','.join(f'{t:g}' for t in d.temperature_grid)})")
    protocol.add_argument("--calibrate", action="store_true",
                          help="calibrate the model's bands on the validation split (split-conformal CQR per species "
                               "and horizon step, forecasting.calibration): the reported quantiles, coverage and WQL "
                               "are the calibrated ones, the samples' own beside them (*_uncalibrated)")
    protocol.add_argument("--scaler", help="the LLMTIME scaling rule, fitted on each context: p95, joint-p95x10 (seeds "
                                          "000/004), p99x10 (seed 002) or fixed=<alpha> (default: the run's, else "
                                          "p95)")
    protocol.add_argument("--top-p", type=bounded(float, 0.0, 1.0, low_open=True),
                          help="nucleus sampling mass (default: off)")
    protocol.add_argument("--baselines", default=",".join(d.baselines),
                          help="comma list of %(default)s (default: all)")
    protocol.add_argument("--no-baselines", action="store_true", help="the model only")

    how = p.add_argument_group("how")
    how.add_argument("--batch", type=bounded(int, 1), default=d.batch,
                     help="rows (trajectories x samples) generated together; a trajectory's samples share one "
                          "prefill and one copy of its prompt's keys/values (default: as many as --memory-budget "
                          "holds)")
    how.add_argument("--memory-budget", type=bounded(float, 0.0, low_open=True), default=d.memory_gb,
                     metavar="GB", help="what one generate call may hold (KV cache, logits, activations) when "
                                        "--batch is not given (default: %(default)s)")
    how.add_argument("--out", help="output directory (default: RUN_DIR/forecast, or forecasts/<model>; "
                                   "'_<index>' appended for --sample)")
    how.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    how.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                     help="float32 or bfloat16: the model weights; float16: float32 weights under fp16 autocast "
                          "(for GPUs without bfloat16); no bfloat16 on mps (default: %(default)s, as stored)")
    how.add_argument("--seed", type=int, default=d.seed, help="sampling seed, 0 to 2**63 - 1 (default: %(default)s)")
    how.add_argument("--jump-forward", action="store_true",
                     help="append the tokens the grammar forces (separator after the last decimal, ...) without "
                          "sampling and feed them with the next step: fewer forward passes, the same tokens")
    how.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step over a static KV cache (compiles once, tens of seconds on "
                          "CPU; the same tokens)")

    add_budget_arguments(
        p.add_argument_group("FLOP ledger"),
        runs_dir=f"the runs directory whose ledger counts this forecast (default: the one the run was trained under, "
                 f"else {DEFAULT_RUNS_DIR})",
        max_flops=MAX_FLOPS_HELP, change_max_flops=CHANGE_MAX_FLOPS_HELP,
        gqa="how attention is counted: real grouped-query k/v or mha (default: the ledger's)",
        no_budget="no reservation or budget check (allows a record outside --runs-dir, counted nowhere)")
    how.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def requested_samples(args) -> list[int]:
    """--sample and --samples-idx together: trajectory indices in the data file, each once, in the order first given
    (a trajectory named twice is forecast, scored and billed once)."""
    samples = list(args.sample or [])
    if args.samples_idx:
        try:
            samples += [int(s) for s in args.samples_idx.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--samples-idx must be a comma list of integers, got {args.samples_idx!r}") from None
    return list(dict.fromkeys(samples))


def requested_baselines(args) -> list[str]:
    """--baselines, checked (none with --no-baselines)."""
    if args.no_baselines:
        return []
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    return baselines


# ForecastConfig fields whose flag is not --<field> (a refusal names the flag the user typed).
FLAG_OF = {"memory_gb": "--memory-budget", "constrained": "--unconstrained"}


def forecast_config(args) -> ForecastConfig:
    """The settings the flags ask for (the baselines checked); a value ForecastConfig refuses is a ValueError naming
    its flag. --split with --sample is refused: --sample picks by index, whatever the split."""
    if (args.sample or args.samples_idx) and args.split is not None:
        raise ValueError(f"--split {args.split} with --sample: --sample picks trajectories by their index in the data "
                         "file, whatever their split (each one's split is reported); give one or the other")
    try:
        return settings_of(args)
    except ForecastConfigError as e:
        flag = FLAG_OF.get(e.key, f"--{e.key.replace('_', '-')}") if e.key else "forecast settings"
        raise ValueError(f"{flag}: {e}") from None


def temperature_value(text: str):
    """argparse type of --temperature: "auto", or a finite number >= 0."""
    return AUTO if text.strip() == AUTO else bounded(float, 0.0)(text)


def temperature_grid(args) -> tuple[float, ...]:
    """--temperature-grid as numbers (the default grid when it is not given); ValueError naming it."""
    if args.temperature_grid is None:
        return ForecastConfig.temperature_grid
    try:
        return tuple(float(t) for t in args.temperature_grid.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--temperature-grid must be a comma list of numbers > 0 such as 0.3,0.5,0.7,1, got "
                         f"{args.temperature_grid!r}") from None


def settings_of(args) -> ForecastConfig:
    auto = args.temperature == AUTO
    if args.temperature_grid is not None and not auto:
        raise ValueError("--temperature-grid is what --temperature auto tries: give --temperature auto with it")
    if args.val_limit is not None and not (auto or args.calibrate):
        raise ValueError("--val-limit counts the validation trajectories of --temperature auto and --calibrate: give "
                         "one of them with it")
    return ForecastConfig(split=args.split or ForecastConfig.split, limit=args.limit, context=args.context,
                          horizon=args.horizon,
                          decimals=args.decimals, constrained=not args.unconstrained, int_digits=args.int_digits,
                          allow_negative=args.allow_negative, num_samples=args.num_samples,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          temperature_grid=temperature_grid(args), calibrate=args.calibrate,
                          val_limit=args.val_limit, scaler=args.scaler,
                          baselines=requested_baselines(args), batch=args.batch, memory_gb=args.memory_budget,
                          device=args.device,
                          dtype=args.dtype, jump_forward=args.jump_forward, compile=args.compile)


NAMED_SAMPLES = 5  # --sample indices a default output folder spells out; more are counted and hashed


def out_for_selection(base: Path, config: ForecastConfig, samples: list[int]) -> Path:
    """The default output folder of a selection: `base` for the whole test split; _<split> and _first<N> for another
    split or a --limit; the --sample indices (the first NAMED_SAMPLES, then _and_<K>_more_<sha256 of them all>). Two
    selections never share a folder, so one never overwrites the other or removes its plots."""
    if samples:
        suffix = "_" + "_".join(map(str, samples[:NAMED_SAMPLES]))
        if len(samples) > NAMED_SAMPLES:
            digest = hashlib.sha256(",".join(map(str, samples)).encode()).hexdigest()[:8]
            suffix += f"_and_{len(samples) - NAMED_SAMPLES}_more_{digest}"
    else:
        suffix = ("" if config.split == "test" else f"_{config.split}") + \
            ("" if config.limit is None else f"_first{config.limit}")
    return base.with_name(base.name + suffix)


def check_not_another_run(out: Path, run: str | None, label: str) -> None:
    """ValueError when --out is a training run's directory (not the forecasting run's own): the forecast would be
    booked into that run's record and read as that run's results; or a model's weights directory (a run's model/ or
    adapter/), where its files would sit among the weights. A subdirectory of a run is fine: its own record and
    metrics.json ("forecaster") name the model that forecast."""
    from lora import ADAPTER_WEIGHTS_NAME
    from training.run import CONFIG_NAME

    weights = [name for name in ("model.safetensors", ADAPTER_WEIGHTS_NAME) if (out / name).exists()]
    if weights:
        raise ValueError(f"--out {out} holds a model's weights ({weights[0]}): a forecast's files do not belong "
                         "among them; pass another --out")
    try:
        config = json.loads((out / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return
    if isinstance(config, dict) and "split" in config and "model" in config and \
            (run is None or out.resolve() != Path(run).resolve()):
        raise ValueError(f"--out {out} is the directory of training run {out}: the forecast of {label} would be "
                         "booked into that run's record and read as its results; pass another --out (a "
                         "subdirectory of it is fine: its metrics.json names the model that forecast)")


def runs_dir_of(args) -> Path:
    """--runs-dir, else the runs directory the run's ledger record names, else the default."""
    path = Path(args.run) / RECORD_NAME if args.run else None
    record = read_record(path) if path is not None and record_present(path) else None  # one that lies: refused now
    if args.runs_dir is not None:
        if Path(args.runs_dir).exists() and not Path(args.runs_dir).is_dir() and not args.no_budget:
            raise ValueError(f"--runs-dir {args.runs_dir}: not a directory (the runs directory whose FLOP ledger "
                             "counts this forecast)")
        return Path(args.runs_dir)
    recorded = recorded_runs_dir(record) if record is not None else None
    return recorded if recorded is not None else Path(DEFAULT_RUNS_DIR)


def main(argv=None) -> int:
    """forecast.py: check everything the user can get wrong, forecast under the ledger, write and print the results."""
    try:  # Ctrl-C or SIGTERM at any point (loading, simulating the default set, forecasting, writing): one line
        args = build_parser().parse_args(argv)
        with StopSignals() as signals:
            return forecast(args, signals)
    except KeyboardInterrupt as e:  # Interrupted, or a Ctrl-C before the handlers were installed
        stop = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        print(f"error: stopped by {stop.name}; nothing was written", file=sys.stderr)
        return stop.exit_status


def forecast(args, signals: StopSignals) -> int:
    """What main does, with `signals` (SIGINT, SIGTERM) handled."""
    try:  # everything the user can get wrong is checked before the first forecast
        samples, config = requested_samples(args), forecast_config(args)
        if args.out is not None and not args.out.strip():
            raise ValueError(f"--out must name a directory, got {args.out!r}")
        if config.num_samples > 1 and not config.auto_temperature and config.temperature <= 0:
            raise ValueError("--num-samples > 1 needs --temperature > 0 (greedy samples are all the same)")
        if args.change_max_flops and args.max_flops is None:
            raise ValueError("--change-max-flops needs --max-flops: the cap it makes the runs directory's")
        device = pick_device(config.device)
        dtype = parse_dtype(config.dtype, device)
        check_fits_unloaded(args.run, args.model, config)
        if args.run:
            source = from_run(args.run, data_path=args.data, decimals=config.decimals, context=config.context,
                              device=device, dtype=dtype, scaler=config.scaler)
        else:
            source = from_model(args.model, data_path=args.data, decimals=config.decimals, device=device,
                                dtype=dtype, scaler=config.scaler)
        steps = source.data.trajectories.shape[1]
        if config.context + config.horizon > steps:
            raise ValueError(f"--context {config.context} + --horizon {config.horizon} steps exceed the {steps} "
                             f"steps of each trajectory in {source.data.path}")
        selection = select_trajectories(source.split, config.split, samples or None, config.limit)
        protocol = Protocol.of(config, source.decimals, source.scaler)
        n_vars = source.data.trajectories.shape[2]
        held = [len(selection.indices)]
        if protocol.validated:  # the validation trajectories exist and are not forecast ones
            validation = validation_selection(source.split, protocol.val_limit)
            check_apart(validation, selection)
            held.append(2 * len(validation.indices))  # a validation forecast's samples, and the best one so far's
        for trajectories in held:
            check_samples_fit(trajectories, config.num_samples,
                              max_forecast_tokens(config.horizon, n_vars, source.decimals, config.int_digits,
                                                  config.allow_negative), config.horizon, n_vars, config.memory_gb)
        check_fits(source, selection, protocol, config.memory_gb)
        runs_dir = runs_dir_of(args)
        if not args.no_budget:  # a cap that differs from the runs directory's: refused before any output or FLOP
            Ledger(runs_dir, args.max_flops, change_max_flops=args.change_max_flops).cap()
    except MixedConventions as e:  # CapConflict: the runs directory's cap is another
        print(f"forecast.py: refused by the FLOP ledger: {e}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except (ValueError, OSError) as e:  # RunDirError, DataError, CheckpointError, LedgerError ... are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    # A plain model's forecasts live in the runs directory by default: their flops.json is its ledger's record.
    default_out = source.default_out if args.run else runs_dir / "forecasts" / source.default_out.name
    out = Path(args.out) if args.out is not None else out_for_selection(default_out, config, samples)
    try:  # before the forecasts, which may take long: not after them
        check_not_another_run(out, args.run, source.label)
        if args.run is not None:
            check_run_record(Path(args.run))
        ensure_writable_dir(out)
        check_output_names(out)
    except OSError as e:
        print(f"error: cannot write the output: {os_error_text(e)}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # LedgerError, another run's directory
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"forecasting {selection.label} of {source.data.path} with {source.label} on {device}", file=sys.stderr)
    booking = Booking(runs_dir, args.max_flops, args.gqa, args.no_budget, args.change_max_flops)
    try:
        with lock_output(out, f"forecast.py {source.label} -> {out}"):
            evaluation, record_dir = budgeted_evaluate(source, selection, protocol, out=out, run_dir=args.run,
                                                       baselines=config.baselines, batch=config.batch,
                                                       memory_gb=config.memory_gb,
                                                       booking=booking, progress=not args.quiet,
                                                       jump_forward=config.jump_forward, compile=config.compile)
            evaluation.notes[:0] = [f"split: {source.split_origin}", *source.notes]
            written = write_outputs(evaluation, out, signals)
    except OutputBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the lock or the outputs (a full disk): the directory keeps what it had
        print(f"error: {os_error_text(e)}: the forecasts were not written", file=sys.stderr)
        return EXIT_FAILED
    except (BudgetExceeded, MixedConventions) as e:
        print(f"forecast.py: refused by the FLOP ledger: {e}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except (OutsideRunsDir, LedgerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (NonFiniteLogits, NothingScored) as e:
        print(f"error: {source.label}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except GenerationTooLarge as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if signals.signum is not None:  # it came while the files were moved into place: they are complete
        stop = Interrupted(signals.signum)
        print(f"error: stopped by {stop.name} as the forecast was written: {out} holds it in full", file=sys.stderr)
        return stop.exit_status
    print(format_table(evaluation.summary()))
    print(f"\nwrote {', '.join(p.name for p in written)} to {out}/")
    spent = sum(s.flops for s in evaluation.generation.values())
    counted = f"booked in {record_dir / RECORD_NAME}" + ("" if is_inside(record_dir, runs_dir) else
                                                        " (outside --runs-dir: counted in no ledger)")
    gqa = read_record(record_dir / RECORD_NAME).gqa if (record_dir / RECORD_NAME).is_file() else args.gqa or "real"
    print(f"FLOPs (attention counted as gqa={gqa}): {spent:.3e} "
          f"({', '.join(f'{m} {s.flops:.3e}' for m, s in evaluation.generation.items())}), {counted}")
    return EXIT_OK
