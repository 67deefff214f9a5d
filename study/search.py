"""A search stage, run: `run_search` trains a successive-halving search rung by rung (study.halving's rules), through
the same jobs as a grid's runs (--jobs, --launcher slurm), and writes each rung's verdict to study.json as it is made
("rungs"). Where the search stands is read back from disk by `study.standing.replay`, so a killed search resumes at
the rung it stopped in and trains nothing twice. Ties within the noise go on only while the rest of the plan still
fits the budget with them (`study.estimate`).
"""
from __future__ import annotations

from pathlib import Path

from common.exit_codes import EXIT_DIVERGED
from ledger import Ledger
from training.stopping import TrainingDiverged

from .estimate import estimate_plan, search_flops
from .halving import Cut
from .jobs import JobOptions, JobsFailed, run_stage_jobs, train_or_resume
from .plan import Plan, Stage, StudyRun, varied_keys
from .standing import DeadSearch, SearchState, recorded_search, replay

# ---- running it ----------------------------------------------------------------------------------------------------

def run_search(plan: Plan, stage: Stage, runs: list[StudyRun], overrides: dict, jobs: JobOptions | None,
               progress: bool, log, save) -> dict:
    """Train the search rung by rung until its top rung is done; `save(record)` writes its study.json record after
    every verdict (so a rerun keeps them). Returns the final record."""
    record = recorded_search(plan, stage.name)
    diverged = set(record.get("diverged", []))
    told = len(record.get("rungs", []))  # verdicts already printed by an earlier process

    def decide(i, alive, scores, cut: Cut):
        if not cut.ties:
            return cut, []
        if estimate_plan(plan).fits:  # with the ties kept (replay's default for a rung not yet recorded)
            return cut, []
        log(f"[plan] {stage.name}: {len(cut.ties)} configuration(s) within the noise of the cut would not leave the "
            "rest of the plan room in the budget: cut")
        return Cut(cut.kept, [], sorted(cut.cut + cut.ties)), cut.ties

    while True:
        try:
            state = replay(plan, stage, runs, record, diverged, decide)
        except DeadSearch as e:  # every configuration of a rung diverged: the record says so, and what was spent
            save({**record, "diverged": sorted(diverged), "stopped": str(e),
                  "flops": search_flops(plan, runs, recorded_noise_runs(plan, stage, record), _gqa(plan))})
            raise
        record = search_record(plan, stage, runs, state, diverged)
        save(record)
        for rung in state.rungs[told:]:
            if "winner" not in rung:  # (the winner: run_plan's line when the stage ends)
                log(rung_line(stage.name, rung))
        told = len(state.rungs)
        if state.done:
            return record
        candidates = [r for r in state.todo if r in state.alive]
        noise = len(state.todo) - len(candidates) + len(state.todo_replicates)  # (its reference, once cut, too)
        what = ([f"{len(candidates)} configuration(s) of rung {state.rung + 1}"] if candidates else []) + \
            ([f"{noise} run(s) measuring the noise of {state.reference.name}"] if noise else [])
        log(f"[plan] {stage.name}: training {' and '.join(what)} to {state.todo_steps} steps")
        step_overrides = {**overrides, "steps": state.todo_steps}
        diverged |= _train(plan, stage, state.todo, step_overrides, jobs, progress, log)
        if state.reference is None or state.reference.name not in diverged:  # (else there is no noise to measure)
            seeded = {k: v for k, v in step_overrides.items() if k != "seed"}  # a replicate's seed is what it measures
            diverged |= _train(plan, stage, state.todo_replicates, seeded, jobs, progress, log)
        # Before the next verdict: its budget check (estimate_plan) reads study.json; and what was spent, as a kill
        # in the next rung would leave it.
        record = {**record, "diverged": sorted(diverged),
                  "flops": search_flops(plan, runs, state.noise_runs, _gqa(plan))}
        save(record)


def recorded_noise_runs(plan: Plan, stage: Stage, record: dict) -> list[StudyRun]:
    """The seed replicates a record names (their run directories, under the stage's)."""
    listed = record.get("noise_runs")
    names = [Path(d).name for d in listed if isinstance(d, str)] if isinstance(listed, list) else []
    return [StudyRun(stage.name, name, {}) for name in names]


def _train(plan: Plan, stage: Stage, todo: list[StudyRun], overrides: dict, jobs: JobOptions | None, progress: bool,
           log) -> set[str]:
    """Train (or resume) `todo` to overrides["steps"]; returns the names of runs that diverged (a configuration
    with non-finite numbers is cut, not a failed study)."""
    if jobs is not None and jobs.as_jobs:
        try:
            run_stage_jobs(plan, stage.name, todo, overrides, jobs, log)
        except JobsFailed as e:
            failed = [f for f in e.failures if f.status != EXIT_DIVERGED]
            if failed:
                raise JobsFailed(stage.name, failed) from None
            return {f.run.split("/", 1)[1] for f in e.failures}
        return set()
    diverged = set()
    for run in todo:
        try:
            train_or_resume(run.config(plan, **overrides), f"{run.stage}/{run.name}", progress, log)
        except TrainingDiverged as e:
            log(f"[plan] {run.stage}/{run.name}: diverged ({e}); cut")
            diverged.add(run.name)
    return diverged


def rung_line(stage: str, rung: dict) -> str:
    scores = dict(zip(rung["runs"], rung["scores"]))

    def listed(names):
        return ", ".join(f"{n} ({_score(scores.get(n))})" for n in names) or "none"

    text = (f"[plan] {stage}: rung at {rung['steps']} steps, by the {rung['criterion']}: kept "
            f"{listed(rung.get('kept', []))}")
    if rung.get("ties"):
        text += f"; kept within the noise ({_score(rung.get('noise'))}) {listed(rung['ties'])}"
    dropped = rung.get("ties_dropped", [])
    if dropped:
        text += f"; cut for the budget though within the noise: {listed(dropped)}"
    others = len([n for n in rung.get("cut", []) if n not in dropped])
    return text + f"; cut {others}{' other(s)' if dropped else ''}"


def _score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def search_record(plan: Plan, stage: Stage, runs: list[StudyRun], state: SearchState, diverged: set[str]) -> dict:
    """The stage's study.json record: every configuration's run under "runs" (as a grid's), the seed replicates
    under "noise_runs" (of "noise_reference"), each rung's verdict and noise under "rungs", the noise of the latest
    rung decided (the top rung's once done: "noise", at "noise_steps"), the FLOPs spent next to the full grid's."""
    record = {"name": stage.name, "kind": "train", "from": stage.source, "search": stage.search.method,
              "eta": stage.search.eta, "first_steps": state.ladder[0], "steps": state.ladder[-1],
              "ladder": state.ladder, "varied": varied_keys(stage), "runs": [str(r.run_dir(plan)) for r in runs],
              "noise_runs": [str(r.run_dir(plan)) for r in state.noise_runs], "noise": state.noise,
              "noise_steps": state.noise_steps, "noise_how": state.noise_how,
              "noise_reference": str(state.reference.run_dir(plan)) if state.reference is not None else None,
              "rungs": state.rungs, "diverged": sorted(diverged), "done": state.done,
              "flops": search_flops(plan, runs, state.noise_runs, _gqa(plan))}
    if state.done:
        record.update(best=str(state.winner.run_dir(plan)), best_val_loss=state.winner_score,
                      criterion=state.criterion, best_score=state.winner_score)
    return record


def _gqa(plan: Plan) -> str:
    return Ledger(plan.runs_dir, plan.max_flops, change_max_flops=plan.change_max_flops).convention(plan.gqa)
