"""Forecasting under the FLOP ledger: reserve a forecast's FLOPs before it runs, book every generate call, settle.

The FLOPs go into the ledger record of the run the forecast uses (`<run>/flops.json`), or, for a plain `--model`,
into `flops.json` in the forecast's output directory; either must lie inside the runs directory (else refused unless
`no_budget`). The reservation is an upper bound: every prompt prefilled at its batch's padded width, every row
decoding the grammar's longest forecast, for the model and (when it runs) the untrained baseline; it is settled to
what ran when the forecast ends. A forecast that scores no trajectory at all is an error (`NothingScored`), after its
FLOPs are booked.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from data.dataset import make_eval_example
from ledger import Ledger, LedgerError, OutsideRunsDir, Recorder
from ledger.records import RECORD_NAME, record_present

from .config import DEFAULT_MEMORY_GB, ForecastConfig
from .evaluate import MODEL, Evaluation, Protocol, Selection, evaluate
from .forecast import check_call_fits, generation_plan, grammar_candidates, shortest_prompt
from .grammar import max_forecast_tokens
from .metering import FlopsSoFar
from .source import ForecastSource, planned_model
from .tuning import check_apart, run_validation, validation_selection, validation_temperatures


class NothingScored(RuntimeError):
    """A forecast none of whose trajectories could be scored (every one has a sample that failed to parse)."""


@dataclass(frozen=True)
class Booking:
    """Where and how a forecast's FLOPs are booked."""
    runs_dir: Path
    max_flops: int | None  # None: the runs directory's cap (ledger.cap)
    gqa: str | None = None  # None: the ledger's convention
    no_budget: bool = False
    change_max_flops: bool = False  # max_flops becomes the runs directory's cap (ledger.Ledger)


def record_dir_of(run_dir, out) -> Path:
    """The record a forecast books into: its run's, else (a plain model) its output directory's."""
    return Path(run_dir) if run_dir is not None else Path(out)


def check_run_record(run_dir: Path) -> None:
    """A trained run whose flops.json is gone: booking a forecast there would start a record that forgets the run's
    training. LedgerError naming the command that rebuilds the record from what the run proves."""
    if record_present(run_dir / RECORD_NAME):
        return
    from training.run import CHECKPOINT_NAME, METRICS_NAME

    proof = [name for name in (CHECKPOINT_NAME, METRICS_NAME) if (run_dir / name).is_file()]
    if proof:
        raise LedgerError(f"{run_dir / RECORD_NAME} is missing although {run_dir} holds a trained run "
                          f"({', '.join(proof)}): a forecast booked there would count less than the run spent. Run "
                          "its train.py command again with --resume (it rebuilds the record from what the run "
                          "proves), then forecast")


def generated_methods(source: ForecastSource, baselines) -> list[str]:
    """The methods that generate text (and spend FLOPs): the model, and the untrained model when it runs."""
    return [MODEL] + (["untrained"] if "untrained" in baselines and source.load_untrained is not None else [])


def prompt_tokens(source: ForecastSource, selection: Selection, protocol: Protocol) -> list[int]:
    """Each selected trajectory's prompt length in tokens, as `evaluate` will write it."""
    scaler = protocol.scaler or source.scaler
    return [len(source.tokenizer.encode(make_eval_example(source.data.trajectories[i], i, protocol.context,
                                                          protocol.horizon, protocol.decimals, scaler).prompt))
            for i in selection.indices]


def longest_forecast(source: ForecastSource, protocol: Protocol) -> int:
    return max_forecast_tokens(protocol.horizon, source.data.trajectories.shape[2], protocol.decimals,
                               protocol.int_digits, protocol.allow_negative)


def check_fits(source: ForecastSource, selection: Selection, protocol: Protocol, memory_gb: float,
               prompts: list[int] | None = None) -> None:
    """GenerationTooLarge (forecasting.forecast.check_call_fits) when the longest prompt with the longest forecast
    exceeds the model's positions, or one such row exceeds `memory_gb`: before anything is reserved."""
    prompts = prompt_tokens(source, selection, protocol) if prompts is None else prompts
    check_call_fits(source.model.config, source.model.lm_head.weight.element_size(), max(prompts),
                    longest_forecast(source, protocol), memory_gb,
                    grammar_candidates(protocol.allow_negative) if protocol.constrained else None)


