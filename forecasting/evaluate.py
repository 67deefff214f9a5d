"""The evaluation protocol: pick trajectories, forecast them with the model, run the baselines on the same
contexts, score everything on the same trajectories, and write metrics.json, per_trajectory.csv, samples.npz and the
plots."""
from __future__ import annotations

import csv
import errno
import fnmatch
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from common.fileio import FileLock, LockHeld, StagedFiles, atomic_write, describe_holder, write_json_atomic
from data.dataset import EvalExample, make_eval_example
from data.llmtime import DEFAULT_SCALER, ZERO_LEVEL, Scaler, scaling_rule
from data.lotka_volterra import LVData, Split

from .baselines import LVFit, estimate_period, lotka_volterra_forecast, persistence, seasonal_naive
from .calibration import Calibration
from .config import AUTO, BASELINES, DEFAULT_DECIMALS, DEFAULT_MEMORY_GB, ForecastConfig
from .forecast import Forecast, GenerationStats, forecast_examples
from .metrics import per_trajectory_errors
from .plots import plot_error_distribution, plot_error_vs_horizon, plot_trajectory
from .scores import (
    COVERAGE_BANDS,
    REFERENCE,
    SAMPLES_FILE,
    UNCALIBRATED,
    MethodForecast,
    SavedForecasts,
    coverage_key,
    score_methods,
    trajectory_scores,
    write_samples,
)

MODEL = "model"
FORECAST_METRICS = "metrics.json"  # written last: a directory with it holds a finished forecast
FILES_KEY = "files"  # metrics.json's list of the forecast's files
OUTPUT_LOCK = ".forecast.lock"  # held by the forecast writing into a directory
# The names of the files a forecast writes (write_outputs): those of an earlier forecast that a new one does not
# write again are removed.
OUTPUT_PATTERNS = ("per_trajectory.csv", SAMPLES_FILE, "trajectory_*.png", "error_vs_horizon.png",
                   "error_distribution.png")


class OutputBusy(ValueError):
    """Another live forecast is writing into the output directory."""
PLOTTED_FROM_A_SPLIT = 3  # trajectories plotted one by one when a whole split is forecast
MIN_HISTOGRAM = 5  # scored trajectories below which error_distribution.png is not drawn
NAMED_SAMPLES = (972,)  # the trajectory the coursework reports discuss: plotted whenever it is forecast


@dataclass(frozen=True)
class Protocol:
    """How forecasts are made and scored (metrics.json records it): a ForecastConfig's protocol settings, with the
    decimals of what is forecast. The defaults are ForecastConfig's."""
    context: int = ForecastConfig.context  # steps in the prompt
    horizon: int = ForecastConfig.horizon  # steps forecast and scored
    decimals: int = DEFAULT_DECIMALS  # LLMTIME decimals: those the model was trained with
    constrained: bool = ForecastConfig.constrained
    num_samples: int = ForecastConfig.num_samples
    temperature: float | str = ForecastConfig.temperature  # "auto" until the validation forecasts choose one
    top_p: float | None = ForecastConfig.top_p
    seed: int = ForecastConfig.seed
    int_digits: int = ForecastConfig.int_digits
    allow_negative: bool = ForecastConfig.allow_negative
    scaler: str | None = None  # the LLMTIME scaling rule; None: the forecast source's (a run's own, else p95)
    temperature_grid: tuple[float, ...] = ForecastConfig.temperature_grid  # what temperature "auto" tries
    calibrate: bool = ForecastConfig.calibrate
    val_limit: int | None = None  # validation trajectories of "auto" / calibrate (None: the whole split)
    tuned: bool = False  # the temperature was chosen on the validation split (from temperature_grid)

    @classmethod
    def of(cls, config: ForecastConfig, decimals: int, scaler: str | None = None) -> Protocol:
        """The protocol `config` asks for, at `decimals` (the run's, or the plain model's), with `config`'s scaler,
        else `scaler` (the run's), else the source's when the forecast runs (`for_source`)."""
        return cls(config.context, config.horizon, decimals, config.constrained, config.num_samples,
                   config.temperature, config.top_p, config.seed, config.int_digits, config.allow_negative,
                   config.scaler or scaler, config.temperature_grid, config.calibrate,
                   config.val_limit if config.val_limit is not None else config.limit)

    def for_source(self, scaler: str | None) -> Protocol:
        """This protocol with the source's scaler (a run's own) where it names none, else the default."""
        return self if self.scaler is not None else replace(self, scaler=scaler or DEFAULT_SCALER)

    @property
    def auto_temperature(self) -> bool:
        return self.temperature == AUTO

    @property
    def validated(self) -> bool:
        """The validation split is forecast first (temperature "auto", or calibrate)."""
        return self.auto_temperature or self.calibrate

    def describe(self) -> str:
        if self.auto_temperature:
            how = (f"{self.num_samples} sample(s) per trajectory at the temperature of "
                   f"{', '.join(f'{t:g}' for t in self.temperature_grid)} with the lowest validation CRPS")
        elif self.temperature <= 0:
            how = "greedy decoding"
        else:
            chosen = (f" (chosen on the validation split from {', '.join(f'{t:g}' for t in self.temperature_grid)}, "
                      "by CRPS)" if self.tuned else "")
            how = (f"{self.num_samples} samples per trajectory at temperature {self.temperature:g}{chosen}"
                   f"{f', top-p {self.top_p:g}' if self.top_p is not None else ''} (median scored, 10-90 % band), "
                   f"seed {self.seed}")
        if self.calibrate:
            how += "; bands calibrated on the validation split (conformal, forecasting.calibration)"
        grammar = (f"number grammar on (<= {self.int_digits} integer digits, "
                   f"{'signed' if self.allow_negative else 'non-negative'})" if self.constrained
                   else "number grammar off (unparseable forecasts counted, not scored)")
        rule = scaling_rule(self.scaler or DEFAULT_SCALER)
        return (f"context {self.context} steps -> horizon {self.horizon} steps; LLMTIME scaler fitted on the context "
                f"only: {rule.name} ({rule.describe()}); {self.decimals} decimals; {how}; {grammar}; metrics on "
                "original units, every method on the same trajectories")


