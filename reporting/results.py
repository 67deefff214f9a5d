"""The report's forecast results, from the numbers on disk only: which forecasts there are and what each row is.

A result is one forecast: a study's forecast stage's (of a trained run, or `forecast = "base"`: the base model as
shipped), or one found in the ledger outside any study (`forecast.py --run R`, or a plain `forecast.py --model M`,
whose record is its output directory's). Its rows: the fine-tuned model (a trained run's forecast), the zero-shot
model (the forecast's own "untrained" baseline, the study's `forecast = "base"` stage over the same trajectories and
protocol, or the plain model itself) and every baseline. The tables, figures and the bootstrap intervals of each
result are written by forecasts.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from forecasting.metrics import SPECIES
from ledger import Record, record_label
from training.run import CONFIG_NAME, METRICS_NAME

from .uncertainty import TrajectoryErrors, read_trajectory_errors

FINE_TUNED, ZERO_SHOT = "fine-tuned", "zero-shot"
GENERATED = {"model": None, "untrained": ZERO_SHOT}  # metrics.json's generated methods -> rows (None: the subject)


@dataclass
class StageResult:
    """A forecast's numbers: methods' metrics by row name, where its files are, and the per-trajectory errors each
    row's bootstrap is drawn from."""
    name: str  # the stage, or the record's label outside a study
    out: Path
    summary: dict
    methods: dict[str, dict]  # row name -> metrics.json's per-method dict (per species)
    zero_shot_from: str | None  # where the zero-shot row came from
    run_dir: Path | None  # the fine-tuned run (None: a plain model's forecast)
    model: str | None = None  # a plain model's name (its forecast's subject is the zero-shot row)
    sources: dict[str, tuple[TrajectoryErrors, str]] = field(default_factory=dict)  # row -> (errors, column prefix)
    zero_shot_out: Path | None = None  # the forecast the zero-shot row came from, when not this one

    @property
    def subject(self) -> str:
        """The row the Findings are about: the fine-tuned model, else the zero-shot one."""
        return FINE_TUNED if FINE_TUNED in self.methods else ZERO_SHOT

    @property
    def baselines(self) -> list[str]:
        return [m for m in self.methods if m not in (FINE_TUNED, ZERO_SHOT)]

    @property
    def splits(self) -> list[str]:
        """The splits of the trajectories scored ("test", "val", ...), from per_trajectory.csv."""
        errors = self.sources.get(self.subject)
        return sorted(set(errors[0].splits.values())) if errors else []

    @property
    def key(self) -> str:
        """A name of its own among the report's results (figure files)."""
        return self.name if self.out.name in ("forecast", self.name) else f"{self.name}_{self.out.name}"

    @property
    def where(self) -> str:
        """How a Finding names the forecast beside its stage: its directory unless that says nothing more."""
        return f" (`{self.out.name}`)" if self.out.name not in ("forecast", self.name) else ""


def _row_name(method: str, fine_tuned: bool) -> str:
    if method == "model":
        return FINE_TUNED if fine_tuned else ZERO_SHOT
    return GENERATED.get(method) or method


def make_result(name: str, out: Path, summary: dict, errors, run_dir: Path | None, model: str | None = None,
                bases: list[tuple[Path, dict, object]] = ()) -> StageResult:
    """The result of one forecast: a trained run's (`run_dir`), else the plain `model`'s; `bases`: the study's
    `forecast = "base"` forecasts (out, summary, errors) a trained run's result may take its zero-shot row from."""
    metrics = {k: v for k, v in (summary.get("metrics") or {}).items() if isinstance(v, dict)}
    fine_tuned = run_dir is not None
    methods, sources = {}, {}
    for method in sorted(metrics, key=lambda m: (m != "model", m != "untrained")):  # subject, zero-shot, baselines
        row = _row_name(method, fine_tuned)
        if row == ZERO_SHOT and not fine_tuned and ZERO_SHOT in methods:
            continue
        methods[row] = metrics[method]
        if errors is not None:
            sources[row] = (errors, method)
    zero_from, zero_out = None, None
    if fine_tuned and ZERO_SHOT in methods:
        zero_from = "this forecast's untrained baseline"
    elif fine_tuned:
        for base_out, base, base_errors in bases:
            if _same_forecast(base, summary) and (base.get("metrics") or {}).get("model"):
                methods = {FINE_TUNED: methods.pop(FINE_TUNED), ZERO_SHOT: base["metrics"]["model"], **methods} \
                    if FINE_TUNED in methods else methods
                zero_from, zero_out = f"`{base_out.name}` (forecast = \"base\")", base_out
                if base_errors is not None:
                    sources[ZERO_SHOT] = (base_errors, "model")
                break
    else:
        zero_from = f"{model or 'the base model'} as shipped, without fine-tuning"
    return StageResult(name, out, summary, methods, zero_from, run_dir, model, sources, zero_out)


