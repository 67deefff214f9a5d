"""Where a study stands, read back from what its runs left on disk, never remembered: a search's rungs and verdicts
(`replay`, with the decisions study.json recorded), each training stage's winner once its runs are finished
(`finished_best`), and from those the runs each stage will train (`resolve`) and what each forecast stage forecasts
(`forecast_targets`). `study.estimate` counts a plan with it, `study.search` and `study.run` run one; it trains
nothing itself.

A configuration of a search is through a rung when its run finished that many steps (`study.plan.is_complete`), and
its score at a rung is its lowest validation loss up to that step (later evaluations never change an earlier rung's
verdict), so a killed search resumes at the rung it stopped in and trains nothing twice. A rung's recorded verdict
is kept on a rerun: whether ties within the noise went on depended on the budget left at the time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.fileio import UnreadableFile, read_json
from training.config import TrainConfig

from .halving import cut_rung, rung_steps
from .plan import STUDY_FILE, Plan, PlanError, Stage, StudyRun, best_run, is_complete, stage_runs
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


def finished_best(plan: Plan, stage: Stage, runs: list[StudyRun]) -> StudyRun | None:
    """The best run of a training stage whose runs are all finished (a search: its winner, once its top rung is
    done), else None."""
    if stage.search is not None:
        return replay(plan, stage, runs).winner
    if all(is_complete(r.run_dir(plan), r.settings.get("steps", TrainConfig.steps)) for r in runs):
        return best_run(runs, plan)
    return None


def resolve(plan: Plan) -> dict[str, list[list[StudyRun]]]:
    """Each training stage's possible run lists: one list once its source stage is complete (its best run known),
    else one per run the source stage could pick."""
    options: dict[str, list[list[StudyRun]]] = {}
    for stage in plan.stages:
        if stage.kind != "train":
            continue
        if stage.source is None:
            options[stage.name] = [stage_runs(stage, plan.train)]
            continue
        source = options[stage.source]
        best = finished_best(plan, plan.stage(stage.source), source[0]) if len(source) == 1 else None
        if best is not None:
            bases = [best]
        else:
            bases = [r for runs in source for r in runs]
        options[stage.name] = [stage_runs(stage, {**plan.train, **base.settings}, base) for base in bases]
    return options


def forecast_targets(plan: Plan, stage: Stage, options: dict) -> list[list[StudyRun | None]]:
    """Possible target lists of a forecast stage (None: the base model)."""
    if stage.source == "base":
        return [[None]]
    lists = options[stage.source]
    if stage.which == "all":
        return [list(runs) for runs in lists]
    best = finished_best(plan, plan.stage(stage.source), lists[0]) if len(lists) == 1 else None
    if best is not None:
        return [[best]]
    return [[r] for runs in lists for r in runs]
