"""The evaluation protocol: pick trajectories, forecast them, run the baselines, score, write and plot."""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.dataset import make_eval_example
from data.lotka_volterra import Split, load_or_simulate, split_indices
from qwen_mini.fileio import write_json_atomic

from .baselines import lotka_volterra_forecast, persistence
from .forecast import GenerationStats, forecast_examples
from .metrics import forecast_metrics, per_trajectory_errors
from .plots import plot_error_distribution, plot_error_vs_horizon, plot_trajectory

BASELINES = ("persistence", "untrained", "lv_fit")


@dataclass
class Protocol:
    context: int = 50
    horizon: int = 50
    decimals: int = 2
    constrained: bool = True
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0

    def describe(self) -> str:
        how = "greedy" if self.temperature <= 0 else \
            f"{self.num_samples} samples, temperature {self.temperature}, top-p {self.top_p} (median scored)"
        return (f"context {self.context} steps -> horizon {self.horizon} steps; scaler fitted on the context only; "
                f"{self.decimals} decimals; {how}; grammar constraint {'on' if self.constrained else 'off'}; "
                f"metrics on original units")


@dataclass
class Selection:
    indices: list[int]
    split: Split
    label: str  # what was asked for, for the report
    plot_indices: list[int] = field(default_factory=list)


def select_trajectories(n: int, split: Split, split_name: str, samples: list[int] | None, limit: int | None
                        ) -> Selection:
    if samples:
        bad = [i for i in samples if not 0 <= i < n]
        if bad:
            raise ValueError(f"trajectory index {bad[0]} is out of range: the data has {n} trajectories (0..{n - 1})")
        for i in samples:
            where = split.which(i)
            if where == "train":
                print(f"warning: trajectory {i} is in the training split; its forecast is not a held-out result",
                      file=sys.stderr)
        return Selection(list(samples), split, f"trajectories {samples}", plot_indices=list(samples))
    indices = split[split_name].tolist()[:limit] if limit else split[split_name].tolist()
    return Selection(indices, split, f"{split_name} split ({len(indices)} trajectories)", plot_indices=indices[:3])


def evaluate(model, tokenizer, *, data_path: str | None, split: Split | None, split_name: str = "test",
             samples: list[int] | None = None, limit: int | None = None, protocol: Protocol = Protocol(),
             baselines=BASELINES, untrained_model=None, out_dir: Path, batch: int = 16, progress: bool = True,
             label: str = "model") -> dict:
    data = load_or_simulate(data_path)
    split = split if split is not None else split_indices(len(data), seed=0)
    if split.n != len(data):
        raise ValueError(f"the run's split covers {split.n} trajectories but {data.path} has {len(data)}: "
                         f"pass the run's --data")
    selection = select_trajectories(len(data), split, split_name, samples, limit)
    examples = [make_eval_example(data.trajectories[i], i, protocol.context, protocol.horizon, protocol.decimals)
                for i in selection.indices]
    gen_kwargs = dict(decimals=protocol.decimals, batch=batch, constrained=protocol.constrained,
                      num_samples=protocol.num_samples, temperature=protocol.temperature, top_p=protocol.top_p,
                      seed=protocol.seed, progress=progress)
    stats = GenerationStats()
    forecasts = forecast_examples(model, tokenizer, examples, stats=stats, **gen_kwargs)
    predictions = {label: np.stack([f.median for f in forecasts])}
    bands = [f.band() if protocol.num_samples > 1 else None for f in forecasts]
    if "persistence" in baselines:
        predictions["persistence"] = np.stack([persistence(ex.context, protocol.horizon) for ex in examples])
    if "untrained" in baselines and untrained_model is not None:
        untrained = forecast_examples(untrained_model, tokenizer, examples, **gen_kwargs)
        predictions["untrained"] = np.stack([f.median for f in untrained])
    if "lv_fit" in baselines:
        contexts = np.stack([ex.context for ex in examples])
        predictions["lv_fit"], _ = lotka_volterra_forecast(contexts, data.time, protocol.horizon)
    targets = np.stack([ex.target for ex in examples])

    # Every method is scored on the trajectories that every method forecast in full (with the constraint: all).
    complete = np.all([np.isfinite(p).all(axis=(1, 2)) for p in predictions.values()], axis=0)
    parse_failures = sum(not r.ok for f in forecasts for r in f.reports)
    metrics = {name: forecast_metrics(p[complete], targets[complete]) if complete.any() else None
               for name, p in predictions.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "protocol": protocol.describe(), "protocol_settings": protocol.__dict__, "selection": selection.label,
        "data": data.path, "n_trajectories": len(examples), "n_scored": int(complete.sum()),
        "parse_failures": parse_failures, "parse_failure_rate": parse_failures / max(1, len(examples) * protocol.num_samples),
        "generated_tokens": stats.new_tokens, "generation_seconds": stats.seconds,
        "tokens_per_s": stats.tokens_per_s, "metrics": metrics,
    }
    write_json_atomic(out_dir / "metrics.json", result)
    write_per_trajectory_csv(out_dir / "per_trajectory.csv", examples, predictions, targets, forecasts, split)
    write_plots(out_dir, data.time, examples, predictions, bands, metrics, targets, complete, selection, label)
    return result


