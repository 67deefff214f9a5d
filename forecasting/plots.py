"""PNG plots (matplotlib, Agg: no display needed): one trajectory with its forecasts, error against horizon step,
and the distribution of per-trajectory errors."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import SPECIES  # noqa: E402

MODEL_COLOR = "tab:blue"
BASELINE_COLORS = {"persistence": "tab:orange", "seasonal_naive": "tab:purple", "untrained": "tab:green",
                   "lv_fit": "tab:red"}


def plot_trajectory(path: Path, time: np.ndarray, context: np.ndarray, target: np.ndarray, forecast: np.ndarray,
                    band: tuple[np.ndarray, np.ndarray] | None, baselines: dict[str, np.ndarray], title: str) -> Path:
    """Prey and predator panels: context and truth (black), the model's forecast (and its 10-90 % band), the
    baselines dashed. The vertical range follows the data, so a curve far outside it (a diverging LV fit, a wild
    forecast) runs off the panel."""
    n_context, horizon = len(context), len(target)
    t_context, t_future = time[:n_context], time[n_context:n_context + horizon]
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for v, ax in enumerate(axes):
        ax.plot(t_context, context[:, v], color="black", label="context")
        ax.plot(t_future, target[:, v], color="black", alpha=0.5, lw=2.5, label="truth")
        if band is not None:
            ax.fill_between(t_future, band[0][:, v], band[1][:, v], color=MODEL_COLOR, alpha=0.2, label="10-90 %")
        ax.plot(t_future, forecast[:, v], color=MODEL_COLOR, label="model" + (" (median)" if band else ""))
        for name, values in baselines.items():
            ax.plot(t_future, values[:, v], "--", color=BASELINE_COLORS.get(name), label=name)
        # Follow the data, and the model unless it strays far beyond it: a wild forecast is clipped at 2.5x the
        # data's maximum rather than flattening the truth into a line at the bottom.
        data_max = max(context[:, v].max(), target[:, v].max())
        finite = forecast[:, v][np.isfinite(forecast[:, v])]
        top = max(data_max, min(finite.max() if len(finite) else data_max, 2.5 * data_max))
        ax.set_ylim(min(0.0, context[:, v].min(), target[:, v].min()), 1.15 * top + 1e-9)
        ax.axvline(t_context[-1], color="grey", lw=0.8)
        ax.set_ylabel(SPECIES[v] if v < len(SPECIES) else f"variable {v}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=3, loc="upper left")
    axes[0].set_title(title)
    axes[-1].set_xlabel("time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_vs_horizon(path: Path, metrics_by_method: dict[str, dict]) -> Path:
    """MAE at each horizon step, per species, one curve per method (model solid, baselines dashed)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, species in zip(axes, SPECIES):
        for name, metrics in metrics_by_method.items():
            values = np.asarray(metrics[species]["mae_by_step"], float)
            values = np.where(np.isfinite(values) & (values > 0), values, np.nan)  # log axis: no inf, no zeros
            ax.plot(np.arange(1, len(values) + 1), values, "--" if name in BASELINE_COLORS else "-",
                    color=BASELINE_COLORS.get(name, MODEL_COLOR), label=name)
        ax.set_title(f"{species}: MAE against horizon step")
        ax.set_xlabel("steps ahead")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_distribution(path: Path, errors_by_method: dict[str, dict[str, np.ndarray]]) -> Path:
    """Histograms (log-spaced bins) of per-trajectory MSE over the horizon, per species, one outline per method.
    Infinite errors (an overflowed LV forecast) are counted in the legend rather than drawn."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, species in zip(axes, SPECIES):
        values = {name: np.asarray(e[f"{species}_mse"], float) for name, e in errors_by_method.items()}
        drawable = {name: v[np.isfinite(v) & (v > 0)] for name, v in values.items()}
        pooled = np.concatenate([v for v in drawable.values()] + [np.empty(0)])
        if len(pooled):
            low, high = pooled.min(), pooled.max()
            bins = np.logspace(np.log10(low), np.log10(high * 1.0001 if high > low else low * 10), 30)
            for name, v in drawable.items():
                off = int((~np.isfinite(values[name])).sum())
                label = f"{name} ({off} not finite)" if off else name
                ax.hist(v, bins=bins, histtype="step", lw=1.5, color=BASELINE_COLORS.get(name, MODEL_COLOR),
                        label=label)
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        ax.set_title(f"{species}: per-trajectory MSE over the horizon")
        ax.set_xlabel("MSE (original units)")
        ax.set_ylabel("trajectories")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