def check_fits_unloaded(run_dir, spec: str | None, config: ForecastConfig) -> None:
    """`check_call_fits` before any weight or data is loaded, on lower bounds (one variable whatever the data, every
    prompt number as short as it can be, two bytes a value): what is refused here could never fit. `check_fits`
    checks the real prompts once they are known."""
    architecture, run_decimals = planned_model(run_dir, spec)
    if architecture is None:
        return
    decimals = run_decimals if config.decimals is None else config.decimals
    check_call_fits(architecture, 2, shortest_prompt(config.context, 1, decimals),
                    max_forecast_tokens(config.horizon, 1, decimals, config.int_digits, config.allow_negative),
                    config.memory_gb, grammar_candidates(config.allow_negative) if config.constrained else None,
                    at_least=True)


def forecast_bound(source: ForecastSource, selection: Selection, protocol: Protocol, *, baselines,
                   batch: int | None, gqa: str, jump_forward: bool = False, compile: bool = False,
                   memory_gb: float = DEFAULT_MEMORY_GB) -> int:
    """The most FLOPs `evaluate` can spend on these trajectories: exact prefills, the longest forecasts; and, for
    temperature "auto" or calibrate, the model's forecasts of the validation trajectories before them, one per
    temperature tried (forecasting.tuning)."""
    def bound(trajectories: Selection) -> int:
        prompts = prompt_tokens(source, trajectories, protocol)
        check_fits(source, trajectories, protocol, memory_gb, prompts)
        return generation_plan(source.model, prompts, [longest_forecast(source, protocol)] * len(prompts),
                               batch=batch, memory_gb=memory_gb, num_samples=protocol.num_samples,
                               constrained=protocol.constrained, allow_negative=protocol.allow_negative, gqa=gqa,
                               jump_forward=jump_forward, compile=compile)

    total = bound(selection) * len(generated_methods(source, baselines))
    temperatures = validation_temperatures(protocol)
    if temperatures:
        total += bound(validation_selection(source.split, protocol.val_limit)) * len(temperatures)
    return total


