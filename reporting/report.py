"""One Markdown report of everything in a runs directory (`report.py RUNS_DIR`): report.md and its PNGs, a report
a student can hand in next to the coursework reports, and one a marker can check: every number of the Findings and
Conclusions is printed, the same way, in a table of the report.

    # Report: <model> fine-tuned with LoRA on <data>     the first line (setup.py)
    ## Findings      each stage's winner, by which criterion and margin, against the noise measured on that
                     criterion, split into what step 0 held and what training added where the settings change the
                     untouched model; fine-tuned vs zero-shot with paired bootstrap intervals; every baseline the
                     fine-tuned model loses to, by score (findings.py)
    ## Conclusions   what fine-tuning bought, which settings mattered, what the budget bought, what to try next
    ## Setup         the model's architecture, an LLMTIME example (text, tokens, scaler), the split
    ## Runs          the seed replicates and the noise; per stage in the study's order: its Runs table (short
                     names), winner, margin table, loss curves, heat map, loss against context (stages.py)
    ## Results       per forecast: fine-tuned, zero-shot and baselines per species, the changes, the bootstrap
                     intervals, loss curve, error against horizon, error distribution, trajectories
                     (forecasts.py)
    ## Budget, ## FLOPs   the ledger against the budget, counting rules, per component, per stage with what it
                     bought, per record, the reconciliation with the seed reports (flops.py)
    ## Unreadable    runs and forecasts the report could not read, by name (also on stderr)

Everything is read from disk: the report can be written again at any time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from common.fileio import atomic_write
from ledger import DEFAULT_BUDGET, LedgerError, read_cap, read_records
from study.plan import STUDY_FILE
from training.run import PLOT_NAME

from .findings import StageGain, conclusions, findings, stage_gain
from .flops import budget_section, flop_section, left_share, stage_flops, step_setting
from .forecasts import results_section
from .results import forecast_results, moved_study
from .runs import collect_groups, collect_runs, stage_noises
from .setup import data_files, overview, setup_section, title
from .stages import group_section, noise_section

REPORT_NAME = "report.md"


class ReportError(ValueError):
    """A runs directory the report cannot be made of."""


def read_studies(runs_dir: Path, unreadable: list[str]) -> list[tuple[Path, dict]]:
    studies = []
    for path in sorted(runs_dir.rglob(STUDY_FILE)):
        try:
            study = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            unreadable.append(f"study {path}: {e}")
            continue
        if isinstance(study, dict):
            studies.append((path, moved_study(path, study)))
        else:
            unreadable.append(f"study {path}: not a JSON object")
    return studies


def write_report(runs_dir, out=None, max_flops: int | None = None, warn=None) -> Path:
    """report.md and its PNGs in `out` (default: the runs directory); returns report.md's path. Every run or file
    that cannot be read is named in the report and passed to `warn` (default: a line on stderr)."""
    warn = warn or (lambda line: print(f"report.py: warning: {line}", file=sys.stderr))
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir}: {'not a directory' if runs_dir.exists() else 'no such directory'}")
    out = Path(out) if out is not None else runs_dir
    unreadable_records: list[str] = []  # a record the ledger cannot read is named; the others are reported
    records = read_records(runs_dir, unreadable_records)
    runs, unreadable = collect_runs(runs_dir, {r.run_dir.resolve(): r for r in records})
    unreadable[:0] = [f"FLOP record {line}" for line in unreadable_records]
    studies = read_studies(runs_dir, unreadable)
    if not runs and not records and not unreadable:
        raise ReportError(f"{runs_dir}: no runs and no FLOP records to report on")
    budget = max_flops or recorded_cap(runs_dir, unreadable) or _study_budget(studies) or DEFAULT_BUDGET
    gqa = ", ".join(sorted({r.gqa for r in records})) or "real"
    groups = collect_groups(runs, studies)
    # Per stage, from its own study: the noise of its criterion, and of the whole-window loss (what a run's change
    # from step 0 is held against).
    noises, wholes, replicates = stage_noises(groups, runs)
    figures = out / "report_figures"
    group_flops = stage_flops(records, runs_dir, studies)
    results = forecast_results(studies, records, runs_dir, unreadable)
    by_name = {g.name: g for g in groups}
    gains = [stage_gain(by_name[name], groups, flops) if name in by_name else StageGain(name, flops)
             for name, flops in group_flops.items()]
    data = data_files(studies, runs, results)
    body = []  # the sections after the Conclusions, made first: they read files whose faults the overview counts
    body += setup_section(runs, results)
    if runs:
        body += ["## Runs", "", "Per stage, in the study's order. `val @0`: validation loss before training (whole "
                 "windows); `last N`: over the last N targets of each window, the same positions at every context "
                 "length (what `from = \"<stage>\"` compares runs at different context lengths by).", ""]
        body += noise_section(replicates, list(dict.fromkeys([*wholes.values(), *noises.values()])))
        for group in groups:
            body += group_section(group, figures, out, wholes[group.name], budget)
    if results:
        body += ["## Results", ""]
        by_dir = {r.run_dir.resolve(): r for r in runs}
        for result in results:
            run = by_dir.get(result.run_dir.resolve()) if result.run_dir else None
            body += results_section(result, out, figures, run.run_dir / PLOT_NAME if run else None, unreadable)
    body += budget_section(records, group_flops, budget, figures, out)
    settings = list(dict.fromkeys(s for s in (step_setting(r.config) for r in runs) if s is not None))
    body += flop_section(settings, records, runs_dir, gains, budget, gqa.split(", ")[0])
    for line in unreadable:
        warn(line)
    if unreadable:
        body += ["## Unreadable", "", "Left out of everything above:", ""] + [f"- {u}" for u in unreadable] + [""]
    lines = [title(runs, results, data), ""] + overview(runs_dir, runs, results, unreadable, data, gqa)
    lines += findings(groups, noises, wholes, results)
    lines += conclusions(groups, noises, results, [g for g in gains if g.name in by_name],
                         left_share(records, budget))
    path = out / REPORT_NAME
    text = "\n".join(lines + body) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def recorded_cap(runs_dir: Path, unreadable: list[str]) -> int | None:
    """The runs directory's recorded FLOP cap (ledger.cap), the one every job there draws on; an unreadable cap file
    is named and the report goes on without it."""
    try:
        cap = read_cap(runs_dir)
    except LedgerError as e:
        unreadable.append(f"FLOP cap {e}")
        return None
    return cap.max_flops if cap is not None else None


def _study_budget(studies: list[tuple[Path, dict]]) -> int | None:
    budgets = {s.get("max_flops") for _, s in studies if isinstance(s.get("max_flops"), int)}
    return min(budgets) if budgets else None
