"""The report's figures (matplotlib, Agg), each saved whole (bbox_inches="tight": no clipped label):

    budget.png            the ledger on a log axis from 1e9 to 1e17 FLOPs, every bar labelled with its value
    loss_<group>.png      validation loss (top) apart from the smoothed training loss (bottom), one colour per run
    heatmap_<group>.png   change of the best validation loss from step 0 over lr x rank, steps and % of budget per cell
    context_<group>.png   validation loss against context length, on whole windows and on the same last-N targets,
                          at the best and at step 0
    horizon_<forecast>.png   MAE against horizon step, fine-tuned and zero-shot (and the baselines) in one figure
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from common.fileio import atomic_write
from forecasting.metrics import SPECIES
from forecasting.plots import METHOD_COLORS, MODELS
from qwen_mini.flop_report import format_flops
from training.plot import moving_average

KIND_COLORS = {"train": "tab:blue", "eval": "tab:orange", "forecast": "tab:green", "reserved": "lightgray"}
LEDGER_AXIS = (1e9, 1e17)  # the log axis of budget.png: from a tiny run's cost to the coursework budget


DRAWABLE = 1e6  # a loss or change beyond +-this (a hand-edited -1e308) is in the tables, not on an axis


def drawable(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= DRAWABLE


def slug(text: str) -> str:
    """A file-name part of a group's or stage's name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "runs"