def budgeted_evaluate(source: ForecastSource, selection: Selection, protocol: Protocol, *, out, run_dir, baselines,
                      batch: int | None, booking: Booking, progress: bool = True, jump_forward: bool = False,
                      compile: bool = False, memory_gb: float = DEFAULT_MEMORY_GB) -> tuple[Evaluation, Path]:
    """`evaluate`, with its FLOPs reserved (BudgetExceeded, MixedConventions, OutsideRunsDir before any forecast),
    booked call by call and settled. Returns (evaluation, the record it was booked into). A protocol with temperature
    "auto" or calibrate forecasts the validation split first (forecasting.tuning), within the same reservation; its
    choice and calibration are the evaluation's `validation` (metrics.json)."""
    protocol = protocol.for_source(source.scaler)
    validation = None
    if protocol.validated:  # before anything is reserved: validation trajectories that are not forecast ones
        validation = validation_selection(source.split, protocol.val_limit)
        check_apart(validation, selection)
    record_dir = record_dir_of(run_dir, out)
    ledger = Ledger(booking.runs_dir, booking.max_flops, change_max_flops=booking.change_max_flops)
    inside = ledger.contains(record_dir)
    if not inside and not booking.no_budget:
        where = f"--run {run_dir}" if run_dir is not None else f"the output directory {out}"
        raise OutsideRunsDir(f"{where} lies outside --runs-dir {booking.runs_dir}, whose FLOP ledger would never "
                             "count this forecast: pass the --runs-dir that holds it"
                             + ("" if run_dir is not None else ", or an --out inside it")
                             + ", or --no-budget to forecast without counting it")
    if run_dir is not None:
        check_run_record(Path(run_dir))
    gqa = ledger.convention(booking.gqa) if inside else (booking.gqa or "real")
    name = record_dir.resolve().name  # `--out .` names the directory it is
    what = f"forecast.py {source.label} -> {out}"
    if booking.no_budget:
        check_fits(source, selection, protocol, memory_gb)
        if validation is not None:
            check_fits(source, validation, protocol, memory_gb)
        recorder = ledger.recorder(record_dir, run_name=name, gqa=gqa)
    else:
        bound = forecast_bound(source, selection, protocol, baselines=baselines, batch=batch, gqa=gqa,
                               jump_forward=jump_forward, compile=compile, memory_gb=memory_gb)
        recorder = ledger.reserve(record_dir, bound, kind="forecast", run_name=name, gqa=gqa, what=what)
    generation = dict(batch=batch, memory_gb=memory_gb, progress=progress, gqa=gqa, jump_forward=jump_forward,
                      compile=compile)
    with recorder, source.autocast():  # --dtype float16: generation under fp16 autocast
        tuned = calibration = None
        if validation is not None:
            tuned = run_validation(source.model, source.tokenizer, source.data, source.split, validation, protocol,
                                   on_flops=booker(recorder, source, validation, out), **generation)
            protocol, calibration = replace(protocol, temperature=tuned.chosen, tuned=tuned.tuned), tuned.calibration
        evaluation = evaluate(source.model, source.tokenizer, source.data, source.split, selection, protocol,
                              baselines=baselines, load_untrained=source.load_untrained,
                              on_flops=booker(recorder, source, selection, out), calibration=calibration,
                              **generation)
    if tuned is not None:
        evaluation.validation = tuned.summary()
        evaluation.generation.update(tuned.generation)  # metrics.json's "flops" and the printed total hold them
    evaluation.forecaster = {"model": source.model_name, "run": None if run_dir is None else str(run_dir)}
    check_scored(evaluation, source.label)
    return evaluation, record_dir


def check_scored(evaluation: Evaluation, label: str) -> None:
    """NothingScored when no trajectory has a complete forecast from every generated method: a metrics.json of no
    numbers would mark the forecast done (a plan skips it) and a report would show nothing as a result."""
    if evaluation.scored.any():
        return
    n = len(evaluation.examples)
    failed = {method: sum(f.parse_failures for f in forecasts) for method, forecasts in evaluation.forecasts.items()}
    samples = n * evaluation.protocol.num_samples
    counts = ", ".join(f"{label if m == MODEL else m}: {k} of {samples} samples" for m, k in failed.items())
    raise NothingScored(f"no trajectory could be scored: {n} of {n} have a forecast that failed to parse ({counts}); "
                        "nothing was written (the FLOPs spent are booked). Check --temperature, --top-p and "
                        "--unconstrained")


def booker(recorder: Recorder, source: ForecastSource, selection: Selection, out):
    """on_flops for `evaluate`: books each generate call into one ledger entry per method of this forecast, as it
    runs: a call's FlopsSoFar (forecasting.metering) books what it computed since the last report, and its final
    GenerationFlops the rest (the larger of the two counts, so a call is never booked below what it reported)."""
    entries = {}
    in_call = {}  # method -> the running call's counts booked so far

    def book(method: str, flops) -> None:
        entry = entries.setdefault(method, uuid.uuid4().hex[:12])
        counts = {"prefill_flops": flops.prefill, "decode_flops": flops.decode,
                  "prefill_tokens": flops.prefill_tokens, "decode_tokens": flops.decode_tokens}
        booked = in_call.pop(method, dict.fromkeys(counts, 0))
        more = {key: max(value - booked[key], 0) for key, value in counts.items()}
        if isinstance(flops, FlopsSoFar):
            in_call[method] = {key: booked[key] + more[key] for key in counts}
        recorder.add("forecast", more["prefill_flops"] + more["decode_flops"], entry=entry, label=method,
                     source=source.label, out=str(Path(out).resolve()), trajectories=len(selection.indices),
                     selection=selection.label, calls=0 if isinstance(flops, FlopsSoFar) else 1, **more)
    return book
