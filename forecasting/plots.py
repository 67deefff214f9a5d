"""PNG plots of forecasts: one trajectory with its baselines, error vs horizon, error distribution."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SPECIES = ("prey", "predator")


def plot_trajectory(path: Path, time: np.ndarray, context: np.ndarray, target: np.ndarray, forecast: np.ndarray,
                    band: tuple[np.ndarray, np.ndarray] | None, baselines: dict[str, np.ndarray], title: str) -> Path:
    n_context, horizon = len(context), len(target)
    t_context, t_future = time[:n_context], time[n_context:n_context + horizon]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for v, ax in enumerate(axes):
        ax.plot(t_context, context[:, v], color="black", label="context")
        ax.plot(t_future, target[:, v], color="black", alpha=0.45, label="truth")
        ax.plot(t_future, forecast[:, v], color="tab:blue", label="model")
        if band is not None:
            ax.fill_between(t_future, band[0][:, v], band[1][:, v], color="tab:blue", alpha=0.2, label="10-90 %")
        for (name, values), color in zip(baselines.items(), ("tab:orange", "tab:green", "tab:red", "tab:purple")):
            ax.plot(t_future, values[:, v], "--", color=color, label=name)
        ax.axvline(t_context[-1], color="grey", lw=0.8)
        ax.set_ylabel(SPECIES[v] if v < len(SPECIES) else f"variable {v}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=3)
    axes[0].set_title(title)
    axes[-1].set_xlabel("time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_vs_horizon(path: Path, metrics_by_method: dict[str, dict]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for v, ax in enumerate(axes):
        for name, metrics in metrics_by_method.items():
            values = metrics[SPECIES[v]]["mae_by_step"]
            ax.plot(np.arange(1, len(values) + 1), values, "-" if name == "model" else "--", label=name)
        ax.set_title(f"{SPECIES[v]}: MAE vs horizon step")
        ax.set_xlabel("steps ahead")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_distribution(path: Path, errors_by_method: dict[str, np.ndarray]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = [e[np.isfinite(e) & (e > 0)] for e in errors_by_method.values()]
    low, high = min(e.min() for e in finite if len(e)), max(e.max() for e in finite if len(e))
    bins = np.logspace(np.log10(low), np.log10(high), 30)
    for (name, _), values in zip(errors_by_method.items(), finite):
        ax.hist(values, bins=bins, histtype="step", lw=1.5, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("per-trajectory MSE over the horizon (original units)")
    ax.set_ylabel("trajectories")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
