"""The report's results of each forecast stage and its Findings, from the numbers on disk only.

Per forecast stage (a study's `forecast = "<stage>"`): one table per species of the fine-tuned model, the zero-shot
(untrained) model and every baseline — MSE, MAE, R², median trajectory MSE and, where the forecast scored them, CRPS,
WQL, 80 % coverage, MASE and their geometric means relative to seasonal naive — with the fine-tuned model's change
against zero-shot and against the best baseline; the final run's loss curve; error against horizon with fine-tuned
and zero-shot in one figure; the trajectory plots of the named samples and of the best, median and worst trajectory
by MSE. The zero-shot row is the forecast's own "untrained" baseline, else the study's `forecast = "base"` stage when
it forecast the same trajectories under the same protocol.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from forecasting.evaluate import NAMED_SAMPLES, ranked_trajectories
from forecasting.metrics import SPECIES
from ledger import Record

from .report_figures import plot_horizon, slug

FINE_TUNED, ZERO_SHOT = "fine-tuned", "zero-shot"
POINT = (("mse", "MSE"), ("mae", "MAE"), ("r2", "R²"), ("median_trajectory_mse", "medMSE"))
PROBABILISTIC = (("crps", "CRPS"), ("wql", "WQL"), ("coverage_80", "cover 80 %"), ("mase", "MASE"),
                 ("wql_gmean_relative", "WQL rel. SN"), ("mase_gmean_relative", "MASE rel. SN"))
DIFFERENCE = ("r2", "coverage_80")  # changes of these are differences, of the error scores relative changes


@dataclass
class StageResult:
    """A forecast stage's numbers: methods' metrics by row name, and where its files are."""
    name: str
    out: Path
    summary: dict
    methods: dict[str, dict]  # row name -> metrics.json's per-method dict (per species)
    zero_shot_from: str | None  # where the zero-shot row came from
    run_dir: Path | None  # the fine-tuned run

    @property
    def baselines(self) -> list[str]:
        return [m for m in self.methods if m not in (FINE_TUNED, ZERO_SHOT)]


def stage_results(stage: dict, base_summaries: list[tuple[Path, dict]], read_summary) -> list[StageResult]:
    """The results of a forecast stage of study.json (one per forecast it made) that forecast a trained run."""
    results = []
    runs = [Path(r) for r in stage.get("runs", [])]
    for i, out in enumerate(stage.get("forecasts", [])):
        summary = read_summary(Path(out))
        if summary is None or not runs:
            continue
        metrics = {k: v for k, v in (summary.get("metrics") or {}).items() if isinstance(v, dict)}
        methods = {FINE_TUNED: metrics.get("model")} if metrics.get("model") else {}
        zero_from = None
        if metrics.get("untrained"):
            methods[ZERO_SHOT], zero_from = metrics["untrained"], "this forecast's untrained baseline"
        else:
            for base_out, base in base_summaries:
                if _same_forecast(base, summary) and (base.get("metrics") or {}).get("model"):
                    methods[ZERO_SHOT], zero_from = base["metrics"]["model"], f"`{base_out.name}` (forecast = \"base\")"
                    break
        methods.update({k: v for k, v in metrics.items() if k not in ("model", "untrained")})
        results.append(StageResult(stage["name"], Path(out), summary, methods, zero_from,
                                   runs[i] if i < len(runs) else runs[-1]))
    return results


def _same_forecast(a: dict, b: dict) -> bool:
    return a.get("trajectories") == b.get("trajectories") and a.get("protocol") == b.get("protocol")


def _cell(value, key: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100 * value:.0f} %" if key == "coverage_80" else f"{value:.4g}"


def change(new, old, key: str) -> str:
    """The fine-tuned value against a reference: relative change of an error score, difference of R² / coverage."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (new, old)):
        return "-"
    if key in DIFFERENCE:
        return f"{100 * (new - old):+.0f} pts" if key == "coverage_80" else f"{new - old:+.3g}"
    return f"{100 * (new - old) / abs(old):+.1f} %" if old else "-"


