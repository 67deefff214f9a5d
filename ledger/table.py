"""The ledger as people read it: a text table (flops.py --runs DIR) and a JSON summary (--json, report.py)."""
from __future__ import annotations

from pathlib import Path

from qwen_mini.flop_report import format_flops, log10

from .ledger import totals
from .records import KINDS, Record, log10_text


def summary(records: list[Record], max_flops: int, runs_dir=None) -> dict:
    """total (all FLOPs spent), by_kind, reserved (by running jobs), budget, remaining (after spent and reserved),
    over_budget, gqa, and one entry per record with its cumulative total."""
    t = totals(records)
    cumulative, runs = 0, []
    for record in records:
        cumulative += record.flops_used
        runs.append({"run_name": record.run_name, "dir": record_label(record, runs_dir), "path": str(record.path),
                     "gqa": record.gqa,
                     "flops_used": record.flops_used, "by_kind": record.by_kind,
                     "log10_flops_used": log10(record.flops_used) if record.flops_used else None,
                     "cumulative_flops": cumulative, "reserved": record.outstanding,
                     "reservations": record.reservations, "steps_done": record.steps_done,
                     "per_step_flops": record.per_step_flops, "planned_flops": record.planned_flops,
                     "forecasts": len(record.forecasts), "config": record.config})
    remaining = max_flops - t.committed
    return {"total": t.spent, "log10_total": log10(t.spent) if t.spent else None, "by_kind": t.by_kind,
            "reserved": t.outstanding, "budget": max_flops, "remaining": remaining, "over_budget": t.spent > max_flops,
            "gqa": sorted({r.gqa for r in records}), "runs": runs}


def record_label(record: Record, runs_dir=None) -> str:
    """A record's name in tables: its directory relative to the runs directory (run names repeat across stages)."""
    if runs_dir is not None:
        try:
            return str(record.run_dir.resolve().relative_to(Path(runs_dir).resolve()))
        except ValueError:
            pass
    return record.run_name


def format_ledger(records: list[Record], max_flops: int, runs_dir=None, cap_source: str = "") -> str:
    """One line per record (FLOPs by kind, total, cumulative, share of the budget, reserved), then the totals.
    Records are named by their directory under `runs_dir` when given, else by run name; `cap_source` says where the
    budget comes from (`Ledger.cap_source`)."""
    names = [record_label(r, runs_dir) for r in records]
    name_width = max([len("run"), *(len(name) for name in names)])
    header = (f"{'run':<{name_width}}  {'steps':>7}  {'train':>9}  {'eval':>9}  {'forecast':>9}  {'total':>9}  "
              f"{'log10':>6}  {'cumulative':>10}  {'of budget':>9}  {'reserved':>9}")
    lines = [header, "-" * len(header)]
    cumulative = 0
    for r, name in zip(records, names):
        cumulative += r.flops_used
        kinds = "  ".join(f"{format_flops(r.by_kind[k]):>9}" for k in KINDS)
        lines.append(f"{name:<{name_width}}  {r.steps_done:>7,}  {kinds}  {format_flops(r.flops_used):>9}  "
                     f"{log10_text(r.flops_used):>6}  {format_flops(cumulative):>10}  "
                     f"{100 * cumulative / max_flops if max_flops else 0:>8.2f}%  "
                     f"{format_flops(r.outstanding) if r.outstanding else '-':>9}")
    if not records:
        lines.append("(no runs recorded yet)")
    lines.append("-" * len(header))
    t = totals(records)
    gqa = ", ".join(sorted({r.gqa for r in records})) or "-"
    lines.append(f"spent     {format_flops(t.spent):>9}  (log10 {log10_text(t.spent)}) in {len(records)} record(s): "
                 + ", ".join(f"{k} {format_flops(v)}" for k, v in t.by_kind.items()) + f"; gqa={gqa}")
    if t.outstanding:
        lines.append(f"reserved  {format_flops(t.outstanding):>9}  by running jobs (released when they end, or by "
                     "flops.py --runs DIR --settle once their process is gone)")
    lines.append(f"budget    {format_flops(max_flops):>9}  (log10 {log10_text(max_flops)})"
                 + (f"; cap {cap_source}" if cap_source else ""))
    remaining = max_flops - t.committed
    if t.spent > max_flops:
        lines.append(f"OVER BUDGET by {format_flops(t.spent - max_flops)} FLOPs (log10 "
                     f"{log10_text(t.spent - max_flops)})")
    elif remaining >= 0:
        lines.append(f"remaining {format_flops(remaining):>9}  (log10 {log10_text(remaining)}), "
                     f"{100 * remaining / max_flops if max_flops else 0:.2f}% of the budget")
    else:
        lines.append(f"remaining none: spent + reserved exceed the budget by {format_flops(-remaining)} FLOPs")
    return "\n".join(lines)