@dataclass
class Selection:
    indices: list[int]  # trajectory indices in the data file, in forecast order
    label: str  # what was asked for, for the report
    plot_indices: list[int]  # trajectories that get their own plot


def select_trajectories(split: Split, split_name: str = ForecastConfig.split, samples: list[int] | None = None,
                        limit: int | None = None) -> Selection:
    """The trajectories of `split_name` (the first `limit` of them), or the `samples` (indices in the data file,
    whatever their split; each one's split is reported, and a training-split one is warned about)."""
    if samples:
        if limit is not None:
            raise ValueError("--limit selects from a split; it cannot be combined with --sample")
        bad = [i for i in samples if not 0 <= i < split.n]
        if bad:
            raise ValueError(f"trajectory index {bad[0]} is out of range: the data has {split.n} trajectories "
                             f"(indices 0..{split.n - 1})")
        for i in samples:
            where = split.which(i)
            print(f"trajectory {i} is in the {where} split", file=sys.stderr)
            if where == "train":
                print(f"warning: trajectory {i} is in the training split: the model has seen it, so its forecast "
                      f"is not a held-out result", file=sys.stderr)
        memberships = ", ".join(f"{i} ({split.which(i)})" for i in samples)
        return Selection(list(samples), f"trajectories {memberships}", list(dict.fromkeys(samples)))
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    indices = split[split_name].tolist()[:limit]
    if not indices:
        raise ValueError(f"the {split_name} split is empty ({split.n} trajectories in all)")
    of = f"first {len(indices)} of " if limit is not None and limit < len(split[split_name]) else ""
    return Selection(indices, f"{of}{split_name} split ({len(indices)} trajectories)",
                     indices[:PLOTTED_FROM_A_SPLIT])


