"""One Markdown report of everything in a runs directory (`report.py RUNS_DIR`): report.md and its PNGs, a report
a student can hand in next to the coursework reports.

    ## Findings      what the numbers say: each stage's winner and its margin, fine-tuned vs zero-shot vs baselines,
                     what did not change beyond the noise
    ## Budget        the ledger by kind and by group; budget.png on a log axis from 1e9 to 1e17
    ## FLOPs         the counting rules, FLOPs per step per component for every distinct setting, per-stage and
                     per-run FLOPs with % of the budget, the reconciliation with the seed reports (report_flops.py)
    ## Runs          every run: settings, steps, step-0 / best / final validation loss, change, improved or not
    ## <group>       per study stage (else parent directory): loss curves, heat map of the change from step 0 over
                     lr x rank, validation loss against context length; the criterion that chose the stage's winner
    ## Results       per forecast stage: fine-tuned, zero-shot and baselines in one table per species, with changes;
                     loss curve, error vs horizon, trajectory plots (report_results.py)
    ## Unreadable    runs and forecasts the report could not read, by name (also on stderr)

Everything is read from disk: the report can be written again at any time.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.fileio import atomic_write
from ledger import KINDS, DEFAULT_BUDGET, Record, read_records, record_label, totals
from qwen_mini.flop_report import format_flops
from training.config import TRAJECTORY_KEYS
from training.run import CONFIG_NAME, METRICS_NAME, PLOT_NAME, read_metrics, read_run_config

from . import report_figures as figs
from .report_figures import slug
from .report_flops import RULES, component_table, reconciliation, step_setting
from .report_results import (FINE_TUNED, ZERO_SHOT, StageResult, best_baseline, moved_out, moved_study,
                             results_section, stage_results, summary_fault)
from .plan import STUDY_FILE
from .selection import best_finite, choose_best

REPORT_NAME = "report.md"
NOISE_FRACTION = 0.005  # without seed replicates: a change under 0.5 % of the step-0 loss is not a finding


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
        return [(m["step"], m["val_loss"]) for m in self.metrics if isinstance(m.get("val_loss"), (int, float))]

    @property
    def val0(self) -> float | None:
        return next((v for s, v in self.val if s == 0), None)

    @property
    def best_val(self) -> float | None:
        return best_finite(v for _, v in self.val)

    @property
    def final_val(self) -> float | None:
        return self.val[-1][1] if self.val else None

    @property
    def change(self) -> float | None:
        """Best validation loss minus the step-0 loss (negative: improved)."""
        return None if self.best_val is None or self.val0 is None else self.best_val - self.val0

    @property
    def steps(self) -> int:
        return max((m["step"] for m in self.metrics), default=0)

    def flops(self, kind: str) -> int:
        return self.record.by_kind[kind] if self.record is not None else 0

    @property
    def total_flops(self) -> int:
        return sum(self.flops(k) for k in KINDS)


@dataclass
class Group:
    name: str
    runs: list[RunInfo]
    varied: list[str] = field(default_factory=list)
    criterion: str | None = None  # what chose the stage's winner
    best: RunInfo | None = None


REPORTED_SETTINGS = ("lr", "rank", "batch", "ctx", "steps")


def collect_runs(runs_dir: Path, records: dict[Path, Record]) -> tuple[list[RunInfo], list[str]]:
    """The training runs under `runs_dir`, and one line per run directory that could not be read."""
    runs, unreadable = [], []
    for config_path in sorted(runs_dir.rglob(CONFIG_NAME)):
        run_dir = config_path.parent
        if not (run_dir / METRICS_NAME).is_file():
            continue  # a model directory's config.json (model/, adapter/), not a run
        label = str(run_dir.relative_to(runs_dir))
        try:
            config = read_run_config(run_dir)
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: not a JSON object (a {type(config).__name__})")
            missing = [key for key in REPORTED_SETTINGS if key not in config]
            if missing:  # what the tables and the FLOP section show of every run
                raise ValueError(f"{config_path}: not a train.py run config (missing {', '.join(missing)})")
            metrics = read_metrics(run_dir, drop_torn_tail=True)
        except (ValueError, OSError) as e:
            unreadable.append(f"run {label}: {e}")
            continue
        runs.append(RunInfo(run_dir, label, config, metrics, records.get(run_dir.resolve())))
    return runs, unreadable


def read_json(path: Path, unreadable: list[str], what: str):
    """A JSON file's content, or None with a line in `unreadable` if it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        unreadable.append(f"{what} {path}: {e}")
        return None