def _same_forecast(a: dict, b: dict) -> bool:
    return a.get("trajectories") == b.get("trajectories") and a.get("protocol") == b.get("protocol")


def forecast_results(studies: list[tuple[Path, dict]], records: list[Record], runs_dir: Path,
                     unreadable: list[str]) -> list[StageResult]:
    """Every forecast's result: a study's forecast stages in the plan's order (its `forecast = "base"` stages
    too), then the ledger's other forecasts (of a trained run, or of a plain model)."""
    summaries, errors = {}, {}

    def read(out: Path):
        key = Path(out).resolve()
        if key not in summaries:
            summaries[key] = read_summary(Path(out), unreadable)
            errors[key] = None
            if summaries[key] is not None and (Path(out) / "per_trajectory.csv").is_file():
                try:
                    errors[key] = read_trajectory_errors(Path(out))
                except ValueError as e:
                    unreadable.append(f"forecast {e}: left out of the intervals and the trajectory figures")
        return summaries[key], errors[key]

    sources = {}  # a forecast directory -> what forecast it (the ledger's entries say)
    for record in records:
        for entry in record.forecasts:
            if isinstance(entry, dict) and entry.get("out") and entry.get("label") == "model":
                sources[Path(moved_out(entry, record, runs_dir)).resolve()] = (record, entry.get("source"))
    results, in_studies = [], set()
    for _, study in studies:
        stages = [s for s in study.get("stages", []) if isinstance(s, dict) and s.get("kind") == "forecast"]
        in_studies.update(Path(out).resolve() for s in stages for out in _list(s.get("forecasts")))
        bases = [(Path(out), *read(Path(out))) for s in stages if s.get("of") == "base"
                 for out in _list(s.get("forecasts"))]
        bases = [b for b in bases if b[1] is not None]
        for stage in stages:
            runs = [Path(r) for r in _list(stage.get("runs"))]
            for i, out in enumerate(_list(stage.get("forecasts"))):
                summary, errs = read(Path(out))
                if summary is None:
                    continue
                if stage.get("of") == "base":
                    record, source = sources.get(Path(out).resolve()) or (None, None)
                    results.append(make_result(str(stage.get("name")), Path(out), summary, errs, None,
                                               forecaster(summary, record, source)[1]))
                elif runs:
                    results.append(make_result(str(stage.get("name")), Path(out), summary, errs,
                                               runs[min(i, len(runs) - 1)], bases=bases))
    for out, (record, source) in sources.items():
        if out in in_studies:
            continue
        summary, errs = read(out)
        if summary is None:
            continue
        trained, model = forecaster(summary, record, source)
        results.append(make_result(record_label(record, runs_dir), out, summary, errs,
                                   record.run_dir if trained else None, None if trained else model))
    return results


def forecaster(summary: dict, record: Record | None, source) -> tuple[bool, str]:
    """(a trained run forecast it, the model's name): from metrics.json's "forecaster" ({"model", "run"}), else
    (older forecasts) from the ledger entry's source and the record it was booked into."""
    named = summary.get("forecaster")
    if isinstance(named, dict) and isinstance(named.get("model"), str):
        return named.get("run") is not None, named["model"]
    trained = record is not None and is_training_run(record.run_dir) and not _other_model(source, record)
    return trained, str(source or "a base model")


def _list(value) -> list:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def is_training_run(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and (directory / METRICS_NAME).is_file()


def _other_model(source, record: Record) -> bool:
    """A forecast booked into a run's record that names another model as its source (`forecast.py --model M --out
    <inside the run>`): the run did not forecast it."""
    return isinstance(source, str) and Path(source).name != record.run_dir.name and \
        Path(source).resolve() != record.run_dir.resolve()


def read_summary(out: Path, unreadable: list[str]):
    """A forecast's metrics.json, or None with a line in `unreadable`."""
    path = out / "metrics.json"
    if not path.is_file():
        unreadable.append(f"forecast {out}: no metrics.json")
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        unreadable.append(f"forecast {path}: {e}")
        return None
    fault = summary_fault(summary)
    if fault is not None:
        unreadable.append(f"forecast {path}: {fault}")
        return None
    return summary


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
        if isinstance(old, str) and Path(old).is_absolute() and (moved := rebased(out, Path(old), new)) != out:
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
        lists = {k: [rebased(v, old, new) for v in stage[k]] for k in ("runs", "forecasts", "noise_runs")
                 if isinstance(stage.get(k), list)}
        return {**stage, **lists, **({"best": rebased(stage["best"], old, new)} if "best" in stage else {})}

    return {**study, "stages": [moved(stage) for stage in stages]}