@dataclass
class Evaluation:
    protocol: Protocol
    selection: Selection
    data: LVData
    split: Split
    examples: list[EvalExample]
    forecasts: dict[str, list[Forecast]]  # generated methods (the model, the untrained model): their samples
    predictions: dict[str, np.ndarray]  # every method: (N, horizon, V) point forecasts, NaN where unparseable
    targets: np.ndarray  # (N, horizon, V)
    scored: np.ndarray  # (N,) bool: every method has a complete forecast (all of them, with the grammar)
    metrics: dict[str, dict | None]  # per method, over the scored trajectories (None: none scored)
    stats: GenerationStats  # the model's generation
    lv_fit: LVFit | None = None
    notes: list[str] = field(default_factory=list)
    generation: dict[str, GenerationStats] = field(default_factory=dict)  # per generated method, FLOPs included
    periods: list[int | None] | None = None  # seasonal_naive's period per trajectory (None: none found)
    forecaster: dict = field(default_factory=dict)  # {"model": spec, "run": run dir or None}: who forecast
    calibrated: dict[str, tuple[np.ndarray, tuple[float, ...]]] = field(default_factory=dict)  # method -> quantiles
    validation: dict | None = None  # what the validation forecasts chose (forecasting.tuning): metrics.json's

    def method_forecasts(self) -> dict[str, MethodForecast]:
        return method_forecasts(self.forecasts, self.predictions, self.calibrated)

    def saved_forecasts(self) -> SavedForecasts:
        """Every method's forecasts with what they are scored on: samples.npz's content."""
        return SavedForecasts(np.array([ex.index for ex in self.examples]), contexts_of(self.examples), self.targets,
                              self.scored, self.method_forecasts())

    def summary(self) -> dict:
        """Everything metrics.json records."""
        model_forecasts = self.forecasts[MODEL]
        samples = len(model_forecasts) * self.protocol.num_samples
        failures = {name: sum(f.parse_failures for f in fcs) for name, fcs in self.forecasts.items()}
        summary = {
            "protocol": self.protocol.describe(),
            "protocol_settings": asdict(self.protocol),
            "selection": self.selection.label,
            "trajectories": self.selection.indices,
            "data": self.data.path,
            "split": {"mode": self.split.mode, "seed": self.split.seed, "fractions": list(self.split.fractions),
                      "n": self.split.n},
            "n_trajectories": len(self.examples),
            "n_scored": int(self.scored.sum()),
            "parse_failures": failures[MODEL],
            "parse_failure_rate": failures[MODEL] / samples if samples else 0.0,
            "parse_failures_by_method": failures,
            "generated_tokens": self.stats.new_tokens,
            "generation_seconds": self.stats.seconds,
            "tokens_per_s": self.stats.tokens_per_s,
            "flops": {name: {"prefill": s.prefill_flops, "decode": s.decode_flops, "total": s.flops,
                             "prefill_tokens": s.prefill_tokens, "decode_tokens": s.decode_tokens, "calls": s.calls}
                      for name, s in self.generation.items()},
            "metrics": self.metrics,
            "notes": self.notes,
            "forecaster": self.forecaster,
            "scaler": self.protocol.scaler or DEFAULT_SCALER,
        }
        if self.validation is not None:
            summary["validation"] = self.validation
        if self.lv_fit is not None:
            fit, n = self.lv_fit, len(self.lv_fit.loss)
            summary["lv_fit"] = {"median_context_mse_scaled": float(np.median(fit.loss)),
                                 "iterations": fit.iterations,
                                 "logistic_chosen": int(fit.logistic.sum()),
                                 "fallbacks_to_persistence": int(fit.fallback.sum()),
                                 "fallback_rate": float(fit.fallback.sum() / n) if n else 0.0}
        if self.periods is not None:
            found = [p for p in self.periods if p]
            summary["seasonal_naive"] = {"median_period_steps": float(np.median(found)) if found else None,
                                         "no_period_found": len(self.periods) - len(found)}
        return summary


