"""The loss-curve PNG of a run (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.fileio import atomic_write


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start), as long as `values`."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_losses(metrics: list[dict], path: str | Path, title: str = "") -> Path:
    """Train loss per step (raw and smoothed) and validation loss at each evaluation, against steps, with the
    training FLOPs on the top axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["train_loss"]) for m in metrics if m.get("train_loss") is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        window = max(len(losses) // 50, 1)
        if window > 1:
            ax.plot(steps, moving_average(losses, window), color="tab:blue", lw=1.5,
                    label=f"train (mean of {window} steps)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", ms=4, lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per token (nats)")
    per_step = next((m["flops"] / m["step"] for m in metrics if m.get("step") and m.get("flops")), None)
    if per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda f: f / per_step))
        top.set_xlabel("training FLOPs")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
