"""A grid of runs: every combination of the given learning rates, LoRA ranks and context lengths.

The whole grid is checked against the FLOP budget before its first run starts; each run then lives in its own
directory named from its values, and the grid ends with a summary table (printed, and `summary.json` in the grid's
directory).
"""
from __future__ import annotations

import itertools
from pathlib import Path

from common.fileio import write_json_atomic
from ledger import BudgetExceeded, Ledger
from qwen_mini.flop_report import format_flops, log10

from .budget import check_inside_runs_dir, plan_run_flops
from .config import ConfigError, TrainConfig
from .distributed import Distributed
from .loop import train_run
from .run import FINAL_TRAIN_STEPS, RunDirError, RunResult
from .rundir import holds_run, resume_point
from .setup import check_settings

SUMMARY_NAME = "summary.json"


def grid_name(base: TrainConfig, lrs, ranks, ctxs) -> str:
    """'grid_tiny_r4-8_lr1e-05-5e-05_ctx512': the grid's directory name, from its values."""
    mode = "full" if base.full else "r" + "-".join(str(r) for r in ranks)
    return f"grid_{base.model_tag}_{mode}_lr{'-'.join(f'{lr:g}' for lr in lrs)}_ctx{'-'.join(map(str, ctxs))}"


def expand_grid(settings: dict, lrs, ranks, ctxs) -> list[TrainConfig]:
    """One TrainConfig per (lr, rank, ctx). `settings` holds every other TrainConfig field; its "out" is the run
    directory of a single run, or the grid's directory (default: <runs_dir>/<grid_name>) that holds one directory per
    run, named after the run's values."""
    lrs, ranks, ctxs = (list(dict.fromkeys(values)) for values in (lrs, ranks, ctxs))
    if settings.get("full") and len(ranks) > 1:
        raise ConfigError("--full trains every weight: several --rank values would be the same run")
    settings = dict(settings)
    out = settings.pop("out", None)
    combos = list(itertools.product(lrs, ranks, ctxs))
    if len(combos) == 1:
        lr, rank, ctx = combos[0]
        return [TrainConfig(**settings, lr=lr, rank=rank, ctx=ctx, out=out)]
    configs = [TrainConfig(**settings, lr=lr, rank=rank, ctx=ctx) for lr, rank, ctx in combos]
    grid_dir = Path(out) if out is not None else Path(configs[0].runs_dir) / grid_name(configs[0], lrs, ranks, ctxs)
    for config in configs:
        config.out = str(grid_dir / config.run_name)
        if config.tensorboard_dir is not None:  # one log directory for the grid: its runs overlay in TensorBoard
            config.tensorboard_dir = str(Path(config.tensorboard_dir) / config.run_name)
    return configs


def grid_dir(configs: list[TrainConfig]) -> Path:
    return Path(configs[0].run_dir).parent


def check_grid_budget(configs: list[TrainConfig], world_size: int = 1) -> int:
    """Refuse the grid (BudgetExceeded) unless every run's remaining steps and validation passes fit together in
    what is left; returns the grid's planned FLOPs. Runs being resumed count only what they still have to do. (Each
    run still reserves its own share when it starts.)"""
    counted = [check_inside_runs_dir(config) for config in configs]
    if configs[0].no_budget or not any(counted):
        return 0
    ledger = Ledger(configs[0].runs_dir, configs[0].max_flops, change_max_flops=configs[0].change_max_flops)
    gqa = ledger.convention(configs[0].gqa)
    remaining = sum(plan_run_flops(config, resume_point(config).step, gqa, world_size).total for config in configs)
    try:
        ledger.check(remaining)
    except BudgetExceeded as e:
        raise BudgetExceeded(f"the grid of {len(configs)} runs does not fit: {e}") from None
    return remaining


def resumed_runs(configs: list[TrainConfig]) -> list[bool]:
    """Which runs of the grid continue. With --resume the grid's directory must exist, and its runs that never
    started (nothing in their directory yet) start afresh; without it, none continues."""
    if not configs[0].resume:
        return [False] * len(configs)
    if not grid_dir(configs).is_dir():
        raise RunDirError(f"{grid_dir(configs)}: --resume found no such grid directory; check --out, or leave out "
                          "--resume to start the grid")
    return [holds_run(config.run_dir) for config in configs]


def run_grid(configs: list[TrainConfig], *, dist: Distributed | None = None, progress: bool = True
             ) -> list[RunResult]:
    """Check the grid's budget, train each run in turn, write summary.json beside the runs; returns the results."""
    dist = dist or Distributed()
    for config in configs:  # every run's settings before the first one starts
        check_settings(config, dist.world_size)
    for config, resume in zip(configs, dist.on_main(resumed_runs, configs)):
        config.resume = resume
    dist.on_main(check_grid_budget, configs, dist.world_size)
    results = []
    for config in configs:
        result = train_run(config, dist=dist, progress=progress)
        result.model = None  # keep one model in memory at a time
        results.append(result)
    if dist.is_main:
        rows = [result.summary_row() for result in results]
        write_json_atomic(grid_dir(configs) / SUMMARY_NAME, {
            "values": {"lr": sorted({c.lr for c in configs}), "rank": sorted({c.rank for c in configs}),
                       "ctx": sorted({c.ctx for c in configs})},
            "runs": rows, "flops_used": sum(row["flops_used"] for row in rows)})
    return results


def format_summary(rows: list[dict]) -> str:
    """The summary table: one line per run, then the total FLOPs."""
    def number(value):
        return "-" if value is None else f"{value:.4f}"

    width = max(len("run"), *(len(row["run"]) for row in rows))
    header = (f"{'run':<{width}}  {'lr':>8}  {'rank':>4}  {'ctx':>5}  {'steps':>6}  {'train':>8}  {'val@0':>8}  "
              f"{'val':>8}  {'best val':>8}  {'FLOPs':>9}  {'log10':>5}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['run']:<{width}}  {row['lr']:>8.2g}  {row['rank'] if row['rank'] is not None else '-':>4}  "
                     f"{row['ctx']:>5}  {row['steps']:>6}  {number(row['final_train_loss']):>8}  "
                     f"{number(row['initial_val_loss']):>8}  {number(row['final_val_loss']):>8}  "
                     f"{number(row['best_val_loss']):>8}  {format_flops(row['flops_used']):>9}  "
                     f"{log10(row['flops_used']):>5.2f}")
    total = sum(row["flops_used"] for row in rows)
    lines.append("-" * len(header))
    conventions = ", ".join(sorted({str(row.get("gqa", "real")) for row in rows}))
    lines.append(f"train: mean loss of the last {FINAL_TRAIN_STEPS} steps; val@0: before training; FLOPs: training "
                 f"and validation FLOPs spent (ledger), attention counted as gqa={conventions}. Total "
                 f"{format_flops(total)} FLOPs.")
    uncounted = [row["run"] for row in rows if not row.get("counted", True)]
    if uncounted:
        lines.append(f"not counted in any FLOP ledger (--no-budget outside --runs-dir): {', '.join(uncounted)}")
    return "\n".join(lines)
