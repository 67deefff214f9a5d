"""The FLOP budget ledger: what every training run has spent, and refusing a run that would overspend.

All training experiments together may use `DEFAULT_BUDGET` = 1e17 FLOPs. Each run keeps its own record,
`<run_dir>/flops.json`, rewritten atomically by the trainer after every logged step and at the end
(`write_run_record`); the ledger is every such record found under the runs directory (`read_ledger`). Before a run
starts, `plan_run` / `check_budget` compare its planned FLOPs (steps x FLOPs per step, from `qwen_mini.flops`) with
what is left, and raise `BudgetExceeded` with the numbers if it does not fit.

Evaluation and forecasting do not count against the budget: only training steps do.
"""
from __future__ import annotations

import json
import math
import operator
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .fileio import write_json_atomic
from .flops import count_forward, format_flops

__all__ = ["DEFAULT_BUDGET", "RECORD_NAME", "BudgetExceeded", "LedgerError", "LedgerRow", "RunPlan", "check_budget",
           "format_ledger", "log10", "plan_run", "read_ledger", "spent", "write_run_record"]

DEFAULT_BUDGET = 10**17
RECORD_NAME = "flops.json"
RECORD_VERSION = 1


class BudgetExceeded(RuntimeError):
    """A planned run that does not fit in what is left of the FLOP budget."""


class LedgerError(ValueError):
    """A run record that cannot be read: the ledger refuses to guess what that run spent."""


def log10(flops: int) -> float:
    """log10 of a FLOP count, as the users report them (-inf for zero)."""
    return math.log10(flops) if flops > 0 else float("-inf")


def _log10_text(flops: int) -> str:
    return f"{log10(flops):.2f}" if flops > 0 else "-"


def _count(name: str, value) -> int:
    """A non-negative whole number of FLOPs or steps (ints, numpy ints, or integral floats such as 3e16)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


# ---- run records ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LedgerRow:
    """One run's record (`<run_dir>/flops.json`)."""
    run_name: str
    path: Path
    flops_used: int
    per_step_flops: int
    steps_done: int
    planned_flops: int
    config: dict
    updated: str = ""

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def log10_flops_used(self) -> float:
        return log10(self.flops_used)


def write_run_record(run_dir, *, run_name: str, flops_used, per_step_flops, steps_done, planned_flops,
                     config: dict) -> Path:
    """Write `run_dir/flops.json` (temporary file + os.replace: a reader never sees half a record). Returns its path.

    flops_used: FLOPs of the training steps done so far; planned_flops: the whole run's plan (steps x per step);
    config: the run's settings (JSON; values JSON cannot hold, such as paths, are written as text)."""
    if not isinstance(run_name, str) or not run_name:
        raise ValueError(f"run_name must be a non-empty string, got {run_name!r}")
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict of the run's settings, got {type(config).__name__}")
    record = {
        "version": RECORD_VERSION,
        "run_name": run_name,
        "flops_used": _count("flops_used", flops_used),
        "log10_flops_used": None,
        "per_step_flops": _count("per_step_flops", per_step_flops),
        "steps_done": _count("steps_done", steps_done),
        "planned_flops": _count("planned_flops", planned_flops),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
    }
    if record["flops_used"] > 0:
        record["log10_flops_used"] = round(log10(record["flops_used"]), 4)
    return write_json_atomic(Path(run_dir) / RECORD_NAME, record)


