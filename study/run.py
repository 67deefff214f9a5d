"""Running a study plan (`run_plan`, `train.py --plan`): stage by stage, each training run trained or resumed
(`train_study_run`) and each forecast made (`run_forecast`) under the FLOP ledger, after checking that the rest of
the plan fits the budget. A stopped study continues where it stopped; `study.json` records what each stage did.
With `jobs` (train.py --jobs N, --launcher slurm) a stage's runs are trained by parallel jobs (`study.jobs`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from common.fileio import UnreadableFile, os_error_text, read_json, write_json_atomic
from forecasting.budget import Booking, budgeted_evaluate
from forecasting.evaluate import FORECAST_METRICS, OutputBusy, Protocol, lock_output, select_trajectories, write_outputs
from forecasting.source import from_model, from_run, parse_dtype, pick_device
from ledger import BudgetExceeded
from qwen_mini.flop_report import format_flops
from training.config import TrainConfig

from .estimate import estimate_plan, format_estimate, sized_runs
from .identity import recorded_identity, study_identity
from .jobs import JobOptions, run_stage_jobs, train_or_resume
from .plan import (
    STUDY_FILE,
    Plan,
    PlanError,
    Stage,
    StudyRun,
    best_run,
    best_val_loss,
    forecast_config,
    forecast_out,
    inherited,
    stage_runs,
)
from .search import run_search
from .selection import choose_best


def check_study_dir(plan: Plan) -> None:
    """A study directory belongs to one plan, run with one set of command-line settings on one set of data bytes (its
    identity, `study.identity`): refuse to continue it with another (`study.identity.study_for` picks a directory of
    its own instead)."""
    path = plan.study_dir / STUDY_FILE
    if path.is_file():
        try:
            study = read_json(path)
        except (UnreadableFile, OSError) as e:
            raise PlanError(f"{e if isinstance(e, UnreadableFile) else os_error_text(e)}: the study's record cannot "
                            "be checked against this plan; restore it, or move it away to start the study again") \
                from None
        recorded = study.get("plan_sha256") if isinstance(study, dict) else None
        if not isinstance(study, dict) or not isinstance(recorded, str):
            raise PlanError(f"{path}: not a study record (no plan_sha256); restore it, or move it away to start the "
                            "study again")
        if recorded and recorded != plan.digest:
            raise PlanError(f"{plan.study_dir} holds a study started from another version of a plan (sha256 "
                            f"{recorded}, {plan.path} is {plan.digest}): restore that plan, or give this one "
                            "another [study] name")
        held, identity = recorded_identity(study, plan.study_dir), study_identity(plan)
        if not identity.matches(held):
            raise PlanError(f"{plan.study_dir} holds this plan's study {held.describe()}, not "
                            f"{identity.describe()}: its results are not this study's; give another --runs-dir")


def recorded_stages(plan: Plan) -> dict[str, dict]:
    """The stage records study.json already holds (check_study_dir has checked it is this study's), by name, for the
    plan's stages: a rerun rewrites study.json after each stage, and one stopped before the end must not forget the
    stages it has not reached again (each is replaced when the rerun reaches it)."""
    try:
        study = read_json(plan.study_dir / STUDY_FILE)
    except (OSError, UnreadableFile):
        return {}
    stages = study.get("stages") if isinstance(study, dict) else None
    names = {s.name for s in plan.stages}
    return {r["name"]: r for r in stages if isinstance(r, dict) and r.get("name") in names} \
        if isinstance(stages, list) else {}


def write_study(plan: Plan, done: dict) -> None:
    """study.json: the study's identity and the record of each stage in `done`, in the plan's order."""
    write_json_atomic(plan.study_dir / STUDY_FILE, {
        "name": plan.name, "plan": str(plan.path.resolve()), "plan_sha256": plan.digest, "plan_text": plan.text,
        "runs_dir": str(plan.runs_dir.resolve()), "max_flops": plan.max_flops, "gqa": plan.gqa,
        **study_identity(plan).record(), "stages": [done[s.name] for s in plan.stages if s.name in done]})


def run_plan(plan: Plan, *, device: str | None = None, dtype: str | None = None, seed: int | None = None,
             progress: bool = True, log=print, jobs: JobOptions | None = None) -> dict:
    """Run the plan stage by stage; a stage's finished runs and forecasts are kept, an unfinished run is resumed.
    Refuses (BudgetExceeded) before anything runs if the rest of the plan does not fit. `device`, `dtype`, `seed`
    (when not None) override the plan's. `jobs`: train each stage's runs as parallel jobs (`study.jobs`; raises
    JobsFailed after a stage whose jobs did not all finish). Returns study.json's dict."""
    check_study_dir(plan)
    estimate = estimate_plan(plan)
    log(format_estimate(plan, estimate))
    if not estimate.fits:
        left = estimate.budget - estimate.committed
        short = next((s.short for s in estimate.stages if s.short), None)  # a sized stage too small: its line
        raise BudgetExceeded(short or f"the rest of plan {plan.path} needs up to {format_flops(estimate.needed)} "
                             f"FLOPs, {format_flops(left)} are left in {plan.runs_dir} "
                             f"(budget {format_flops(estimate.budget)})")
    overrides = {k: v for k, v in (("device", device), ("dtype", dtype), ("seed", seed)) if v is not None}
    done: dict[str, dict] = recorded_stages(plan)  # what a finished (or further) run of this study recorded
    bests: dict[str, tuple[list[StudyRun], StudyRun]] = {}
    for stage in plan.stages:
        if stage.kind == "train":
            best_before = bests[stage.source][1] if stage.source is not None else None
            runs = stage_runs(stage, inherited(plan, best_before), best_before)
            runs = sized_runs(plan, stage, runs) if stage.size is not None else runs
            for run in (r for r in runs if r.continues is not None):
                log(f"[plan] {stage.name}: {run.name} continues {run.continues.stage}/{run.continues.name} from its "
                    f"step {run.start} (a copy of its checkpoint; its steps are not trained again)")
        if stage.kind == "train" and stage.search is not None:

            def save(record, name=stage.name):
                done[name] = record
                write_study(plan, done)

            done[stage.name] = run_search(plan, stage, runs, overrides, jobs, progress, log, save)
            bests[stage.name] = (runs, next(r for r in runs if str(r.run_dir(plan)) == done[stage.name]["best"]))
            log(winner_line(done[stage.name]))
        elif stage.kind == "train":
            if jobs is not None and jobs.as_jobs:
                run_stage_jobs(plan, stage.name, runs, overrides, jobs, log)
            else:
                for run in runs:
                    train_study_run(plan, run, overrides, progress, log)
            best = best_run(runs, plan)
            bests[stage.name] = (runs, best)
            choice = choose_best([r.run_dir(plan) for r in runs])
            done[stage.name] = {"name": stage.name, "kind": "train", "from": stage.source,
                                "varied": sorted(stage.grid), "runs": [str(r.run_dir(plan)) for r in runs],
                                "best": str(best.run_dir(plan)), "best_val_loss": best_val_loss(best.run_dir(plan)),
                                "criterion": choice.criterion, "best_score": choice.score,
                                "scores": choice.scores}
            log(winner_line(done[stage.name]))
        else:
            if stage.source == "base":
                targets = [None]
            else:
                runs, best = bests[stage.source]
                targets = runs if stage.which == "all" else [best]
            outs = [run_forecast(plan, stage, run, overrides, progress, log) for run in targets]
            done[stage.name] = {"name": stage.name, "kind": "forecast", "of": stage.source, "which": stage.which,
                                "forecasts": [str(out) for out in outs],
                                "runs": [str(r.run_dir(plan)) for r in targets if r is not None]}
        write_study(plan, done)
    return json.loads((plan.study_dir / STUDY_FILE).read_text())


def winner_line(record: dict) -> str:
    """The line the driver prints when a training stage ends: its winner, by which criterion, and the margin to the
    runner-up on that criterion."""
    name = Path(record["best"]).name
    if len(record["runs"]) == 1:
        return f"[plan] {record['name']}: done: one run, {name} (validation loss {record['best_val_loss']:.4f})"
    scores = record.get("scores") or (record["rungs"][-1]["scores"] if record.get("rungs") else [])
    ranked = sorted(s for s in scores if s is not None)
    margin = f", {ranked[1] - ranked[0]:.4g} below the runner-up" if len(ranked) > 1 else ""
    return (f"[plan] {record['name']}: winner {name} ({record['best_score']:.4f}{margin}), by the "
            f"{record['criterion']}")


def train_study_run(plan: Plan, run: StudyRun, overrides: dict, progress: bool, log) -> None:
    """Train `run` in its directory, or resume it there; a finished run is left as it is."""
    train_or_resume(run.config(plan, **overrides), f"{run.stage}/{run.name}", progress, log)


def run_forecast(plan: Plan, stage: Stage, run: StudyRun | None, overrides: dict, progress: bool, log) -> Path:
    """Forecast with `run` (None: the base model) as `stage` asks, into its output directory, unless done already."""
    out = forecast_out(plan, stage, run)
    if (out / FORECAST_METRICS).is_file():
        log(f"[plan] {stage.name}: {out} done already")
        return out
    config = forecast_config(plan, stage)
    if "seed" in overrides:
        config = dataclasses.replace(config, seed=overrides["seed"])
    train = TrainConfig(**{**(run.settings if run is not None else plan.train), **overrides})
    device, dtype = pick_device(train.device), parse_dtype(overrides.get("dtype", config.dtype))
    if run is not None:
        source = from_run(run.run_dir(plan), context=config.context, device=device, dtype=dtype)
    else:
        source = from_model(train.model, data_path=train.data, decimals=train.decimals, device=device,
                            dtype=dtype, scaler=train.scaler)
    selection = select_trajectories(source.split, config.split, None, config.limit)
    log(f"[plan] {stage.name}: forecasting {selection.label} with {source.label} -> {out}")
    booking = Booking(plan.runs_dir, plan.max_flops, plan.gqa, change_max_flops=plan.change_max_flops)
    try:
        lock = lock_output(out, f"train.py --plan {plan.path}: stage {stage.name}")
    except OutputBusy as e:
        raise PlanError(str(e)) from None
    with lock:
        evaluation, _ = budgeted_evaluate(source, selection, Protocol.of(config, source.decimals), out=out,
                                          run_dir=run.run_dir(plan) if run is not None else None,
                                          baselines=config.baselines, batch=config.batch, booking=booking,
                                          progress=progress)
        evaluation.notes[:0] = [f"split: {source.split_origin}", *source.notes]
        write_outputs(evaluation, out)  # metrics.json last: a stage stopped before it is forecast again
    return out
