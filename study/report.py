"""One Markdown report of everything in a runs directory (`report.py RUNS_DIR`): report.md and its PNGs.

    ## Budget        the ledger by kind and by group, as a bar against the budget (budget.png)
    ## Runs          one row per training run: settings, steps, best and final validation loss, FLOPs by kind
    ## <group>       per group of runs (a study's stage, else the runs' parent directory): overlaid loss curves
                     (loss_<group>.png), a heat map of best validation loss over lr x rank where both vary
                     (heatmap_<group>.png), validation loss against context length where a sweep exists
                     (context_<group>.png)
    ## Forecasts     per forecast: MSE / MAE / medMSE per species of the model and each baseline, its FLOPs

Runs are the directories holding config.json and metrics.jsonl; forecasts are the entries of the ledger's records
(their `out` directories' metrics.json); groups come from the study.json files of `train.py --plan`, else from the
directory layout. Everything is read from disk: the report can be written again at any time.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ledger import KINDS, DEFAULT_BUDGET, Record, read_records, record_label, totals  # noqa: E402
from common.fileio import atomic_write  # noqa: E402
from qwen_mini.flop_report import format_flops  # noqa: E402
from forecasting.metrics import SPECIES  # noqa: E402
from training.config import TRAJECTORY_KEYS  # noqa: E402
from training.plot import moving_average  # noqa: E402
from training.run import CONFIG_NAME, METRICS_NAME, read_metrics, read_run_config  # noqa: E402

from .run import STUDY_FILE  # noqa: E402

REPORT_NAME = "report.md"
METHOD_ORDER = ("model", "untrained", "persistence", "lv_fit")
KIND_COLORS = {"train": "tab:blue", "eval": "tab:orange", "forecast": "tab:green", "reserved": "lightgray"}


class ReportError(ValueError):
    """A runs directory the report cannot be made of."""


@dataclass
class RunInfo:
    run_dir: Path
    label: str  # the directory under the runs directory
    config: dict
    metrics: list[dict]
    record: Record | None

    @property
    def val(self) -> list[tuple[int, float]]:
        return [(m["step"], m["val_loss"]) for m in self.metrics if m.get("val_loss") is not None]

    @property
    def best_val(self) -> float | None:
        return min((v for _, v in self.val), default=None)

    @property
    def final_val(self) -> float | None:
        return self.val[-1][1] if self.val else None

    @property
    def steps(self) -> int:
        return max((m["step"] for m in self.metrics), default=0)

    def flops(self, kind: str) -> int:
        return self.record.by_kind[kind] if self.record is not None else 0


@dataclass
class Group:
    name: str
    runs: list[RunInfo]
    varied: list[str] = field(default_factory=list)


@dataclass
class ForecastInfo:
    out: Path
    label: str
    source: str
    entries: list[dict]  # the ledger entries of this forecast (model, untrained)
    metrics: dict | None  # its metrics.json, None if it is gone


def collect_runs(runs_dir: Path, records: dict[Path, Record]) -> list[RunInfo]:
    runs = []
    for config_path in sorted(runs_dir.rglob(CONFIG_NAME)):
        run_dir = config_path.parent
        if not (run_dir / METRICS_NAME).is_file():
            continue  # a model directory's config.json (model/, adapter/), not a run
        try:
            config = read_run_config(run_dir)
            metrics = read_metrics(run_dir, drop_torn_tail=True)
        except ValueError:
            continue
        runs.append(RunInfo(run_dir, str(run_dir.relative_to(runs_dir)), config, metrics,
                            records.get(run_dir.resolve())))
    return runs


def collect_forecasts(records: list[Record], runs_dir: Path) -> list[ForecastInfo]:
    by_out: dict[str, ForecastInfo] = {}
    for record in records:
        for entry in record.forecasts:
            out = entry.get("out")
            if not out:
                continue
            info = by_out.get(out)
            if info is None:
                path = Path(out) / "metrics.json"
                metrics = json.loads(path.read_text()) if path.is_file() else None
                label = _relative(Path(out), runs_dir)
                info = by_out[out] = ForecastInfo(Path(out), label, entry.get("source", ""), [], metrics)
            info.entries.append(entry)
    return sorted(by_out.values(), key=lambda f: f.label)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def collect_groups(runs_dir: Path, runs: list[RunInfo]) -> list[Group]:
    """The stages of every study under `runs_dir` (their study.json), then the other runs by parent directory."""
    by_dir = {r.run_dir.resolve(): r for r in runs}
    groups, grouped = [], set()
    for study_file in sorted(runs_dir.rglob(STUDY_FILE)):
        study = json.loads(study_file.read_text())
        for stage in study.get("stages", []):
            if stage.get("kind") != "train":
                continue
            members = [by_dir[Path(d).resolve()] for d in stage.get("runs", []) if Path(d).resolve() in by_dir]
            if members:
                groups.append(Group(f"{study.get('name', study_file.parent.name)}/{stage['name']}", members,
                                    stage.get("varied", [])))
                grouped.update(id(m) for m in members)
    rest: dict[str, list[RunInfo]] = {}
    for run in runs:
        if id(run) not in grouped:
            rest.setdefault(str(Path(run.label).parent), []).append(run)
    for name, members in sorted(rest.items()):
        groups.append(Group(name if name != "." else "(top level)", members, varied_settings(members)))
    return groups


def varied_settings(runs: list[RunInfo]) -> list[str]:
    """The settings that differ between the runs (the stride only where the context does not explain it)."""
    keys = dict.fromkeys(("lr", "rank", "ctx", "steps", *TRAJECTORY_KEYS))
    varied = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    return [k for k in varied if not (k == "stride" and "ctx" in varied)]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "runs"


# ---- figures -------------------------------------------------------------------------------------------------------

def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def _save_line_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_budget(path: Path, records: list[Record], groups: dict[str, int], budget: int) -> Path:
    """Two horizontal bars against the budget: spent by kind (and reserved), spent by group."""
    t = totals(records)
    fig, ax = plt.subplots(figsize=(9, 2.8))
    left = 0
    for kind in KINDS:
        ax.barh(1, t.by_kind[kind], left=left, color=KIND_COLORS[kind], label=kind)
        left += t.by_kind[kind]
    if t.outstanding:
        ax.barh(1, t.outstanding, left=left, color=KIND_COLORS["reserved"], label="reserved (running)")
    left = 0
    colors = plt.cm.tab20.colors
    for i, (name, flops) in enumerate(sorted(groups.items(), key=lambda kv: -kv[1])):
        ax.barh(0, flops, left=left, color=colors[i % len(colors)], edgecolor="white",
                label=name if i < 8 else None)
        left += flops
    ax.axvline(budget, color="red", lw=2, ls="--", label=f"budget {format_flops(budget)}")
    ax.set_yticks([0, 1], ["by group", "by kind"])
    ax.set_xlim(0, max(budget, t.committed) * 1.05)
    ax.set_xlabel("FLOPs")
    ax.set_title(f"FLOP ledger: {format_flops(t.spent)} spent of {format_flops(budget)} "
                 f"({100 * t.spent / budget:.1f} %)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_group_losses(path: Path, group: Group) -> Path:
    """Validation loss (markers) and smoothed training loss (faint) of every run of a group, one colour each."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.cm.tab10.colors
    for i, run in enumerate(group.runs):
        color = colors[i % len(colors)]
        train = [(m["step"], m["train_loss"]) for m in run.metrics if m.get("train_loss") is not None]
        if train:
            steps, losses = zip(*train)
            window = max(len(losses) // 30, 1)
            ax.plot(steps, moving_average(losses, window), color=color, alpha=0.35, lw=1)
        if run.val:
            ax.plot(*zip(*run.val), "o-", color=color, ms=3, lw=1.5, label=short_label(run, group))
    return _save_line_plot(fig, ax, path, "step", "validation loss (nats/token); faint: train",
                           f"{group.name}: loss curves")


def short_label(run: RunInfo, group: Group) -> str:
    keys = [k for k in group.varied if k in run.config] or ["lr", "rank", "ctx"]
    return ", ".join(f"{k}={_value(run.config.get(k))}" for k in keys)


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_heatmap(path: Path, group: Group) -> Path | None:
    """Best validation loss over learning rate x LoRA rank (runs sharing every other setting)."""
    cells = {(r.config.get("lr"), r.config.get("rank")): r.best_val for r in group.runs
             if r.best_val is not None and not r.config.get("full")}
    lrs, ranks = sorted({lr for lr, _ in cells}), sorted({rank for _, rank in cells})
    if len(lrs) < 2 and len(ranks) < 2:
        return None
    grid = [[cells.get((lr, rank), math.nan) for lr in lrs] for rank in ranks]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(lrs), 1.4 + 0.9 * len(ranks)))
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            if not math.isnan(value):  # dark text on the light (low-loss) cells
                light = image.norm(value) < 0.5
                ax.text(x, y, f"{value:.3f}", ha="center", va="center", color="black" if light else "white",
                        fontsize=9)
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("LoRA rank")
    ax.set_title(f"{group.name}: best validation loss", fontsize=10)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def context_sweeps(runs: list[RunInfo]) -> dict[str, list[RunInfo]]:
    """Runs that differ only in their context length (and the stride that follows from it), >= 2 lengths."""
    ignored = {"ctx", "stride"}
    sets: dict[str, list[RunInfo]] = {}
    for run in runs:
        key = json.dumps({k: run.config.get(k) for k in (*TRAJECTORY_KEYS, "steps") if k not in ignored},
                         sort_keys=True)
        sets.setdefault(key, []).append(run)
    sweeps = {}
    for members in sets.values():
        by_ctx = {}
        for run in members:
            by_ctx.setdefault(run.config.get("ctx"), run)
        if len(by_ctx) >= 2:
            first = members[0].config
            label = f"lr {_value(first.get('lr'))}, " + ("full" if first.get("full") else f"rank {first.get('rank')}")
            sweeps[label] = sorted(by_ctx.values(), key=lambda r: r.config.get("ctx"))
    return sweeps


