"""The evaluation protocol: pick trajectories, forecast them with the model, run the baselines on the same
contexts, score everything on the same trajectories, and write metrics.json, per_trajectory.csv and the plots."""
from __future__ import annotations

import csv
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data.dataset import EvalExample, make_eval_example
from data.lotka_volterra import LVData, Split
from common.fileio import atomic_write, write_json_atomic

from .baselines import LVFit, estimate_period, lotka_volterra_forecast, persistence, seasonal_naive
from .config import BASELINES, DEFAULT_DECIMALS, ForecastConfig
from .forecast import Forecast, GenerationStats, forecast_examples
from .metrics import forecast_metrics, per_trajectory_errors
from .plots import plot_error_distribution, plot_error_vs_horizon, plot_trajectory

MODEL = "model"
PLOTTED_FROM_A_SPLIT = 3  # trajectories plotted one by one when a whole split is forecast


@dataclass(frozen=True)
class Protocol:
    """How forecasts are made and scored (metrics.json records it): a ForecastConfig's protocol settings, with the
    decimals of what is forecast. The defaults are ForecastConfig's."""
    context: int = ForecastConfig.context  # steps in the prompt
    horizon: int = ForecastConfig.horizon  # steps forecast and scored
    decimals: int = DEFAULT_DECIMALS  # LLMTIME decimals: those the model was trained with
    constrained: bool = ForecastConfig.constrained
    num_samples: int = ForecastConfig.num_samples
    temperature: float = ForecastConfig.temperature
    top_p: float | None = ForecastConfig.top_p
    seed: int = ForecastConfig.seed
    int_digits: int = ForecastConfig.int_digits
    allow_negative: bool = ForecastConfig.allow_negative

    @classmethod
    def of(cls, config: ForecastConfig, decimals: int) -> Protocol:
        """The protocol `config` asks for, at `decimals` (the run's, or the plain model's)."""
        return cls(config.context, config.horizon, decimals, config.constrained, config.num_samples,
                   config.temperature, config.top_p, config.seed, config.int_digits, config.allow_negative)

    def describe(self) -> str:
        how = "greedy decoding" if self.temperature <= 0 else (
            f"{self.num_samples} samples per trajectory at temperature {self.temperature:g}"
            f"{f', top-p {self.top_p:g}' if self.top_p is not None else ''} (median scored, 10-90 % band), "
            f"seed {self.seed}")
        grammar = (f"number grammar on (<= {self.int_digits} integer digits, "
                   f"{'signed' if self.allow_negative else 'non-negative'})" if self.constrained
                   else "number grammar off (unparseable forecasts counted, not scored)")
        return (f"context {self.context} steps -> horizon {self.horizon} steps; LLMTIME scaler fitted on the context "
                f"only; {self.decimals} decimals; {how}; {grammar}; metrics on original units, every method on the "
                f"same trajectories")


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
        }
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
             baselines=BASELINES, load_untrained=None, batch: int = 16, progress: bool = True, gqa: str = "real",
             on_flops=None, jump_forward: bool = False, compile: bool = False) -> Evaluation:
    """Forecast the selected trajectories with `model` and the chosen baselines under `protocol`.

    `load_untrained`: a callable returning the base model before training (the "untrained" baseline); None when
    `model` is itself untrained, and then that baseline is skipped with a note. `on_flops(method, flops)` is called
    after every generate call of a generated method ("model", "untrained") with its GenerationFlops (gqa: how
    attention is counted); `Evaluation.generation` holds each method's totals. `jump_forward`, `compile`: how the
    generated methods decode (`qwen_mini.generate`), the same tokens either way."""
    protocol = protocol or Protocol()
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    examples = [make_eval_example(data.trajectories[i], i, protocol.context, protocol.horizon, protocol.decimals)
                for i in selection.indices]
    generation = dict(decimals=protocol.decimals, batch=batch, constrained=protocol.constrained,
                      num_samples=protocol.num_samples, temperature=protocol.temperature, top_p=protocol.top_p,
                      seed=protocol.seed, int_digits=protocol.int_digits, allow_negative=protocol.allow_negative,
                      progress=progress, gqa=gqa, jump_forward=jump_forward, compile=compile)
    stats = GenerationStats()
    generated = {MODEL: stats}

    def counted(method: str) -> dict:
        """forecast_examples arguments that keep `method`'s statistics and report its FLOPs."""
        generated.setdefault(method, GenerationStats())
        report = (lambda flops: on_flops(method, flops)) if on_flops is not None else None
        return dict(stats=generated[method], label=method, on_flops=report)

    forecasts = {MODEL: forecast_examples(model, tokenizer, examples, **counted(MODEL), **generation)}
    notes = []
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
    metrics = {name: forecast_metrics(p[scored], targets[scored]) if scored.any() else None
               for name, p in predictions.items()}
    return Evaluation(protocol, selection, data, split, examples, forecasts, predictions, targets, scored, metrics,
                      stats, lv_fit, notes, generated, periods)


