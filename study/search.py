"""A search stage, run and read back: `run_search` trains a successive-halving search rung by rung (study.halving's
rules), through the same jobs as a grid's runs (--jobs, --launcher slurm); `replay` says where a search stands from
its runs on disk and the decisions study.json recorded (study.estimate counts a search for `flops.py --plan`, rung by
rung, next to what the same configurations would cost as a full grid).

Where a search stands is read, not remembered: a configuration is through a rung when its run finished that many
steps (`study.plan.is_complete`), and its score at a rung is its lowest validation loss up to that step (later
evaluations never change an earlier rung's verdict), so a killed search resumes at the rung it stopped in and trains
nothing twice. Each rung's verdict is recorded in study.json as it is made ("rungs"), and a recorded verdict is kept
on a rerun: whether ties within the noise went on depended on the budget left at the time (they go on only while the
rest of the plan still fits it with them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.exit_codes import EXIT_DIVERGED
from common.fileio import UnreadableFile, read_json
from training.config import TrainConfig
from training.stopping import TrainingDiverged

from .halving import Cut, cut_rung, rung_steps
from .jobs import JobOptions, JobsFailed, run_stage_jobs, train_or_resume
from .plan import STUDY_FILE, Plan, PlanError, Stage, StudyRun, is_complete, varied_keys
from .selection import lowest, score_runs


@dataclass
class SearchState:
    """Where a search stands: the rungs decided so far (study.json's records), the noise, and what to train next."""
    ladder: list[int]  # every rung's steps
    rungs: list[dict] = field(default_factory=list)  # decided rungs (the top one too, once done), study.json's form
    noise: float | None = None
    noise_how: str = "not measured yet"
    noise_runs: list[StudyRun] = field(default_factory=list)
    alive: list[StudyRun] = field(default_factory=list)  # the configurations of the rung in progress
    rung: int = 0  # the rung in progress (its index in ladder)
    todo: list[StudyRun] = field(default_factory=list)  # to train next, all to todo_steps
    todo_steps: int | None = None
    todo_replicates: bool = False  # the todo are the noise replicates (trained at their own seeds)
    winner: StudyRun | None = None
    criterion: str | None = None
    winner_score: float | None = None

    @property
    def done(self) -> bool:
        return self.winner is not None


def steps_of(run: StudyRun) -> int:
    return run.settings.get("steps", TrainConfig.steps)


def ladder_of(stage: Stage, runs: list[StudyRun]) -> list[int]:
    steps = steps_of(runs[0])
    return rung_steps(stage.search.first_rung(steps), stage.search.eta, steps)


def replicates(stage: Stage, best: StudyRun, steps: int) -> list[StudyRun]:
    """The first rung's best configuration again at each noise seed, to the first rung's steps."""
    seed = best.settings.get("seed", TrainConfig.seed)
    return [StudyRun(stage.name, f"{best.name}_seed{s}", {**best.settings, "seed": s, "steps": steps})
            for s in stage.search.seeds_for_noise(seed)]


def recorded_search(plan: Plan, name: str) -> dict:
    """The search stage's record in the study's study.json ({} when there is none yet)."""
    path = plan.study_dir / STUDY_FILE
    try:
        study = read_json(path) if path.is_file() else {}
    except (UnreadableFile, OSError):
        return {}  # run_plan's check_study_dir refuses a damaged record before anything runs
    stages = study.get("stages", []) if isinstance(study, dict) else []
    return next((s for s in stages if isinstance(s, dict) and s.get("name") == name and s.get("search")), {})


def rung_scores(plan: Plan, runs: list[StudyRun], steps: int, diverged: set[str]) -> tuple[list, str]:
    scores, criterion = score_runs([r.run_dir(plan) for r in runs], up_to_step=steps)
    return [None if r.name in diverged else s for r, s in zip(runs, scores)], criterion


def replay(plan: Plan, stage: Stage, runs: list[StudyRun], record: dict | None = None,
           diverged: set[str] | None = None, decide=None) -> SearchState:
    """Where the search of `stage` (its configurations `runs`) stands. `record`: its study.json record (default:
    read from disk), whose recorded rung verdicts are kept; `diverged`: names of runs that stopped on non-finite
    numbers (default: the record's); `decide(rung, runs, scores, cut) -> (cut, ties_dropped)`: the verdict of a rung
    that has none recorded yet (default: the noise rule as it is, ties kept)."""
    record = recorded_search(plan, stage.name) if record is None else record
    diverged = set(record.get("diverged", [])) if diverged is None else diverged
    recorded = [r for r in record.get("rungs", []) if isinstance(r, dict)]
    state = SearchState(ladder_of(stage, runs))
    alive = list(runs)
    for i, steps in enumerate(state.ladder):
        state.rung, state.alive = i, alive
        waiting = [r for r in alive if r.name not in diverged and not is_complete(r.run_dir(plan), steps)]
        if waiting:
            state.todo, state.todo_steps = waiting, steps
            return state
        scores, criterion = rung_scores(plan, alive, steps, diverged)
        if i == 0 and len(state.ladder) > 1 and not _measure_noise(plan, stage, state, alive, scores, steps, diverged):
            return state
        names = [r.name for r in alive]
        rung = {"steps": steps, "runs": names, "scores": scores, "criterion": criterion}
        if i == len(state.ladder) - 1:
            choice = lowest(scores, criterion)
            if choice is None:
                raise PlanError(f"stage {stage.name}: no configuration of the top rung ({steps} steps) has a finite "
                                "validation loss to choose the winner by")
            state.winner, state.winner_score = alive[choice.index], choice.score
            state.criterion = (f"{criterion} at the top rung ({steps} steps), among the {len(alive)} configuration(s) "
                               "that reached it")
            state.rungs.append({**rung, "winner": alive[choice.index].name})
            return state
        earlier = recorded[i] if i < len(recorded) else {}
        if earlier.get("steps") == steps and earlier.get("runs") == names:
            going = set(earlier.get("kept", [])) | set(earlier.get("ties", []))
            state.rungs.append(earlier)
        else:
            if not any(s is not None for s in scores):
                raise PlanError(f"stage {stage.name}: no configuration has a finite validation loss after "
                                f"{steps} steps: nothing can go on")
            cut = cut_rung(scores, stage.search.eta, state.noise)
            cut, dropped = decide(i, alive, scores, cut) if decide is not None else (cut, [])
            going = {names[j] for j in cut.going_on}
            state.rungs.append({**rung, "kept": [names[j] for j in cut.kept], "ties": [names[j] for j in cut.ties],
                                "cut": [names[j] for j in cut.cut], "ties_dropped": [names[j] for j in dropped],
                                "noise": state.noise})
        alive = [r for r in alive if r.name in going]
    raise AssertionError("the top rung ends every replay")  # pragma: no cover


def _measure_noise(plan: Plan, stage: Stage, state: SearchState, alive: list[StudyRun], scores: list, steps: int,
                   diverged: set[str]) -> bool:
    """After the first rung: its best configuration at the noise seeds; False while they still need training."""
    choice = lowest(scores, "")
    if choice is None:
        state.noise_how = "not measured (no configuration has a finite first-rung loss)"
        return True
    best = alive[choice.index]
    state.noise_runs = replicates(stage, best, steps)
    if not state.noise_runs:
        state.noise_how = "not measured (noise_seeds = [])"
        return True
    waiting = [r for r in state.noise_runs if r.name not in diverged and not is_complete(r.run_dir(plan), steps)]
    if waiting:
        state.todo, state.todo_steps, state.todo_replicates = waiting, steps, True
        return False
    # Scored together with the rung, so the noise is measured on the criterion the cut uses (the same last-N
    # positions where the configurations' context lengths differ).
    together, _ = rung_scores(plan, [*alive, *state.noise_runs], steps, diverged)
    seeded = [together[choice.index], *together[len(alive):]]
    seeds = [r.settings.get("seed", TrainConfig.seed) for r in (best, *state.noise_runs)]
    if any(s is None for s in seeded):
        state.noise_how = f"not measured: a seed replicate of {best.name} has no finite loss"
        return True
    state.noise = max(seeded) - min(seeded)
    state.noise_how = (f"the spread of {best.name}'s validation loss after {steps} steps over seeds "
                       f"{', '.join(map(str, seeds))} ({state.noise:.4g})")
    return True


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
        from .estimate import estimate_plan  # with the ties kept (replay's default for a rung not yet recorded)

        if estimate_plan(plan).fits:
            return cut, []
        log(f"[plan] {stage.name}: {len(cut.ties)} configuration(s) within the noise of the cut would not leave the "
            "rest of the plan room in the budget: cut")
        return Cut(cut.kept, [], sorted(cut.cut + cut.ties)), cut.ties

    while True:
        state = replay(plan, stage, runs, record, diverged, decide)
        record = search_record(plan, stage, runs, state, diverged)
        save(record)
        for rung in state.rungs[told:]:
            if "winner" not in rung:  # (the winner: run_plan's line when the stage ends)
                log(rung_line(stage.name, rung))
        told = len(state.rungs)
        if state.done:
            return record
        what = "seed replicate(s) for the noise" if state.todo_replicates else f"configuration(s) of rung {state.rung + 1}"
        log(f"[plan] {stage.name}: training {len(state.todo)} {what} to {state.todo_steps} steps")
        step_overrides = {**overrides, "steps": state.todo_steps}
        if state.todo_replicates:
            step_overrides.pop("seed", None)  # a replicate's seed is what it measures
        diverged |= _train(plan, stage, state.todo, step_overrides, jobs, progress, log)
        record = {**record, "diverged": sorted(diverged)}
        save(record)  # before the next verdict: its budget check (estimate_plan) reads study.json


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
    if rung.get("ties_dropped"):
        text += f"; cut for the budget though within the noise: {listed(rung['ties_dropped'])}"
    return text + f"; cut {len(rung.get('cut', []))}"


def _score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def search_record(plan: Plan, stage: Stage, runs: list[StudyRun], state: SearchState, diverged: set[str]) -> dict:
    """The stage's study.json record: every configuration's run under "runs" (as a grid's), the seed replicates
    under "noise_runs", each rung's verdict under "rungs", the FLOPs spent next to the full grid's."""
    from .estimate import search_flops  # (study.estimate counts searches with this module's replay)

    record = {"name": stage.name, "kind": "train", "from": stage.source, "search": stage.search.method,
              "eta": stage.search.eta, "first_steps": state.ladder[0], "steps": state.ladder[-1],
              "ladder": state.ladder, "varied": varied_keys(stage), "runs": [str(r.run_dir(plan)) for r in runs],
              "noise_runs": [str(r.run_dir(plan)) for r in state.noise_runs], "noise": state.noise,
              "noise_how": state.noise_how, "rungs": state.rungs, "diverged": sorted(diverged), "done": state.done,
              "flops": search_flops(plan, runs, state.noise_runs, _gqa(plan))}
    if state.done:
        record.update(best=str(state.winner.run_dir(plan)), best_val_loss=state.winner_score,
                      criterion=state.criterion, best_score=state.winner_score)
    return record


def _gqa(plan: Plan) -> str:
    from ledger import Ledger

    return Ledger(plan.runs_dir, plan.max_flops, change_max_flops=plan.change_max_flops).convention(plan.gqa)