def evaluate(model, tokenizer, data: LVData, split: Split, selection: Selection, protocol: Protocol | None = None, *,
             baselines=BASELINES, load_untrained=None, batch: int | None = None,
             memory_gb: float = DEFAULT_MEMORY_GB, progress: bool = True, gqa: str = "real", on_flops=None,
             jump_forward: bool = False, compile: bool = False, calibration: Calibration | None = None,
             label: str = "") -> Evaluation:
    """Forecast the selected trajectories with `model` and the chosen baselines under `protocol`.

    `load_untrained`: a callable returning the base model before training (the "untrained" baseline); None when
    `model` is itself untrained, and then that baseline is skipped with a note. `on_flops(method, flops)` is called
    after every generate call of a generated method ("model", "untrained") with its GenerationFlops (gqa: how
    attention is counted); `Evaluation.generation` holds each method's totals. `jump_forward`, `compile`: how the
    generated methods decode (`qwen_mini.generate`), the same tokens either way; `batch` (None: as many as
    `memory_gb` holds) their rows per generate call. `calibration` (from a validation forecast, forecasting.tuning):
    the model's reported quantiles, WQL and coverage are its calibrated bands'. `label` prefixes the progress bars'
    names (a validation forecast's)."""
    protocol = protocol or Protocol()
    if protocol.auto_temperature:
        raise ValueError("evaluate needs a temperature: \"auto\" is chosen first (forecasting.tuning)")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    examples = [make_eval_example(data.trajectories[i], i, protocol.context, protocol.horizon, protocol.decimals,
                                  protocol.scaler or DEFAULT_SCALER) for i in selection.indices]
    generation = dict(decimals=protocol.decimals, batch=batch, memory_gb=memory_gb, constrained=protocol.constrained,
                      num_samples=protocol.num_samples, temperature=protocol.temperature, top_p=protocol.top_p,
                      seed=protocol.seed, int_digits=protocol.int_digits, allow_negative=protocol.allow_negative,
                      progress=progress, gqa=gqa, jump_forward=jump_forward, compile=compile)
    notes = zero_level_notes(examples)
    stats = GenerationStats()
    generated = {MODEL: stats}

    def counted(method: str) -> dict:
        """forecast_examples arguments that keep `method`'s statistics and report its FLOPs."""
        generated.setdefault(method, GenerationStats())
        report = (lambda flops: on_flops(method, flops)) if on_flops is not None else None
        return dict(stats=generated[method], label=f"{label}{method}", on_flops=report)

    forecasts = {MODEL: forecast_examples(model, tokenizer, examples, **counted(MODEL), **generation)}
    if "untrained" in baselines:
        if load_untrained is None:
            notes.append("untrained baseline skipped: --model forecasts with a model as it is, and there is no run "
                         "to take a base model from")
        else:
            untrained = load_untrained()
            forecasts["untrained"] = forecast_examples(untrained, tokenizer, examples, **counted("untrained"),
                                                       **generation)
            del untrained
    predictions = {name: np.stack([f.median for f in fcs]) for name, fcs in forecasts.items()}
    if "persistence" in baselines:
        predictions["persistence"] = np.stack([persistence(ex.context, protocol.horizon) for ex in examples])
    periods = None
    if "seasonal_naive" in baselines:
        periods = [estimate_period(ex.context) for ex in examples]
        predictions["seasonal_naive"] = np.stack([seasonal_naive(ex.context, protocol.horizon, period or 1)
                                                  for ex, period in zip(examples, periods)])
    lv_fit = None
    if "lv_fit" in baselines:  # the data schema guarantees two variables: prey and predator
        predictions["lv_fit"], lv_fit = lotka_volterra_forecast(np.stack([ex.context for ex in examples]),
                                                                data.time, protocol.horizon)
    if lv_fit is not None and lv_fit.fallback.any():
        notes.append(f"lv_fit: {int(lv_fit.fallback.sum())} of {len(examples)} forecasts left the bounded range (a "
                     f"runaway orbit) and are persistence instead")
    predictions = {name: predictions[name] for name in (MODEL, *BASELINES) if name in predictions}  # table order
    targets = np.stack([ex.target for ex in examples])
    # The generated methods may fail to parse (without the grammar); all methods are scored on the trajectories
    # that every generated method forecast in full, so each row of the table covers the same trajectories.
    scored = np.all([~np.isnan(predictions[name]).any(axis=(1, 2)) for name in forecasts], axis=0)
    calibrated = {}
    if calibration is not None:
        calibrated[MODEL] = (calibration.apply(np.stack([f.samples for f in forecasts[MODEL]]), contexts_of(examples)),
                             calibration.levels)
        if "untrained" in forecasts:
            notes.append("calibrated bands: the model's only; the untrained baseline's are its samples' own")
    metrics = score_methods(method_forecasts(forecasts, predictions, calibrated), targets, contexts_of(examples),
                            scored)
    if REFERENCE not in predictions:
        notes.append(f"no *_gmean_relative scores: they are relative to {REFERENCE}, which was not run")
    return Evaluation(protocol, selection, data, split, examples, forecasts, predictions, targets, scored, metrics,
                      stats, lv_fit, notes, generated, periods, calibrated=calibrated)