def write_outputs(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    """metrics.json, per_trajectory.csv and the PNG plots in `out_dir`; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()
    summary["non_finite"] = "NaN and infinite values are written as null"
    written = [write_json_atomic(out_dir / "metrics.json", json_safe(summary)),
               write_per_trajectory_csv(out_dir / "per_trajectory.csv", evaluation)]
    return written + write_plots(out_dir, evaluation)


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
    scored, each method's MSE and MAE per species, and the LV fit's parameters."""
    errors = {name: per_trajectory_errors(p, evaluation.targets) for name, p in evaluation.predictions.items()}
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


def write_plots(out_dir: Path, evaluation: Evaluation) -> list[Path]:
    written = []
    row_of = {ex.index: row for row, ex in enumerate(evaluation.examples)}
    banded = evaluation.protocol.num_samples > 1
    for index in evaluation.selection.plot_indices:
        row = row_of[index]
        ex = evaluation.examples[row]
        others = {name: p[row] for name, p in evaluation.predictions.items() if name != MODEL}
        band = evaluation.forecasts[MODEL][row].band() if banded else None
        title = (f"trajectory {index} ({evaluation.split.which(index)} split): context {len(ex.context)} steps, "
                 f"forecast {len(ex.target)}")
        written.append(plot_trajectory(out_dir / f"trajectory_{index}.png", evaluation.data.time, ex.context,
                                       ex.target, evaluation.predictions[MODEL][row], band, others, title))
    scored = {name: m for name, m in evaluation.metrics.items() if m is not None}
    if scored:
        written.append(plot_error_vs_horizon(out_dir / "error_vs_horizon.png", scored))
        mask = evaluation.scored
        errors = {name: per_trajectory_errors(p[mask], evaluation.targets[mask])
                  for name, p in evaluation.predictions.items()}
        written.append(plot_error_distribution(out_dir / "error_distribution.png", errors))
    return written


def format_table(summary: dict) -> str:
    """The printed report: protocol, what was forecast, generation speed, and one row per method."""
    lines = [f"protocol: {summary['protocol']}",
             f"data: {summary['data']}; forecast: {summary['selection']}",
             f"scored {summary['n_scored']} of {summary['n_trajectories']} trajectories; model parse failures "
             f"{summary['parse_failures']} ({100 * summary['parse_failure_rate']:.1f} % of samples); generation "
             f"{summary['generated_tokens']} tokens in {summary['generation_seconds']:.2f} s = "
             f"{summary['tokens_per_s']:.0f} tokens/s"]
    header = f"{'method':<12}" + "".join(f"{f'{species} {m}':>{w}}" for species in ("prey", "pred")
                                         for m, w in (("MSE", 11), ("MAE", 10), ("R2", 11), ("medMSE", 12)))
    lines += [header, "-" * len(header)]
    for name, m in summary["metrics"].items():
        if m is None:
            lines.append(f"{name:<12}  (no trajectory to score)")
            continue
        cells = "".join(f"{m[s]['mse']:>11.4g}{m[s]['mae']:>10.4g}{m[s]['r2']:>11.4g}"
                        f"{m[s]['median_trajectory_mse']:>12.4g}" for s in ("prey", "predator"))
        lines.append(f"{name:<12}{cells}")
    lines.append("medMSE: median over trajectories of each one's MSE; R2 over all scored values of the species")
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)