def read_studies(runs_dir: Path, unreadable: list[str]) -> list[tuple[Path, dict]]:
    studies = []
    for path in sorted(runs_dir.rglob(STUDY_FILE)):
        study = read_json(path, unreadable, "study")
        if isinstance(study, dict):
            studies.append((path, moved_study(path, study)))
        elif study is not None:
            unreadable.append(f"study {path}: not a JSON object")
    return studies


def collect_groups(runs: list[RunInfo], studies: list[tuple[Path, dict]]) -> list[Group]:
    """The training stages of every study (their study.json), then the other runs by parent directory."""
    by_dir = {r.run_dir.resolve(): r for r in runs}
    groups, grouped = [], set()
    for path, study in studies:
        for stage in study.get("stages", []):
            if not isinstance(stage, dict) or stage.get("kind") != "train":
                continue
            members = [by_dir[Path(d).resolve()] for d in stage.get("runs", []) if Path(d).resolve() in by_dir]
            if members:
                best = by_dir.get(Path(stage.get("best", "")).resolve())
                groups.append(Group(f"{study.get('name', path.parent.name)}/{stage['name']}", members,
                                    stage.get("varied", []), stage.get("criterion"), best))
                grouped.update(id(m) for m in members)
    rest: dict[str, list[RunInfo]] = {}
    for run in runs:
        if id(run) not in grouped:
            rest.setdefault(str(Path(run.label).parent), []).append(run)
    for name, members in sorted(rest.items()):
        groups.append(Group(name if name != "." else "(top level)", members, varied_settings(members)))
    for group in groups:
        if group.criterion is None or group.best is None:  # runs outside a study: the same rule picks
            choice = choose_best([r.run_dir for r in group.runs])
            if choice is not None:
                group.criterion, group.best = choice.criterion, group.runs[choice.index]
    return groups


def varied_settings(runs: list[RunInfo]) -> list[str]:
    """The settings that differ between the runs (the stride only where the context does not explain it)."""
    keys = dict.fromkeys(("lr", "rank", "ctx", "steps", *TRAJECTORY_KEYS))
    varied = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    return [k for k in varied if not (k == "stride" and "ctx" in varied)]


def seed_noise(runs: list[RunInfo]) -> tuple[float | None, str]:
    """The seed-to-seed spread of the best validation loss (runs equal in every setting but the seed), else None
    and what is used instead."""
    by_setting: dict[str, list[float]] = {}
    for r in runs:
        if r.best_val is not None:
            key = json.dumps({k: r.config.get(k) for k in (*TRAJECTORY_KEYS, "steps") if k != "seed"}, sort_keys=True)
            by_setting.setdefault(key, []).append(r.best_val)
    spreads = [max(v) - min(v) for v in by_setting.values() if len(v) > 1]
    if spreads:
        return max(spreads), f"the largest spread between seeds of one setting ({max(spreads):.4g})"
    return None, f"no seed replicates: {100 * NOISE_FRACTION:g} % of each run's step-0 loss"


def noise_of(run: RunInfo, noise: float | None) -> float:
    return noise if noise is not None else NOISE_FRACTION * abs(run.val0 or 0.0)


def improved(run: RunInfo, noise: float | None) -> bool:
    """Best validation loss below the step-0 loss by more than the noise."""
    return run.change is not None and run.change < -noise_of(run, noise)