def plot_context(path: Path, name: str, sweeps: dict[str, list[RunInfo]]) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, members in sweeps.items():
        ax.plot([r.config["ctx"] for r in members], [r.best_val for r in members], "o-", label=label)
        for r in members:
            ax.annotate(f"{r.best_val:.3f}", (r.config["ctx"], r.best_val), fontsize=7, textcoords="offset points",
                        xytext=(0, 5), ha="center")
    return _save_line_plot(fig, ax, path, "context length (tokens)", "best validation loss",
                           f"{name}: validation loss against context length")


# ---- the report ----------------------------------------------------------------------------------------------------

def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _metric(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def runs_table(runs: list[RunInfo]) -> list[str]:
    lines = ["| run | model | LoRA | lr | ctx | batch | steps | best val | final val | train FLOPs | eval FLOPs | "
             "forecast FLOPs | total |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r.config
        lora = "full" if c.get("full") else f"r{c.get('rank')} ({','.join(c.get('targets', []))})"
        total = sum(r.flops(k) for k in KINDS)
        lines.append(f"| {r.label} | {Path(str(c.get('model'))).name} | {lora} | {_value(c.get('lr'))} | {c.get('ctx')} "
                     f"| {c.get('batch')} | {r.steps}/{c.get('steps')} | {_loss(r.best_val)} | {_loss(r.final_val)} "
                     f"| {format_flops(r.flops('train'))} | {format_flops(r.flops('eval'))} "
                     f"| {format_flops(r.flops('forecast'))} | {format_flops(total)} |")
    return lines


def forecast_table(info: ForecastInfo) -> list[str]:
    spent = sum(e["flops"] for e in info.entries)
    by_method = ", ".join(f"{e.get('label', '?')} {format_flops(e['flops'])}" for e in info.entries)
    lines = [f"### {info.label}", "",
             f"Forecast with `{info.source}`; FLOPs {format_flops(spent)} ({by_method}; prefill + every KV-cache "
             "decode step)."]
    if info.metrics is None:
        return lines + ["", f"(its metrics.json is gone from {info.out})", ""]
    m = info.metrics
    lines += [f"{m.get('selection', '')}; scored {m.get('n_scored')} of {m.get('n_trajectories')}; "
              f"{m.get('protocol', '')}", ""]
    header = "| method | " + " | ".join(f"{s} {what}" for s in SPECIES for what in ("MSE", "MAE", "medMSE")) + " |"
    lines += [header, "|---|" + "---|" * 6]
    methods = m.get("metrics") or {}
    for name in sorted(methods, key=lambda n: METHOD_ORDER.index(n) if n in METHOD_ORDER else 99):
        values = methods[name]
        if values is None:
            lines.append(f"| {name} | " + " | ".join("-" for _ in range(6)) + " |")
            continue
        cells = [_metric(values[s].get(k)) for s in SPECIES for k in ("mse", "mae", "median_trajectory_mse")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(runs_dir, out=None, max_flops: int | None = None) -> Path:
    """report.md and its PNGs in `out` (default: the runs directory); returns report.md's path."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir}: no such directory")
    out = Path(out) if out is not None else runs_dir
    records = read_records(runs_dir)
    runs = collect_runs(runs_dir, {r.run_dir.resolve(): r for r in records})
    forecasts = collect_forecasts(records, runs_dir)
    if not runs and not records:
        raise ReportError(f"{runs_dir}: no runs and no FLOP records to report on")
    budget = max_flops or _study_budget(runs_dir) or DEFAULT_BUDGET
    groups = collect_groups(runs_dir, runs)
    t = totals(records)
    figures = out / "report_figures"
    group_flops: dict[str, int] = {}  # a run's by its parent directory (a grid, a study's stage), others' by their own
    for record in records:
        label = record_label(record, runs_dir)
        key = str(Path(label).parent) if "/" in label and record.by_kind["train"] else label
        group_flops[key] = group_flops.get(key, 0) + record.flops_used
    lines = [f"# Report of `{runs_dir}`", "",
             f"{len(runs)} training run(s), {len(forecasts)} forecast(s). Counting convention: gqa="
             f"{', '.join(sorted({r.gqa for r in records})) or '-'}; backward = 2 x forward; evaluation = forward "
             "with loss; forecasts = prefill once per prompt + every KV-cache decode step.", "",
             "## Budget", "",
             "| | train | eval | forecast | total | reserved | budget | left |", "|---|---|---|---|---|---|---|---|",
             f"| FLOPs | {format_flops(t.by_kind['train'])} | {format_flops(t.by_kind['eval'])} | "
             f"{format_flops(t.by_kind['forecast'])} | {format_flops(t.spent)} | {format_flops(t.outstanding)} | "
             f"{format_flops(budget)} | {format_flops(budget - t.committed)} |",
             f"| share of budget | {_share(t.by_kind['train'], budget)} | {_share(t.by_kind['eval'], budget)} | "
             f"{_share(t.by_kind['forecast'], budget)} | {_share(t.spent, budget)} | {_share(t.outstanding, budget)}"
             f" | 100 % | {_share(budget - t.committed, budget)} |", ""]
    if t.spent > budget:
        lines += [f"**OVER BUDGET by {format_flops(t.spent - budget)} FLOPs.**", ""]
    lines += [_image(plot_budget(figures / "budget.png", records, group_flops, budget), out, "the ledger"), ""]
    if runs:
        lines += ["## Runs", ""] + runs_table(runs) + [""]
    for group in groups:
        lines += [f"## {group.name}", ""]
        if group.varied:
            lines += [f"Varied: {', '.join(group.varied)}.", ""]
        name = slug(group.name)
        if len(group.runs) >= 2:
            lines += [_image(plot_group_losses(figures / f"loss_{name}.png", group), out, "loss curves")]
        heatmap = plot_heatmap(figures / f"heatmap_{name}.png", group)
        if heatmap is not None:
            lines += [_image(heatmap, out, "best validation loss over lr x rank")]
        sweeps = context_sweeps(group.runs)
        if sweeps:
            lines += [_image(plot_context(figures / f"context_{name}.png", group.name, sweeps), out,
                             "validation loss against context length")]
        if len(group.runs) < 2 and heatmap is None and not sweeps:
            run = group.runs[0]
            lines += [f"One run: best validation loss {_loss(run.best_val)} after {run.steps} steps."]
        lines.append("")
    if forecasts:
        lines += ["## Forecasts", ""]
        for info in forecasts:
            lines += forecast_table(info)
    path = out / REPORT_NAME
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _share(flops: int, budget: int) -> str:
    return f"{100 * flops / budget:.3g} %" if budget else "-"


def _image(path: Path, out: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(out).as_posix()})"


def _study_budget(runs_dir: Path) -> int | None:
    budgets = {json.loads(p.read_text()).get("max_flops") for p in runs_dir.rglob(STUDY_FILE)}
    budgets.discard(None)
    return min(budgets) if budgets else None
