"""Forecast metrics on original (unscaled) values, per species, pooled over all scored trajectories."""
from __future__ import annotations

import math

import numpy as np

SPECIES = ("prey", "predator")


def variable_names(n_vars: int) -> list[str]:
    return list(SPECIES) if n_vars == len(SPECIES) else [f"var{v}" for v in range(n_vars)]


def forecast_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict:
    """predictions, targets: (N, horizon, V) in original units. Per variable, pooled over the N trajectories:
    mse, mae; r2 = 1 - SSE/SST with SST around the mean of all N*horizon target values of that variable (NaN if
    they are all equal); mse_by_step, mae_by_step: (horizon,) averaged over trajectories; median_trajectory_mse:
    the median over trajectories of each one's MSE, which a few diverging forecasts cannot dominate."""
    predictions, targets = np.asarray(predictions, float), np.asarray(targets, float)
    if predictions.shape != targets.shape or predictions.ndim != 3 or predictions.shape[0] == 0:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} must both be (N, horizon, V) "
                         f"with N >= 1")
    out = {"n_trajectories": int(predictions.shape[0])}
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowed (inf) forecast scores inf, not a warning
        for v, name in enumerate(variable_names(predictions.shape[2])):
            error = predictions[..., v] - targets[..., v]
            squared = error ** 2
            sst = ((targets[..., v] - targets[..., v].mean()) ** 2).sum()
            out[name] = {
                "mse": float(squared.mean()),
                "mae": float(np.abs(error).mean()),
                "r2": float(1.0 - squared.sum() / sst) if sst > 0 else float("nan"),
                "median_trajectory_mse": float(np.median(squared.mean(axis=1))),
                "mse_by_step": squared.mean(axis=0).tolist(),
                "mae_by_step": np.abs(error).mean(axis=0).tolist(),
            }
    return out


def per_trajectory_errors(predictions: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Each trajectory's MSE and MAE over its horizon, per variable: {"prey_mse": (N,), "prey_mae": (N,), ...}."""
    error = np.asarray(predictions, float) - np.asarray(targets, float)
    out = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for v, name in enumerate(variable_names(error.shape[2])):
            out[f"{name}_mse"] = (error[..., v] ** 2).mean(axis=1)
            out[f"{name}_mae"] = np.abs(error[..., v]).mean(axis=1)
    return out


def species_geometric_mean(method_metrics: dict | None, score: str) -> float | None:
    """The geometric mean over the species (a method's metrics.json entry's per-variable tables) of `score` ("mse",
    "crps"): each species weighs the same whatever its scale (the prey's MSE is ~10x the predator's), a relative
    change in either alike. None when there is no species, or one without a finite, positive `score`. demo.py's
    model choice (study.selection.forecast_score, the MSE) and --temperature auto (forecasting.tuning, the CRPS)."""
    values = [v.get(score) for v in (method_metrics or {}).values() if isinstance(v, dict)]
    if not values or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                             for x in values):
        return None
    return math.exp(sum(math.log(x) for x in values) / len(values))