def zero_level_notes(examples: list[EvalExample]) -> list[str]:
    """A note when some contexts hold a variable too small for the LLMTIME scaler (`Scaler.below_zero_level`): its
    prompt shows only zeros, whatever the model then forecasts."""
    tiny = [ex.index for ex in examples if Scaler.below_zero_level(ex.context).any()]
    if not tiny:
        return []
    return [f"{len(tiny)} of {len(examples)} trajectories (e.g. {', '.join(map(str, tiny[:3]))}) have a variable "
            f"whose context is not all zero but at most {ZERO_LEVEL:g} in size: the LLMTIME scaler treats it as zero, "
            "so the prompt shows it as zeros (scale the data up to forecast it)"]


def contexts_of(examples: list[EvalExample]) -> np.ndarray:
    """(N, context, V): the examples' contexts in original units (MASE's scale)."""
    return np.stack([ex.context for ex in examples])


def method_forecasts(forecasts: dict[str, list[Forecast]], predictions: dict[str, np.ndarray],
                     calibrated: dict[str, tuple[np.ndarray, tuple[float, ...]]] | None = None
                     ) -> dict[str, MethodForecast]:
    """Every method's point forecast (table order), with the samples of the generated ones and the calibrated
    quantiles (and their levels) of a calibrated one."""
    calibrated = calibrated or {}
    return {name: MethodForecast(p, np.stack([f.samples for f in forecasts[name]]) if name in forecasts else None,
                                 *calibrated.get(name, (None, ())))
            for name, p in predictions.items()}


def write_outputs(evaluation: Evaluation, out_dir: Path, signals=None) -> list[Path]:
    """metrics.json, per_trajectory.csv, samples.npz and the PNG plots in `out_dir`; returns the files written.

    metrics.json marks a forecast done (a study plan skips a stage that has it), so the files are written into a
    staging directory and moved in together, metrics.json last: a stop or a failed write (a full disk) leaves the
    directory as it was, never a metrics.json without its siblings. metrics.json lists the files (`files`); those
    of an earlier forecast in `out_dir` that this one does not write (another trajectory's plot) are removed.
    `signals` (a StopSignals): a signal during the moves (milliseconds) waits in `signals.signum` until they end."""
    out_dir = Path(out_dir)
    with StagedFiles(out_dir) as staged:
        siblings = [write_per_trajectory_csv(staged.dir / "per_trajectory.csv", evaluation),
                    write_samples(staged.dir / SAMPLES_FILE, evaluation.saved_forecasts()),
                    *write_plots(staged.dir, evaluation)]
        summary = evaluation.summary()
        summary["non_finite"] = "NaN and infinite values are written as null"
        summary[FILES_KEY] = sorted([p.name for p in siblings] + [FORECAST_METRICS])
        write_json_atomic(staged.dir / FORECAST_METRICS, json_safe(summary))
        waiting = signals is not None and not signals.deferring
        if waiting:
            signals.deferring = True
        try:
            return staged.publish(FORECAST_METRICS, stale=earlier_outputs(out_dir))
        finally:
            if waiting:
                signals.deferring = False


def lock_output(out_dir: Path, what: str) -> FileLock:
    """The lock of a forecast's output directory, held until its files are written: a second forecast into the same
    directory is refused (OutputBusy, naming the first) instead of mixing its files with the first one's."""
    try:
        return FileLock(Path(out_dir) / OUTPUT_LOCK, what=what)
    except LockHeld as e:
        raise OutputBusy(f"{out_dir} is being written by another forecast ({describe_holder(e.holder)}): wait for "
                         "it, or pass another --out") from None


def check_output_names(out_dir: Path) -> None:
    """Refuse (IsADirectoryError naming it) a directory or other non-file in `out_dir` under the name of a file the
    forecast writes: it would stop the writing after every forecast was computed."""
    for name in (FORECAST_METRICS, *(p for p in OUTPUT_PATTERNS if "*" not in p)):
        path = out_dir / name
        if path.exists() and not path.is_file():
            raise IsADirectoryError(errno.EISDIR, "not a regular file, where the forecast writes its file of that name",
                                    str(path))


def earlier_outputs(out_dir: Path) -> set[str]:
    """The files an earlier forecast wrote into `out_dir`: those its metrics.json lists, and its trajectory plots
    (the names that change from one forecast to the next). The list is data, not trusted: only names of the kinds
    a forecast writes (OUTPUT_PATTERNS) count, so a hand-edited list never removes a run's files or the user's."""
    names = {p.name for p in out_dir.glob("trajectory_*.png")}
    try:
        listed = json.loads((out_dir / FORECAST_METRICS).read_text()).get(FILES_KEY, [])
    except (OSError, ValueError, AttributeError):  # none, unreadable, or not a dict: only the plots are known
        listed = []
    names |= {n for n in listed if isinstance(n, str)} if isinstance(listed, list) else set()
    return {n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in OUTPUT_PATTERNS)}