def _read_record(path: Path) -> LedgerRow:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LedgerError(f"{path}: unreadable run record ({e}); fix or remove it, the ledger cannot skip a run's "
                          "spending") from None
    if not isinstance(raw, dict):
        raise LedgerError(f"{path}: a run record must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in ("run_name", "flops_used") if k not in raw]
    if missing:
        raise LedgerError(f"{path}: run record without {', '.join(missing)}")
    try:
        return LedgerRow(
            run_name=str(raw["run_name"]),
            path=path,
            flops_used=_count("flops_used", raw["flops_used"]),
            per_step_flops=_count("per_step_flops", raw.get("per_step_flops", 0)),
            steps_done=_count("steps_done", raw.get("steps_done", 0)),
            planned_flops=_count("planned_flops", raw.get("planned_flops", 0)),
            config=raw.get("config") if isinstance(raw.get("config"), dict) else {},
            updated=str(raw.get("updated", "")),
        )
    except ValueError as e:
        raise LedgerError(f"{path}: {e}") from None


def read_ledger(runs_dir) -> list[LedgerRow]:
    """Every `flops.json` under `runs_dir` (any depth), sorted by run name then path. No directory: no runs yet."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        return []
    if not runs_dir.is_dir():
        raise LedgerError(f"{runs_dir}: not a directory (expected the directory that holds the training runs)")
    rows = [_read_record(path) for path in runs_dir.rglob(RECORD_NAME) if path.is_file()]
    return sorted(rows, key=lambda row: (row.run_name, str(row.path)))


def _is_excluded(row: LedgerRow, exclude) -> bool:
    """`exclude` names a run by its run_name or by its directory."""
    if exclude is None:
        return False
    if row.run_name == str(exclude):
        return True
    try:
        return row.run_dir.resolve() == Path(exclude).resolve()
    except OSError:
        return False


def spent(runs_dir, exclude=None) -> int:
    """FLOPs used by all runs under `runs_dir`, except the run `exclude` (a run name or a run directory)."""
    return sum(row.flops_used for row in read_ledger(runs_dir) if not _is_excluded(row, exclude))


# ---- the check before a run ----------------------------------------------------------------------------------------

def check_budget(planned_flops, runs_dir, max_flops=DEFAULT_BUDGET, exclude_run=None, *,
                 per_step_flops=None) -> int:
    """Raise BudgetExceeded unless `planned_flops` + what the runs under `runs_dir` spent <= `max_flops`.

    Resuming a run: pass its whole plan as `planned_flops` and the run as `exclude_run` (name or directory), so the
    steps it already did are not counted twice. With `per_step_flops`, the message says how many steps would fit.
    Returns the budget left after the planned run."""
    planned = _count("planned_flops", planned_flops)
    budget = _count("max_flops", max_flops)
    already = spent(runs_dir, exclude=exclude_run)
    total = planned + already
    if total > budget:
        left = max(budget - already, 0)
        message = (f"planned {format_flops(planned)} FLOPs + {format_flops(already)} already spent in {runs_dir} = "
                   f"{format_flops(total)} > budget {format_flops(budget)} "
                   f"(log10: {_log10_text(planned)} + {_log10_text(already)} = {_log10_text(total)} > "
                   f"{_log10_text(budget)}); {format_flops(left)} FLOPs left")
        if per_step_flops:
            per_step = _count("per_step_flops", per_step_flops)
            message += f", enough for {left // per_step:,} steps of {format_flops(per_step)} FLOPs"
        raise BudgetExceeded(message)
    return budget - total


@dataclass(frozen=True)
class RunPlan:
    """A run that fits the budget: its size and what is left of the budget after it."""
    steps: int
    per_step_flops: int
    planned_flops: int
    spent_before: int
    max_flops: int

    @property
    def remaining_after(self) -> int:
        return self.max_flops - self.spent_before - self.planned_flops


def plan_run(model: nn.Module, *, steps: int, batch: int, ctx: int, runs_dir, max_flops=DEFAULT_BUDGET,
             gqa: str = "real", exclude_run=None) -> RunPlan:
    """Planned FLOPs of a training run (steps x FLOPs per step of `model` at batch x ctx); raises BudgetExceeded
    before anything is trained if they do not fit in what the runs under `runs_dir` left of `max_flops`.

    Call it after LoRA is injected: the adapters are part of the count. Works on a meta-device model."""
    steps = _count("steps", steps)
    per_step = count_forward(model, batch, ctx, gqa=gqa).step
    planned = steps * per_step
    budget = _count("max_flops", max_flops)
    remaining_after = check_budget(planned, runs_dir, budget, exclude_run, per_step_flops=per_step)
    return RunPlan(steps, per_step, planned, spent_before=budget - remaining_after - planned, max_flops=budget)


# ---- the ledger as a table -----------------------------------------------------------------------------------------

def format_ledger(rows: list[LedgerRow], max_flops=DEFAULT_BUDGET) -> str:
    """One line per run (steps, FLOPs per step, FLOPs used, cumulative, with log10 figures), then the budget."""
    budget = _count("max_flops", max_flops)
    name_width = max([len("run"), *(len(row.run_name) for row in rows)])
    header = (f"{'run':<{name_width}}  {'steps':>8}  {'per step':>9}  {'used':>9}  {'log10':>6}  "
              f"{'cumulative':>10}  {'log10':>6}  {'of budget':>9}  {'planned':>9}")
    lines = [header, "-" * len(header)]
    cumulative = 0
    for row in rows:
        cumulative += row.flops_used
        lines.append(f"{row.run_name:<{name_width}}  {row.steps_done:>8,}  {format_flops(row.per_step_flops):>9}  "
                     f"{format_flops(row.flops_used):>9}  {_log10_text(row.flops_used):>6}  "
                     f"{format_flops(cumulative):>10}  {_log10_text(cumulative):>6}  "
                     f"{100 * cumulative / budget if budget else 0:>8.2f}%  {format_flops(row.planned_flops):>9}")
    if not rows:
        lines.append("(no runs recorded yet)")
    lines.append("-" * len(header))
    remaining = budget - cumulative
    lines.append(f"spent     {format_flops(cumulative):>9}  (log10 {_log10_text(cumulative)}) in {len(rows)} run(s)")
    lines.append(f"budget    {format_flops(budget):>9}  (log10 {_log10_text(budget)})")
    if remaining >= 0:
        lines.append(f"remaining {format_flops(remaining):>9}  (log10 {_log10_text(remaining)}), "
                     f"{100 * remaining / budget if budget else 0:.2f}% of the budget")
    else:
        lines.append(f"OVER BUDGET by {format_flops(-remaining)} FLOPs (log10 {_log10_text(-remaining)})")
    return "\n".join(lines)