def _loss(value) -> str:
    return "-" if value is None else ("NaN" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}")


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _share(flops: int, budget: int) -> str:
    return f"{100 * flops / budget:.3g} %" if budget else "-"


def _image(path: Path, out: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(out).as_posix()})"


# ---- sections ------------------------------------------------------------------------------------------------------

def runs_table(runs: list[RunInfo], noise: float | None, budget: int) -> list[str]:
    lines = ["| run | model | LoRA | lr | ctx | batch | steps | val @0 | best val | final val | change | verdict | "
             "train FLOPs | eval FLOPs | forecast FLOPs | total | % budget |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r.config
        lora = "full" if c.get("full") else f"r{c.get('rank')} ({','.join(c.get('targets') or [])})"
        verdict = "-" if r.change is None else ("improved" if improved(r, noise) else "**not improved**")
        change = "-" if r.change is None else f"{r.change:+.4g}"
        model = Path(str(c.get("model"))).name
        lines.append(f"| {r.label} | {model} | {lora} | {_value(c.get('lr'))} | {c.get('ctx')} | {c.get('batch')} "
                     f"| {r.steps}/{c.get('steps')} | {_loss(r.val0)} | {_loss(r.best_val)} | {_loss(r.final_val)} "
                     f"| {change} | {verdict} | {format_flops(r.flops('train'))} "
                     f"| {format_flops(r.flops('eval'))} | {format_flops(r.flops('forecast'))} "
                     f"| {format_flops(r.total_flops)} | {_share(r.total_flops, budget)} |")
    return lines


def context_points(group: Group) -> tuple[dict, int | None]:
    """{label: [(ctx, best whole-window loss, best last-N loss)]} of runs that differ only in context length, and
    the N all of them recorded."""
    from .selection import best_last_loss, common_last_count

    sets: dict[str, list[RunInfo]] = {}
    for run in group.runs:
        key = json.dumps({k: run.config.get(k) for k in (*TRAJECTORY_KEYS, "steps") if k not in ("ctx", "stride")},
                         sort_keys=True)
        sets.setdefault(key, []).append(run)
    sweeps, members_all = {}, []
    for members in sets.values():
        by_ctx = {}
        for run in members:
            by_ctx.setdefault(run.config.get("ctx"), run)
        if len(by_ctx) >= 2:
            first = members[0].config
            label = f"lr {_value(first.get('lr'))}, " + ("full" if first.get("full") else f"rank {first.get('rank')}")
            sweeps[label] = sorted(by_ctx.values(), key=lambda r: r.config.get("ctx"))
            members_all += sweeps[label]
    n = common_last_count([r.metrics for r in members_all]) if members_all else None
    return {label: [(r.config["ctx"], r.best_val, best_last_loss(r.metrics, n) if n else None) for r in runs]
            for label, runs in sweeps.items()}, n


def group_section(group: Group, figures: Path, out: Path, noise: float | None, budget: int) -> list[str]:
    lines = [f"## {group.name}", ""]
    if group.varied:
        lines += [f"Varied: {', '.join(group.varied)}.", ""]
    if group.best is not None:
        lines += [f"Winner: `{group.best.label}`, chosen by the {group.criterion}.", ""]
    name = slug(group.name)
    if len(group.runs) >= 2:
        curves = [(", ".join(f"{k}={_value(r.config.get(k))}" for k in (group.varied or ["lr", "rank", "ctx"])),
                   [(m["step"], m["train_loss"]) for m in r.metrics if isinstance(m.get("train_loss"), (int, float))],
                   r.val) for r in group.runs]
        lines += [_image(figs.plot_group_losses(figures / f"loss_{name}.png", group.name, curves), out,
                         "loss curves"), ""]
    cells = {(r.config.get("lr"), r.config.get("rank")): (r.change, r.steps, 100 * r.total_flops / budget,
                                                          improved(r, noise))
             for r in group.runs if not r.config.get("full")}
    lrs, ranks = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
    if len(lrs) >= 2 or len(ranks) >= 2:
        threshold = max(noise_of(r, noise) for r in group.runs)
        lines += [_image(figs.plot_heatmap(figures / f"heatmap_{name}.png", group.name, lrs, ranks, cells,
                                           threshold), out,
                         "change of the best validation loss from step 0 over lr x rank"), ""]
    sweeps, n = context_points(group)
    if sweeps:
        lines += [_image(figs.plot_context(figures / f"context_{name}.png", group.name, sweeps, n), out,
                         "validation loss against context length"), ""]
        if n is None:
            lines.append("The runs recorded no last-N validation losses: their whole-window losses are not "
                         "comparable across context lengths.")
    if len(group.runs) == 1:
        run = group.runs[0]
        lines.append(f"One run: best validation loss {_loss(run.best_val)} after {run.steps} steps "
                     f"(step 0: {_loss(run.val0)}).")
    return lines + [""]


def flop_section(runs: list[RunInfo], records: list[Record], runs_dir: Path, group_flops: dict[str, int],
                 budget: int, gqa: str) -> list[str]:
    lines = ["## FLOPs", "", f"Attention convention of every count here: gqa={gqa}.", "",
             "| rule | count |", "|---|---|"] + [f"| {rule} | {text} |" for rule, text in RULES] + [""]
    settings = list(dict.fromkeys(s for s in (step_setting(r.config) for r in runs) if s is not None))
    if settings:
        lines += component_table(settings, gqa) + [""]
    lines += ["FLOPs per stage (study stage, else directory):", "", "| stage | FLOPs | % of budget |", "|---|---|---|"]
    lines += [f"| {name} | {format_flops(flops)} | {_share(flops, budget)} |"
              for name, flops in sorted(group_flops.items(), key=lambda kv: -kv[1])]
    lines += ["", "FLOPs per record of the ledger (every run and forecast):", "",
              "| record | train | eval | forecast | total | % of budget |", "|---|---|---|---|---|---|"]
    for record in records:
        k = record.by_kind
        lines.append(f"| {record_label(record, runs_dir)} | {format_flops(k['train'])} | {format_flops(k['eval'])} | "
                     f"{format_flops(k['forecast'])} | {format_flops(record.flops_used)} | "
                     f"{_share(record.flops_used, budget)} |")
    return lines + [""] + reconciliation(gqa)


def findings(groups: list[Group], runs: list[RunInfo], results: list[StageResult], noise: float | None,
             noise_how: str) -> list[str]:
    """What the study found, stated from the numbers only."""
    lines = ["## Findings", "", f"Noise threshold: {noise_how}.", ""]
    for group in groups:
        if len(group.runs) < 2 or group.best is None:
            continue
        choice = choose_best([r.run_dir for r in group.runs])
        if choice is None:
            continue
        ranked = sorted((s, i) for i, s in enumerate(choice.scores) if s is not None)
        winner = group.runs[ranked[0][1]]
        text = f"- **{group.name}**: `{winner.label}` won by the {choice.criterion} ({ranked[0][0]:.4f})"
        if len(ranked) > 1:
            margin, threshold = ranked[1][0] - ranked[0][0], noise_of(winner, noise)
            text += (f", {margin:.4g} below the runner-up `{group.runs[ranked[1][1]].label}`: "
                     + ("beyond the noise." if margin > threshold else
                        f"**within the noise** ({threshold:.3g}): this stage did not tell its settings apart."))
        lines.append(text)
    flat = [r for r in runs if r.change is not None and not improved(r, noise)]
    if flat:
        lines.append(f"- {len(flat)} of {len(runs)} runs did not improve their validation loss on step 0 beyond the "
                     f"noise: {', '.join(f'`{r.label}` ({r.change:+.4g})' for r in flat)}.")
    for result in results:
        fine = result.methods.get(FINE_TUNED) or {}
        for species in ("prey", "predator"):
            mse = (fine.get(species) or {}).get("mse")
            if not isinstance(mse, (int, float)):
                continue
            parts = [f"MSE {mse:.4g}"]
            zero = ((result.methods.get(ZERO_SHOT) or {}).get(species) or {}).get("mse")
            if isinstance(zero, (int, float)) and zero:
                parts.append(f"{'better' if mse < zero else 'worse'} than zero-shot ({zero:.4g}, "
                             f"{100 * (mse - zero) / zero:+.1f} %)")
            best = best_baseline(result, species)
            if best is not None:
                ref = result.methods[best][species]["mse"]
                parts.append(f"{'better' if mse < ref else 'worse'} than the best baseline {best} ({ref:.4g}"
                             + (f", {100 * (mse - ref) / ref:+.1f} %)" if ref else ")"))
            where = f" (`{result.out.name}`)" if result.out.name not in ("forecast", result.name) else ""
            lines.append(f"- **{result.name}**{where}, {species}: the fine-tuned model's " + "; ".join(parts) + ".")
    return lines + [""]


def budget_section(records: list[Record], group_flops: dict[str, int], budget: int, figures: Path,
                   out: Path) -> list[str]:
    t = totals(records)
    lines = ["## Budget", "",
             "| | train | eval | forecast | total | reserved | budget | left |", "|---|---|---|---|---|---|---|---|",
             f"| FLOPs | {format_flops(t.by_kind['train'])} | {format_flops(t.by_kind['eval'])} | "
             f"{format_flops(t.by_kind['forecast'])} | {format_flops(t.spent)} | {format_flops(t.outstanding)} | "
             f"{format_flops(budget)} | {format_flops(budget - t.committed)} |",
             f"| share of budget | {_share(t.by_kind['train'], budget)} | {_share(t.by_kind['eval'], budget)} | "
             f"{_share(t.by_kind['forecast'], budget)} | {_share(t.spent, budget)} | {_share(t.outstanding, budget)}"
             f" | 100 % | {_share(budget - t.committed, budget)} |", ""]
    if t.spent > budget:
        lines += [f"**OVER BUDGET by {format_flops(t.spent - budget)} FLOPs.**", ""]
    by_kind = {**{k: t.by_kind[k] for k in KINDS}, **({"reserved": t.outstanding} if t.outstanding else {})}
    return lines + [_image(figs.plot_budget(figures / "budget.png", by_kind, group_flops, budget), out,
                           "the ledger on a log axis"), ""]


def stage_flops(records: list[Record], runs_dir: Path, studies: list[tuple[Path, dict]]) -> dict[str, int]:
    """FLOPs per study stage (by the directory a record sits in under its study), else per record."""
    stage_dirs = {}
    for path, study in studies:
        for stage in study.get("stages", []):
            if isinstance(stage, dict) and "name" in stage:
                stage_dirs[(path.parent / stage["name"]).resolve()] = f"{study.get('name', path.parent.name)}/" \
                                                                      f"{stage['name']}"
    flops: dict[str, int] = {}
    for record in records:
        where = record.run_dir.resolve()
        key = next((name for d, name in stage_dirs.items() if where == d or d in where.parents),
                   record_label(record, runs_dir))
        flops[key] = flops.get(key, 0) + record.flops_used
    return flops


def write_report(runs_dir, out=None, max_flops: int | None = None, warn=None) -> Path:
    """report.md and its PNGs in `out` (default: the runs directory); returns report.md's path. Every run or file
    that cannot be read is named in the report and passed to `warn` (default: a line on stderr)."""
    warn = warn or (lambda line: print(f"report.py: warning: {line}", file=sys.stderr))
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir}: {'not a directory' if runs_dir.exists() else 'no such directory'}")
    out = Path(out) if out is not None else runs_dir
    records = read_records(runs_dir)
    runs, unreadable = collect_runs(runs_dir, {r.run_dir.resolve(): r for r in records})
    studies = read_studies(runs_dir, unreadable)
    if not runs and not records and not unreadable:
        raise ReportError(f"{runs_dir}: no runs and no FLOP records to report on")
    budget = max_flops or _study_budget(studies) or DEFAULT_BUDGET
    gqa = ", ".join(sorted({r.gqa for r in records})) or "real"
    groups = collect_groups(runs, studies)
    noise, noise_how = seed_noise(runs)
    figures = out / "report_figures"
    group_flops = stage_flops(records, runs_dir, studies)
    results = forecast_results(studies, records, runs_dir, unreadable)
    for line in unreadable:
        warn(line)
    lines = [f"# Report of `{runs_dir}`", "",
             f"{len(runs)} training run(s), {len(results)} forecast result(s), {len(unreadable)} unreadable. "
             f"Counting convention: gqa={gqa}; backward = 2 x forward; evaluation = forward with loss; forecasts = "
             "prefill once per prompt + every KV-cache decode step.", ""]
    lines += findings(groups, runs, results, noise, noise_how)
    lines += budget_section(records, group_flops, budget, figures, out)
    lines += flop_section(runs, records, runs_dir, group_flops, budget, gqa.split(", ")[0])
    if runs:
        lines += ["## Runs", "", "`val @0`: validation loss before training; `change`: best minus step 0; "
                  f"`not improved`: within the noise ({noise_how}) or above step 0.", ""]
        lines += runs_table(runs, noise, budget) + [""]
    for group in groups:
        lines += group_section(group, figures, out, noise, budget)
    if results:
        lines += ["## Results", ""]
        by_dir = {r.run_dir.resolve(): r for r in runs}
        for result in results:
            run = by_dir.get(result.run_dir.resolve()) if result.run_dir else None
            curve = run.run_dir / PLOT_NAME if run is not None else None
            lines += results_section(result, out, figures, curve)
    if unreadable:
        lines += ["## Unreadable", "", "Left out of everything above:", ""] + [f"- {u}" for u in unreadable] + [""]
    path = out / REPORT_NAME
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def forecast_results(studies: list[tuple[Path, dict]], records: list[Record], runs_dir: Path,
                     unreadable: list[str]) -> list[StageResult]:
    """The results of every forecast of a trained run: a study's forecast stages, then the ledger's other ones."""
    def read_summary(out: Path):
        path = out / "metrics.json"
        if not path.is_file():
            unreadable.append(f"forecast {out}: no metrics.json")
            return None
        summary = read_json(path, unreadable, "forecast")
        fault = summary_fault(summary) if summary is not None else None
        if fault is not None:
            unreadable.append(f"forecast {path}: {fault}")
            return None
        return summary

    results, in_studies = [], set()
    for _, study in studies:
        stages = [s for s in study.get("stages", []) if isinstance(s, dict) and s.get("kind") == "forecast"]
        in_studies.update(str(Path(out).resolve()) for s in stages for out in s.get("forecasts", []))
        bases = [(Path(out), summary) for s in stages if s.get("of") == "base" for out in s.get("forecasts", [])
                 if (summary := read_summary(Path(out))) is not None]
        for stage in stages:
            if stage.get("of") != "base":
                results += stage_results(stage, bases, read_summary)
    for record in records:  # forecast.py --run outside a study: the run's own record holds its forecasts
        outs = dict.fromkeys(moved_out(e, record, runs_dir) for e in record.forecasts
                             if isinstance(e, dict) and e.get("out"))
        for out in outs:
            if str(Path(out).resolve()) not in in_studies and record.by_kind["train"]:
                stage = {"name": record_label(record, runs_dir), "forecasts": [out], "runs": [str(record.run_dir)]}
                results += stage_results(stage, [], read_summary)
    return results


def _study_budget(studies: list[tuple[Path, dict]]) -> int | None:
    budgets = {s.get("max_flops") for _, s in studies if isinstance(s.get("max_flops"), int)}
    return min(budgets) if budgets else None