def write_per_trajectory_csv(path, examples, predictions, targets, forecasts, split: Split) -> None:
    errors = {name: per_trajectory_errors(p, targets) for name, p in predictions.items()}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "split", "parsed_ok", *[f"{n}_{m}" for n in predictions for m in ("mse", "mae")]])
        for row, (ex, fc) in enumerate(zip(examples, forecasts)):
            writer.writerow([ex.index, split.which(ex.index), all(r.ok for r in fc.reports),
                             *[f"{errors[n][m][row]:.6g}" for n in predictions for m in ("mse", "mae")]])


def write_plots(out_dir, time, examples, predictions, bands, metrics, targets, complete, selection, label) -> None:
    by_index = {ex.index: row for row, ex in enumerate(examples)}
    for index in selection.plot_indices:
        row = by_index[index]
        ex = examples[row]
        baselines = {n: p[row] for n, p in predictions.items() if n != label}
        plot_trajectory(out_dir / f"trajectory_{index}.png", time, ex.context, ex.target, predictions[label][row],
                        bands[row], baselines, f"trajectory {index} ({selection.split.which(index)} split)")
    scored = {n: m for n, m in metrics.items() if m is not None}
    if scored:
        plot_error_vs_horizon(out_dir / "error_vs_horizon.png", scored)
        errors = {n: per_trajectory_errors(p[complete], targets[complete])["mse"] for n, p in predictions.items()}
        plot_error_distribution(out_dir / "error_distribution.png", errors)


def format_table(result: dict) -> str:
    lines = [f"protocol: {result['protocol']}", f"forecast: {result['selection']}; scored {result['n_scored']} of "
             f"{result['n_trajectories']}; parse failures {result['parse_failures']} "
             f"({100 * result['parse_failure_rate']:.1f} %); generation {result['tokens_per_s']:.0f} tokens/s",
             f"{'method':<13} {'prey MSE':>10} {'prey MAE':>9} {'prey R2':>8} {'pred MSE':>10} {'pred MAE':>9} "
             f"{'pred R2':>8}"]
    for name, m in result["metrics"].items():
        if m is None:
            lines.append(f"{name:<13} (no complete forecast to score)")
            continue
        p, q = m["prey"], m["predator"]
        lines.append(f"{name:<13} {p['mse']:>10.4g} {p['mae']:>9.4g} {p['r2']:>8.3f} {q['mse']:>10.4g} "
                     f"{q['mae']:>9.4g} {q['r2']:>8.3f}")
    return "\n".join(lines)


def untrained_model_of_run(run_config: dict, device):
    """The run's base model without its adapter or fine-tuning (the "untrained" baseline)."""
    from training.run import load_base_model

    model, _ = load_base_model(run_config, device=device)
    model.requires_grad_(False)
    return model.eval()


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