def save(fig, path: Path) -> Path:
    """The figure as a PNG, cropped to everything drawn (nothing clipped), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_budget(path: Path, by_kind: dict[str, int], by_group: dict[str, int], budget: int) -> Path:
    """One horizontal bar per kind of work and per group, on a log axis from 1e9 to past the budget, each labelled
    with its FLOPs and share of the budget: a 6.5e12 FLOP study is as readable as a 9e16 one."""
    rows = [(f"{kind}", flops, KIND_COLORS.get(kind, "tab:gray")) for kind, flops in by_kind.items()]
    rows += [(f"group: {name}", flops, "tab:cyan") for name, flops in sorted(by_group.items(), key=lambda kv: -kv[1])]
    spent = sum(f for k, f in by_kind.items() if k != "reserved")
    rows.insert(0, ("spent, all", spent, "black"))
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.38 * len(rows)))
    low, high = LEDGER_AXIS[0], max(LEDGER_AXIS[1], budget) * 3
    for y, (_label, flops, color) in enumerate(rows):
        if flops > 0:
            ax.barh(y, flops - low if flops > low else 0, left=low, color=color, height=0.6)
        ax.text(max(flops, low) * 1.15, y, f"{format_flops(flops)} ({100 * flops / budget:.3g} %)" if flops else "0",
                va="center", fontsize=8)
    ax.axvline(budget, color="red", lw=2, ls="--")
    ax.text(budget, len(rows) - 0.4, f" budget {format_flops(budget)}", color="red", fontsize=8, va="bottom")
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("FLOPs (log scale)")
    ax.set_title(f"FLOP ledger: {format_flops(spent)} spent of {format_flops(budget)} ({100 * spent / budget:.3g} %)",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def plot_group_losses(path: Path, title: str, curves: list[tuple[str, list, list]]) -> Path:
    """Validation loss on its own axis (top), training loss smoothed below: the noisy training traces no longer set
    the range the validation lines are read on. `curves`: (label, [(step, train)], [(step, val)]) per run."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 2])
    colors = plt.cm.tab10.colors
    for i, (label, train, val) in enumerate(curves):
        color = colors[i % len(colors)]
        val, train = [p for p in val if drawable(p[1])], [p for p in train if drawable(p[1])]
        if val:
            top.plot(*zip(*val), "o-", color=color, ms=3, lw=1.5, label=label)
        if train:
            steps, losses = zip(*train)
            bottom.plot(steps, moving_average(losses, max(len(losses) // 10, 3)), color=color, lw=1)
    top.set_ylabel("validation loss (nats/token)")
    top.set_title(f"{title}: loss curves", fontsize=10)
    top.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    bottom.set_ylabel("training loss\n(moving average)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return save(fig, path)


def plot_heatmap(path: Path, title: str, lrs: list, ranks: list, cells: dict, noise: float = 0.0) -> Path:
    """Change of the best validation loss from step 0 over lr x rank; each cell also gives its steps and % of the
    budget. `cells[(lr, rank)] = (change, steps, share_percent, improved)`; a change is shown to 4 significant
    digits, so cells 0.0003 apart are told apart, and "not improved" where it is within the noise. The colour scale
    spans at least +-`noise`, so a change within the noise stays pale instead of taking the deepest colour."""
    grid = np.array([[cells[(lr, r)][0] if (lr, r) in cells and drawable(cells[(lr, r)][0]) else math.nan
                      for lr in lrs] for r in ranks], dtype=float)
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(lrs), 1.6 + 1.1 * len(ranks)))
    finite = grid[np.isfinite(grid)]
    span = max(abs(finite).max(), noise, 1e-12) if len(finite) else max(noise, 1.0)
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")  # blue: lower than step 0
    for y, rank in enumerate(ranks):
        for x, lr in enumerate(lrs):
            if (lr, rank) not in cells:
                continue
            change, steps, share, improved = cells[(lr, rank)]
            text = "NaN" if change is None else f"{change:+.4g}"
            dark = change is not None and abs(change) > 0.6 * span  # white text on the deep colours
            ax.text(x, y, f"{text}\n{steps} steps, {share:.2g} %" + ("" if improved else "\nnot improved"),
                    ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("LoRA rank")
    ax.set_title(f"{title}: best validation loss minus step 0", fontsize=10)
    fig.colorbar(image, ax=ax, label="change (nats/token)")
    return save(fig, path)


def plot_context(path: Path, title: str, sweeps: dict[str, list[tuple]], last_n: int | None) -> Path:
    """Validation loss against context length: the best over whole windows (dashed; not comparable across
    lengths), the best over the last `last_n` targets of each window (solid; the same positions at every length),
    and the same positions at step 0, before training (dotted): the gap between the dotted and the solid line is
    what training did, the slope of the dotted one what the context length did to the untouched model.
    sweeps[label] = [(ctx, best whole, best last, last at step 0)]."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, points) in enumerate(sweeps.items()):
        color = plt.cm.tab10.colors[i % 10]
        points = [p for p in points if drawable(p[1])]
        ctx = [p[0] for p in points]
        ax.plot(ctx, [p[1] for p in points], "o--", color=color, alpha=0.6, label=f"{label}: whole windows")
        if last_n is None or not points:
            continue
        for column, style, what in ((3, "^:", f"last {last_n} targets, step 0"), (2, "s-", f"last {last_n} targets")):
            if all(drawable(p[column]) for p in points):
                ax.plot(ctx, [p[column] for p in points], style, color=color, label=f"{label}: {what}")
                for p in points:
                    ax.annotate(f"{p[column]:.4f}", (p[0], p[column]), fontsize=7, textcoords="offset points",
                                xytext=(0, 6), ha="center")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{title}: validation loss against context length", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save(fig, path)


def plot_horizon(path: Path, title: str, by_method: dict[str, dict]) -> Path:
    """MAE at each horizon step per species, fine-tuned and zero-shot solid, baselines dashed, on a log axis."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, species in zip(axes, SPECIES):
        for name, metrics in by_method.items():
            values = np.asarray((metrics.get(species) or {}).get("mae_by_step") or [], float)
            if not len(values):
                continue
            values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
            ax.plot(np.arange(1, len(values) + 1), values, "-" if name in MODELS else "--",
                    color=METHOD_COLORS.get(name), lw=2 if name == "fine-tuned" else 1.2, label=name)
        ax.set_title(f"{species}: MAE against horizon step", fontsize=10)
        ax.set_xlabel("steps ahead")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MAE (original units, log scale)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title, fontsize=10)
    return save(fig, path)