def json_safe(value):
    """Replace NaN and infinities (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_per_trajectory_csv(path: Path, evaluation: Evaluation) -> Path:
    """One row per forecast trajectory: its index and split, whether the model's samples parsed, whether it was
    scored, each method's MSE, MAE, CRPS, WQL and MASE per species, and the LV fit's parameters."""
    contexts = contexts_of(evaluation.examples)
    errors = {name: {**per_trajectory_errors(f.point, evaluation.targets),
                     **trajectory_scores(f, evaluation.targets, contexts)}
              for name, f in evaluation.method_forecasts().items()}
    columns = [f"{name}_{metric}" for name, e in errors.items() for metric in e]
    lv = evaluation.lv_fit
    lv_columns = ["lv_alpha", "lv_beta", "lv_gamma", "lv_delta", "lv_inv_capacity", "lv_x0", "lv_y0",
                  "lv_context_mse", "lv_variant", "lv_fallback"] if lv else []
    periods = evaluation.periods
    period_columns = ["seasonal_period"] if periods is not None else []
    variants = lv.variant if lv else None  # one list, not one per row

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "split", "model_samples_parsed", "scored", *columns, *lv_columns,
                             *period_columns])
            for row, (ex, fc) in enumerate(zip(evaluation.examples, evaluation.forecasts[MODEL])):
                values = [errors[name][metric][row] for name, e in errors.items() for metric in e]
                lv_values = [*lv.params[row], lv.inv_capacity[row], *lv.state0[row], lv.loss[row]] if lv else []
                lv_labels = [variants[row], bool(lv.fallback[row])] if lv else []
                period = [periods[row] or ""] if periods is not None else []
                writer.writerow([ex.index, evaluation.split.which(ex.index),
                                 f"{len(fc.samples) - fc.parse_failures}/{len(fc.samples)}",
                                 bool(evaluation.scored[row]), *(f"{v:.6g}" for v in values + lv_values),
                                 *lv_labels, *period])

    return atomic_write(path, write)


def ranked_trajectories(indices: list[int], errors: dict[str, np.ndarray], scored) -> dict[str, int]:
    """{"best", "median", "worst"}: the scored trajectories of lowest, median and highest model MSE (the mean of the
    species' MSE over the horizon; a non-finite one is the worst); {} when none was scored. `errors` are
    per_trajectory_errors' columns ({"prey_mse": array, ...}). The forecast plots these and the report shows them."""
    mse = np.mean([np.asarray(v, float) for k, v in errors.items() if k.endswith("_mse")], axis=0)
    rows = [r for r in range(len(indices)) if scored[r]]
    if not rows:
        return {}
    order = sorted(rows, key=lambda r: (not np.isfinite(mse[r]), mse[r] if np.isfinite(mse[r]) else 0.0, r))
    return {"best": indices[order[0]], "median": indices[order[(len(order) - 1) // 2]], "worst": indices[order[-1]]}


def write_plots(out_dir: Path, evaluation: Evaluation) -> list[Path]:
    written = []
    row_of = {ex.index: row for row, ex in enumerate(evaluation.examples)}
    banded = evaluation.protocol.num_samples > 1
    ranked = ranked_trajectories([ex.index for ex in evaluation.examples],
                                 per_trajectory_errors(evaluation.predictions[MODEL], evaluation.targets),
                                 evaluation.scored)
    named = [i for i in NAMED_SAMPLES if i in row_of]
    label = forecaster_label(evaluation.forecaster)
    for index in dict.fromkeys([*evaluation.selection.plot_indices, *named, *ranked.values()]):
        row = row_of[index]
        ex = evaluation.examples[row]
        others = {name: p[row] for name, p in evaluation.predictions.items() if name != MODEL}
        band = model_band(evaluation, row) if banded else None
        title = (f"trajectory {index} ({evaluation.split.which(index)} split): context {len(ex.context)} steps, "
                 f"forecast {len(ex.target)}")
        written.append(plot_trajectory(out_dir / f"trajectory_{index}.png", evaluation.data.time, ex.context,
                                       ex.target, evaluation.predictions[MODEL][row], band, others, title,
                                       model_label=label))
    scored = {name: m for name, m in evaluation.metrics.items() if m is not None}
    if scored:
        written.append(plot_error_vs_horizon(out_dir / "error_vs_horizon.png", scored, model_label=label))
        mask = evaluation.scored
        if mask.sum() >= MIN_HISTOGRAM:  # a histogram of one or two trajectories shows nothing
            errors = {name: per_trajectory_errors(p[mask], evaluation.targets[mask])
                      for name, p in evaluation.predictions.items()}
            written.append(plot_error_distribution(out_dir / "error_distribution.png", errors, model_label=label))
    return written


def model_band(evaluation: Evaluation, row: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's 80 % band of trajectory `row` as the forecast reports it: its calibrated 0.1 and 0.9 quantiles,
    else its samples' 10-90 %."""
    if MODEL in evaluation.calibrated:
        quantiles, levels = evaluation.calibrated[MODEL]
        return quantiles[levels.index(0.1), row], quantiles[levels.index(0.9), row]
    return evaluation.forecasts[MODEL][row].band()


def forecaster_label(forecaster: dict) -> str | None:
    """What the plots call the forecast's model: "fine-tuned" for a trained run's, "zero-shot" for a plain model's
    (forecast.py --model: the model as given, untouched here); None when the forecaster is unknown."""
    if not forecaster:
        return None
    return "fine-tuned" if forecaster.get("run") else "zero-shot"


def format_table(summary: dict) -> str:
    """The printed report: protocol, what was forecast, generation speed, and one row per method."""
    lines = [f"protocol: {summary['protocol']}",
             f"data: {summary['data']}; forecast: {summary['selection']}",
             f"scored {summary['n_scored']} of {summary['n_trajectories']} trajectories; model parse failures "
             f"{summary['parse_failures']} ({100 * summary['parse_failure_rate']:.1f} % of samples); generation "
             f"{summary['generated_tokens']} tokens in {summary['generation_seconds']:.2f} s = "
             f"{summary['tokens_per_s']:.0f} tokens/s"]
    lines += method_rows(summary["metrics"])
    lines.append("medMSE: median over trajectories of each one's MSE; R2 over all scored values of the species")
    lines += probabilistic_table(summary["metrics"])
    lines += band_table(summary["metrics"])
    lines += validation_lines(summary.get("validation"))
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


def band_table(metrics: dict[str, dict | None], names: dict[str, str] | None = None) -> list[str]:
    """format_table's central bands: per sampled method and species, the share of targets inside the 50, 80 and
    95 % bands and the WQL, a calibrated method's samples' own (uncalibrated) beside them. `names`: the methods to
    show, in order, and what to call them (metrics.json key -> name; default: every sampled method by its key)."""
    names = names if names is not None else {key: key for key in metrics}
    rows = {names[key]: metrics[key] for key in names if metrics.get(key)
            and coverage_key(0.8) in (metrics[key].get("prey") or {})}
    if not rows:
        return []
    calibrated = any(f"wql{UNCALIBRATED}" in (m.get("prey") or {}) for m in rows.values())
    keys = [coverage_key(b) for b in COVERAGE_BANDS] + ["wql"]
    labels = [f"cov{round(100 * b)}" for b in COVERAGE_BANDS] + ["WQL"]
    width = max([15] + [len(name) + 1 for name in rows])
    header = f"{'central bands':<{width}}{'species':<9}" + "".join(f"{label:>8}" for label in labels)
    if calibrated:
        header += "  | uncalibrated" + "".join(f"{label:>8}" for label in labels)
    lines = ["", header, "-" * len(header)]

    def cells(values: dict, suffix: str = "") -> str:
        return "".join(f"{values[k + suffix]:>8.3g}" if values.get(k + suffix) is not None else f"{'-':>8}"
                       for k in keys)

    for name, m in rows.items():
        for species in ("prey", "predator"):
            row = cells(m[species]) + ("  | " + " " * len("uncalibrated") + cells(m[species], UNCALIBRATED)
                                       if calibrated else "")
            lines.append(f"{name if species == 'prey' else '':<{width}}{species:<9}{row}")
    lines.append("covN: share of targets inside the central N % band (the quantiles 0.5 -/+ N/200)"
                 + ("; calibrated on the validation split where the uncalibrated ones are beside them"
                    if calibrated else ""))
    return lines


def validation_lines(validation: dict | None) -> list[str]:
    """format_table's lines on the validation forecasts: the temperature chosen (each candidate's score) and the
    calibration."""
    if not validation:
        return []
    lines = [""]
    candidates = ", ".join(
        f"{c['temperature']:g}: {c['score']:.4g}" if c.get("score") is not None else f"{c['temperature']:g}: -"
        for c in validation["candidates"])
    where = f"on the validation split ({validation['selection']})"
    if validation.get("temperature_chosen"):
        lines.append(f"temperature {validation['temperature']:g} chosen {where} by {validation['criterion']}: "
                     f"{candidates}")
    else:
        lines.append(f"validation forecast {where} at temperature {validation['temperature']:g}: "
                     f"{validation['criterion']} {candidates}")
    calibration = validation.get("calibration")
    if calibration:
        capped = ", ".join(f"{round(100 * b)} %" for b in calibration.get("capped_bands") or [])
        lines.append(f"bands calibrated on {calibration['n_trajectories']} validation trajectories: "
                     f"{calibration['method']}" + (f"; too few of them for a finite correction of the {capped} "
                                                   "band(s): the largest score was used (coverage not guaranteed)"
                                                   if capped else ""))
    return lines


def method_rows(metrics: dict[str, dict | None], names: dict[str, str] | None = None) -> list[str]:
    """format_table's point-metric block: a header and one row per method (MSE, MAE, R2, median trajectory MSE per
    species). `names`: the rows to show, in order, and what to call them (metrics.json key -> name; default: every
    method under its key, in a 12-character column); a method that is missing is left out."""
    width = 12 if names is None else max([12] + [len(name) + 1 for key, name in names.items() if key in metrics])
    names = names if names is not None else {key: key for key in metrics}
    header = f"{'method':<{width}}" + "".join(f"{f'{species} {m}':>{w}}" for species in ("prey", "pred")
                                              for m, w in (("MSE", 11), ("MAE", 10), ("R2", 11), ("medMSE", 12)))
    lines = [header, "-" * len(header)]
    for key, name in names.items():
        if key not in metrics:
            continue
        m = metrics[key]
        if m is None:
            lines.append(f"{name:<{width}}  (no trajectory to score)")
            continue
        cells = "".join(f"{m[s]['mse']:>11.4g}{m[s]['mae']:>10.4g}{m[s]['r2']:>11.4g}"
                        f"{m[s]['median_trajectory_mse']:>12.4g}" for s in ("prey", "predator"))
        lines.append(f"{name:<{width}}{cells}")
    return lines


PROBABILISTIC_COLUMNS = (("CRPS", "crps"), ("WQL", "wql"), ("cov80", "coverage_80"), ("MASE", "mase"),
                         ("WQL/SN", "wql_gmean_relative"), ("MASE/SN", "mase_gmean_relative"))


def probabilistic_table(metrics: dict[str, dict | None]) -> list[str]:
    """format_table's second block, a row per method and species: CRPS, WQL, the 80 % interval's coverage, MASE
    and the geometric means relative to seasonal naive ("-" where a score does not apply, as metrics.json's
    "probabilistic" line of that method says); nothing when no trajectory was scored."""
    if all(m is None for m in metrics.values()):
        return []
    header = f"{'method':<15}{'species':<9}" + "".join(f"{label:>10}" for label, _ in PROBABILISTIC_COLUMNS)
    lines = ["", header, "-" * len(header)]
    for name, m in metrics.items():
        if m is None:
            lines.append(f"{name:<15}(no trajectory to score)")
            continue
        for species in ("prey", "predator"):
            cells = "".join(f"{m[species][key]:>10.4g}" if m[species].get(key) is not None else f"{'-':>10}"
                            for _, key in PROBABILISTIC_COLUMNS)
            lines.append(f"{name if species == 'prey' else '':<15}{species:<9}{cells}")
    lines += ["CRPS from the samples (of a point forecast or one sample: its MAE); WQL over the quantiles 0.1..0.9 "
              "(a point: every quantile);",
              "cov80: share of targets inside the samples' 10-90 % quantiles; MASE: MAE / the context's one-step "
              "naive MAE;",
              f"/SN: geometric mean over trajectories of the score / {REFERENCE}'s (point forecasts: both are their "
              f"MAE ratio)"]
    return lines