def best_baseline(result: StageResult, species: str) -> str | None:
    scored = [(m[species]["mse"], name) for name in result.baselines
              if (m := result.methods[name]) and isinstance((m.get(species) or {}).get("mse"), (int, float))
              and math.isfinite(m[species]["mse"])]
    return min(scored)[1] if scored else None


def results_tables(result: StageResult) -> list[str]:
    """One table per species: every method's scores, then the fine-tuned model's change against zero-shot and
    against the best baseline (lowest MSE)."""
    lines = []
    for species in SPECIES:
        keys = [(k, label) for k, label in (*POINT, *PROBABILISTIC)
                if any(k in (m or {}).get(species, {}) for m in result.methods.values())]
        lines += [f"**{species}**", "", "| method | " + " | ".join(label for _, label in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for name, m in result.methods.items():
            values = (m or {}).get(species, {})
            lines.append(f"| {name} | " + " | ".join(_cell(values.get(k), k) for k, _ in keys) + " |")
        fine = (result.methods.get(FINE_TUNED) or {}).get(species, {})
        references = [(ZERO_SHOT, "vs zero-shot")] if result.methods.get(ZERO_SHOT) else []
        best = best_baseline(result, species)
        if best is not None:
            references.append((best, f"vs best baseline ({best})"))
        for ref, label in references:
            values = result.methods[ref].get(species, {})
            lines.append(f"| *fine-tuned {label}* | "
                         + " | ".join(change(fine.get(k), values.get(k), k) for k, _ in keys) + " |")
        lines.append("")
    return lines


def _link(target: Path, out: Path, alt: str) -> str | None:
    """A Markdown image relative to the report's directory, or None if the file is not there (no dead link)."""
    if not target.is_file():
        return None
    return f"![{alt}]({Path(os.path.relpath(target.resolve(), out.resolve())).as_posix()})"


def trajectory_choices(result: StageResult) -> dict[str, int]:
    """{caption: trajectory index}: the named samples forecast, then the best, median and worst by model MSE (from
    per_trajectory.csv, ranked as the forecast ranked them to plot them)."""
    indices = result.summary.get("trajectories") or []
    choices = {f"sample {i} (named)": i for i in NAMED_SAMPLES if i in indices}
    path = result.out / "per_trajectory.csv"
    if path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        try:
            errors = {f"{s}_mse": [float(r[f"model_{s}_mse"] or "nan") for r in rows] for s in SPECIES}
            ranked = ranked_trajectories([int(r["index"]) for r in rows], errors,
                                         [r.get("scored") == "True" for r in rows])
        except (KeyError, ValueError):
            ranked = {}
        choices.update({f"{what} by MSE (trajectory {i})": i for what, i in ranked.items()})
    return choices


def results_section(result: StageResult, out: Path, figures: Path, loss_curve: Path | None) -> list[str]:
    s = result.summary
    lines = [f"### {result.name}: `{result.out.name}`", "",
             f"{s.get('selection', '')}; scored {s.get('n_scored')} of {s.get('n_trajectories')}; "
             f"{s.get('protocol', '')}.", ""]
    if result.methods.get(ZERO_SHOT) is None:
        lines += ["No zero-shot row: the study has no `forecast = \"base\"` stage over the same trajectories and "
                  "protocol, and this forecast had no \"untrained\" baseline.", ""]
    else:
        lines += [f"Zero-shot row: {result.zero_shot_from}.", ""]
    notes: dict[str, list[str]] = {}  # the forecast's note on each method's probabilistic scores, methods by note
    for name, m in result.methods.items():
        if isinstance(m, dict) and isinstance(m.get("probabilistic"), str):
            notes.setdefault(m["probabilistic"], []).append(name)
    lines += results_tables(result)
    for note, names in notes.items():
        lines += [f"Probabilistic scores of {', '.join(names)}: {note}.", ""]
    images = []  # (caption, link)
    if loss_curve is not None:
        images.append((f"The fine-tuned run's loss curve ({loss_curve.parent.name})",
                       _link(loss_curve, out, f"loss curve of {loss_curve.parent.name}")))
    horizon = {name: m for name, m in result.methods.items() if m}
    if horizon:
        path = plot_horizon(figures / f"horizon_{slug(result.name)}.png", f"{result.name}: error against horizon",
                            horizon)
        images.append(("MAE against horizon step, fine-tuned and zero-shot with the baselines",
                       _link(path, out, "MAE against horizon")))
    for caption, index in trajectory_choices(result).items():
        images.append((f"Trajectory: {caption}", _link(result.out / f"trajectory_{index}.png", out, caption)))
    for caption, link in images:
        if link is not None:
            lines += [f"*{caption}*", "", link, ""]
    return lines


def rebased(value, old: Path, new: Path):
    """A path recorded under directory `old` (absolute, as records and study.json hold them), read under `new`, the
    place `old` was copied or moved to; anything else (not a str, outside `old`, or `old` still where it was) as it
    is."""
    if isinstance(value, str) and Path(value).is_relative_to(old) and old.resolve() != new.resolve():
        return str(new / Path(value).relative_to(old))
    return value


def moved_out(entry: dict, record: Record, runs_dir: Path) -> str:
    """A booked forecast's directory now, for a runs directory or a run copied or moved elsewhere (the record holds
    absolute paths: `out`; `source`, the run's directory then; `runs_dir`, the runs directory then): one inside the
    run's directory moves with the run, one inside the old runs directory with `runs_dir`; so the report of a copy
    shows its own forecasts, not the original's."""
    out = str(entry["out"])
    for old, new in ((entry.get("source"), record.run_dir), (record.data.get("runs_dir"), runs_dir)):
        if isinstance(old, str) and (moved := rebased(out, Path(old), new)) != out:
            return moved
    return out


def summary_fault(summary) -> str | None:
    """What makes a forecast's metrics.json unusable for the report (None: nothing): the shape forecast.py writes,
    {"metrics": {method: {species: {score: number or null, "mae_by_step": [numbers]}}}, "trajectories": [...]}."""
    if not isinstance(summary, dict):
        return f"not a JSON object (a {type(summary).__name__})"
    if not isinstance(summary.get("metrics"), dict):
        return f"metrics must be a JSON object, got {summary.get('metrics')!r:.60}"
    if not isinstance(summary.get("trajectories", []), list):
        return f"trajectories must be a list, got {summary.get('trajectories')!r:.60}"
    for method, values in summary["metrics"].items():
        if not isinstance(values, dict):
            continue  # a note, not a method's scores
        for species in SPECIES:
            scores = values.get(species)
            if scores is not None and not isinstance(scores, dict):
                return f"metrics.{method}.{species} must be a JSON object, got {scores!r:.60}"
            for key, value in (scores or {}).items():
                items = value if key.endswith("_by_step") and isinstance(value, list) else [value]
                if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in items):
                    return f"metrics.{method}.{species}.{key} must be a number, got {value!r:.60}"
    return None


def moved_study(path: Path, study: dict) -> dict:
    """study.json (at `path`) with the run and forecast paths of a study directory that was copied or moved since:
    they are absolute, written under <runs_dir>/<name> then, and are read under the directory study.json is in
    now, so a copy's report shows its own runs and forecasts, never the original's."""
    runs_dir, name, stages = study.get("runs_dir"), study.get("name"), study.get("stages")
    if not isinstance(runs_dir, str) or not isinstance(name, str) or not isinstance(stages, list):
        return study
    old, new = Path(runs_dir) / name, path.parent

    def moved(stage):
        if not isinstance(stage, dict):
            return stage
        lists = {k: [rebased(v, old, new) for v in stage[k]] for k in ("runs", "forecasts")
                 if isinstance(stage.get(k), list)}
        return {**stage, **lists, **({"best": rebased(stage["best"], old, new)} if "best" in stage else {})}

    return {**study, "stages": [moved(stage) for stage in stages]}
