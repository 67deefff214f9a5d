"""PNG plots (matplotlib, Agg: no display needed): one trajectory with its forecasts, error against horizon step,
and the distribution of per-trajectory errors.

Legends use the report's words: the forecast's "untrained" baseline is "zero-shot", and the model is "fine-tuned"
when that baseline is beside it (a trained run's forecast); a caller that knows better passes `model_label`. The
fine-tuned and zero-shot models are solid lines, the baselines dashed."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .metrics import SPECIES

MODEL_COLOR = "tab:blue"
METHOD_COLORS = {"fine-tuned": MODEL_COLOR, "model": MODEL_COLOR, "zero-shot": "tab:green",
                 "persistence": "tab:orange", "seasonal_naive": "tab:purple", "lv_fit": "tab:red"}
DISPLAY_NAMES = {"untrained": "zero-shot"}  # forecast.py's method names -> the words of tables and Findings
MODELS = ("fine-tuned", "zero-shot", "model")  # drawn solid; the baselines dashed


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def model_name(methods, model_label: str | None) -> str:
    """What the legend calls the forecast's model: `model_label`, else "fine-tuned" when the zero-shot
    ("untrained") baseline is among `methods`, else "model"."""
    if model_label is not None:
        return model_label
    return "fine-tuned" if any(display_name(m) == "zero-shot" for m in methods) else "model"


def _style(name: str) -> dict:
    return {"color": METHOD_COLORS.get(name, MODEL_COLOR), "ls": "-" if name in MODELS else "--"}


def plot_trajectory(path: Path, time: np.ndarray, context: np.ndarray, target: np.ndarray, forecast: np.ndarray,
                    band: tuple[np.ndarray, np.ndarray] | None, baselines: dict[str, np.ndarray], title: str,
                    model_label: str | None = None, xlabel: str = "time") -> Path:
    """Prey and predator panels: context and truth (black), the model's forecast (and its 10-90 % band), the
    zero-shot model solid, the baselines dashed. The vertical range follows the data, so a curve far outside it (a
    diverging LV fit, a wild forecast) runs off the panel."""
    label = model_name(baselines, model_label)
    n_context, horizon = len(context), len(target)
    t_context, t_future = time[:n_context], time[n_context:n_context + horizon]
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for v, ax in enumerate(axes):
        ax.plot(t_context, context[:, v], color="black", label="context")
        ax.plot(t_future, target[:, v], color="black", alpha=0.5, lw=2.5, label="truth")
        if band is not None:
            ax.fill_between(t_future, band[0][:, v], band[1][:, v], color=_style(label)["color"], alpha=0.2,
                            label="10-90 %")
        ax.plot(t_future, forecast[:, v], lw=2, label=label + (" (median)" if band else ""), **_style(label))
        for name, values in baselines.items():
            ax.plot(t_future, values[:, v], label=display_name(name), **_style(display_name(name)))
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
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_vs_horizon(path: Path, metrics_by_method: dict[str, dict], model_label: str | None = None) -> Path:
    """MAE at each horizon step, per species, one curve per method (the models solid, baselines dashed)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    model = model_name(metrics_by_method, model_label)
    for ax, species in zip(axes, SPECIES):
        for name, metrics in metrics_by_method.items():
            values = np.asarray(metrics[species]["mae_by_step"], float)
            values = np.where(np.isfinite(values) & (values > 0), values, np.nan)  # log axis: no inf, no zeros
            label = model if name == "model" else display_name(name)
            ax.plot(np.arange(1, len(values) + 1), values, label=label, **_style(label))
        ax.set_title(f"{species}: MAE against horizon step")
        ax.set_xlabel("steps ahead")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_distribution(path: Path, errors_by_method: dict[str, dict[str, np.ndarray]],
                            model_label: str | None = None) -> Path:
    """Histograms (log-spaced bins) of per-trajectory MSE over the horizon, per species, one outline per method.
    Infinite errors (an overflowed LV forecast) are counted in the legend rather than drawn."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    model = model_name(errors_by_method, model_label)
    for ax, species in zip(axes, SPECIES):
        values = {name: np.asarray(e[f"{species}_mse"], float) for name, e in errors_by_method.items()}
        drawable = {name: v[np.isfinite(v) & (v > 0)] for name, v in values.items()}
        pooled = np.concatenate([v for v in drawable.values()] + [np.empty(0)])
        if len(pooled):
            low, high = pooled.min(), pooled.max()
            bins = np.logspace(np.log10(low), np.log10(high * 1.0001 if high > low else low * 10), 30)
            for name, v in drawable.items():
                off = int((~np.isfinite(values[name])).sum())
                shown = model if name == "model" else display_name(name)
                ax.hist(v, bins=bins, histtype="step", lw=1.5, color=_style(shown)["color"],
                        ls=_style(shown)["ls"], label=f"{shown} ({off} not finite)" if off else shown)
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        ax.set_title(f"{species}: per-trajectory MSE over the horizon")
        ax.set_xlabel("MSE (original units)")
        ax.set_ylabel("trajectories")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
