"""Forecast metrics on original (unscaled) values, per species, pooled over all scored trajectories."""
from __future__ import annotations

import numpy as np


def forecast_metrics(predictions: np.ndarray, targets: np.ndarray, names=("prey", "predator")) -> dict:
    """predictions, targets: (N, horizon, V). Per variable: MSE, MAE, R^2 (1 - SSE/SST, SST around the mean of all
    target values of that variable) and MSE/MAE at each horizon step (averaged over trajectories)."""
    predictions, targets = np.asarray(predictions, float), np.asarray(targets, float)
    if predictions.shape != targets.shape or predictions.ndim != 3:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} must both be (N, horizon, V)")
    out = {"n_trajectories": int(predictions.shape[0])}
    for v, name in enumerate(names[:predictions.shape[2]]):
        error = predictions[..., v] - targets[..., v]
        sst = ((targets[..., v] - targets[..., v].mean()) ** 2).sum()
        out[name] = {
            "mse": float((error ** 2).mean()),
            "mae": float(np.abs(error).mean()),
            "r2": float(1.0 - (error ** 2).sum() / sst) if sst > 0 else float("nan"),
            "mse_by_step": (error ** 2).mean(axis=0).tolist(),
            "mae_by_step": np.abs(error).mean(axis=0).tolist(),
        }
    return out


def per_trajectory_errors(predictions: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) MSE and MAE of each trajectory over its horizon and variables."""
    error = np.asarray(predictions, float) - np.asarray(targets, float)
    return {"mse": (error ** 2).mean(axis=(1, 2)), "mae": np.abs(error).mean(axis=(1, 2))}
