"""Where a study stands, read back from what its runs left on disk, never remembered: a search's rungs and verdicts
(`replay`, with the decisions study.json recorded), each training stage's winner once its runs are finished
(`finished_best`), and from those the runs each stage will train (`resolve`) and what each forecast stage forecasts
(`forecast_targets`). `study.estimate` counts a plan with it, `study.search` and `study.run` run one; it trains
nothing itself.

A configuration of a search is through a rung when its run finished that many steps (`study.plan.is_complete`), and
its score at a rung is its validation loss at that step (the weights that go on; later evaluations never change an
earlier rung's verdict), so a killed search resumes at the rung it stopped in and trains nothing twice. A rung's
recorded verdict is kept on a rerun: whether ties within the noise went on depended on the budget left at the time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.fileio import UnreadableFile, read_json
from training.config import TrainConfig

from .halving import cut_rung, record_fault, rung_steps
from .plan import STUDY_FILE, Plan, PlanError, Stage, StudyRun, best_run, inherited, is_complete, stage_runs
from .selection import lowest, score_runs


class DeadSearch(PlanError):
    """No configuration of a rung has a finite validation loss: the search cannot go on."""


@dataclass
class SearchState:
    """Where a search stands: the rungs decided so far (study.json's records), the noise, and what to train next."""
    ladder: list[int]  # every rung's steps
    rungs: list[dict] = field(default_factory=list)  # decided rungs (the top one too, once done), study.json's form
    noise: float | None = None  # measured at the latest rung decided (the top rung's, once done), at its step
    noise_steps: int | None = None  # that rung's step
    noise_how: str = "not measured yet"
    reference: StudyRun | None = None  # the noise's configuration: the first rung's best
    noise_runs: list[StudyRun] = field(default_factory=list)  # its seed replicates
    alive: list[StudyRun] = field(default_factory=list)  # the configurations of the rung in progress
    rung: int = 0  # the rung in progress (its index in ladder)
    todo: list[StudyRun] = field(default_factory=list)  # to train next to todo_steps: configurations (and the
    todo_steps: int | None = None  # reference, carried on for the noise once cut), at the configurations' seed
    todo_replicates: list[StudyRun] = field(default_factory=list)  # and the seed replicates, at their own seeds
    noise_carried: bool = True  # the noise is measured at every rung (False: at the first only, as recorded once)
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


def replicates(stage: Stage, best: StudyRun) -> list[StudyRun]:
    """The noise's configuration again at each noise seed (trained with the search to every rung)."""
    seed = best.settings.get("seed", TrainConfig.seed)
    return [StudyRun(stage.name, f"{best.name}_seed{s}", {**best.settings, "seed": s})
            for s in stage.search.seeds_for_noise(seed)]


def recorded_search(plan: Plan, name: str) -> dict:
    """The search stage's record in the study's study.json ({} when there is none yet); a damaged one is refused
    (PlanError naming the field), never half-read."""
    path = plan.study_dir / STUDY_FILE
    try:
        study = read_json(path) if path.is_file() else {}
    except (UnreadableFile, OSError):
        return {}  # run_plan's check_study_dir refuses a damaged record before anything runs
    stages = study.get("stages", []) if isinstance(study, dict) else []
    record = next((s for s in stages if isinstance(s, dict) and s.get("name") == name and s.get("search")), {})
    fault = record_fault(record)
    if fault is not None:
        raise PlanError(f"{path}: the record of search stage {name} is damaged: {fault}; restore it, or move "
                        "study.json away to decide the rungs again from the runs on disk")
    return record


def rung_scores(plan: Plan, runs: list[StudyRun], steps: int) -> tuple[list, str]:
    """Every run's validation loss at the rung's step (on the same last-N positions where the context lengths
    differ); None where it has none (a run that diverged before that step never logged it)."""
    return score_runs([r.run_dir(plan) for r in runs], at_step=steps)


def _waiting(plan: Plan, runs: list[StudyRun], steps: int, diverged: set[str]) -> list[StudyRun]:
    return [r for r in runs if r.name not in diverged and not is_complete(r.run_dir(plan), steps)]


def replay(plan: Plan, stage: Stage, runs: list[StudyRun], record: dict | None = None,
           diverged: set[str] | None = None, decide=None) -> SearchState:
    """Where the search of `stage` (its configurations `runs`) stands. `record`: its study.json record (default:
    read from disk), whose recorded rung verdicts are kept; `diverged`: names of runs that stopped on non-finite
    numbers (default: the record's); `decide(rung, runs, scores, cut) -> (cut, ties_dropped)`: the verdict of a rung
    that has none recorded yet (default: the noise rule as it is, ties kept)."""
    record = recorded_search(plan, stage.name) if record is None else record
    fault = record_fault(record, [r.name for r in runs])
    if fault is not None:
        raise PlanError(f"{plan.study_dir / STUDY_FILE}: the record of search stage {stage.name} is damaged: {fault}; "
                        "restore it, or move study.json away to decide the rungs again from the runs on disk")
    diverged = set(record.get("diverged", [])) if diverged is None else diverged
    recorded = record.get("rungs", [])
    state = SearchState(ladder_of(stage, runs))
    alive = list(runs)
    # The noise is measured at every rung of a search of several (one rung is a grid: nothing is cut); a search
    # recorded before the noise went on with the rungs keeps its first rung's (nothing is trained again for it).
    measuring = len(state.ladder) > 1 and stage.search.noise_seeds != ()
    state.noise_carried = not recorded or "noise_scores" in recorded[0]  # (in every rung recorded since)
    if not measuring:
        state.noise_how = "not measured (noise_seeds = [])" if len(state.ladder) > 1 else \
            "not measured (one rung: nothing is cut)"
    for i, steps in enumerate(state.ladder):
        state.rung, state.alive = i, alive
        if measuring and state.reference is not None and state.reference.name in diverged:
            state.noise, state.noise_steps, measuring = None, None, False  # (its replicates are not trained on)
            state.noise_how = f"not measured at step {steps}: {state.reference.name} diverged"
        carried = [state.reference] if measuring and state.reference not in (None, *alive) else []
        state.todo = _waiting(plan, alive + carried, steps, diverged)
        state.todo_replicates = _waiting(plan, state.noise_runs, steps, diverged) if measuring else []
        if state.todo or state.todo_replicates:
            state.todo_steps = steps
            return state
        if i == 0 and measuring:
            scores, _ = rung_scores(plan, alive, steps)
            choice = lowest(scores, "")
            if choice is None:
                state.noise_how = "not measured (no configuration has a finite loss at the first rung)"
            state.reference = alive[choice.index] if choice is not None else None
            state.noise_runs = replicates(stage, state.reference) if choice is not None else []
            measuring = bool(state.noise_runs)
            state.todo_replicates = _waiting(plan, state.noise_runs, steps, diverged)
            if state.todo_replicates:
                state.todo_steps = steps
                return state
        members = [state.reference, *state.noise_runs] if measuring else []
        scored = [*alive, *carried, *state.noise_runs] if measuring else alive
        together, criterion = rung_scores(plan, scored, steps)  # one criterion: the same positions
        scores = together[:len(alive)]
        by_name = {r.name: s for r, s in zip(scored, together)}
        noise_scores = {m.name: by_name[m.name] for m in members}
        if measuring:  # (once it fails, the noise stays None: never held against another length's)
            measuring = _measure_noise(state, members, noise_scores, steps) and state.noise_carried
        names = [r.name for r in alive]
        rung = {"steps": steps, "runs": names, "scores": scores, "criterion": criterion, "noise": state.noise,
                "noise_scores": noise_scores}
        if i == len(state.ladder) - 1:
            choice = lowest(scores, criterion)
            if choice is None:
                raise DeadSearch(f"stage {stage.name}: no configuration of the top rung ({steps} steps) has a finite "
                                "validation loss to choose the winner by")
            state.winner, state.winner_score = alive[choice.index], choice.score
            state.criterion = (f"{criterion} (the top rung), among the {len(alive)} configuration(s) that reached "
                               "it")
            state.rungs.append({**rung, "winner": alive[choice.index].name})
            return state
        earlier = recorded[i] if i < len(recorded) else {}
        if earlier.get("steps") == steps and earlier.get("runs") == names and "winner" not in earlier:
            going = set(earlier.get("kept", [])) | set(earlier.get("ties", []))
            state.rungs.append(earlier)
        else:
            if not any(s is not None for s in scores):
                raise DeadSearch(f"stage {stage.name}: no configuration has a finite validation loss at step "
                                f"{steps}: nothing can go on")
            cut = cut_rung(scores, stage.search.eta, state.noise)
            cut, dropped = decide(i, alive, scores, cut) if decide is not None else (cut, [])
            going = {names[j] for j in cut.going_on}
            state.rungs.append({**rung, "kept": [names[j] for j in cut.kept], "ties": [names[j] for j in cut.ties],
                                "cut": [names[j] for j in cut.cut], "ties_dropped": [names[j] for j in dropped]})
        alive = [r for r in alive if r.name in going]
    raise AssertionError("the top rung ends every replay")  # pragma: no cover


def _measure_noise(state: SearchState, members: list[StudyRun], scores: dict, steps: int) -> bool:
    """The noise at a rung: the spread of the reference's score at the rung's step over its seeds. False (no more
    measuring) when one of them has no finite score."""
    seeds = ", ".join(str(m.settings.get("seed", TrainConfig.seed)) for m in members)
    if any(scores[m.name] is None for m in members):
        state.noise, state.noise_steps = None, None
        state.noise_how = (f"not measured at step {steps}: {members[0].name} or a seed replicate of it (seeds "
                           f"{seeds}) has no finite validation loss there")
        return False
    values = [scores[m.name] for m in members]
    state.noise, state.noise_steps = max(values) - min(values), steps
    state.noise_how = (f"the spread of {members[0].name}'s validation loss at step {steps} over seeds {seeds} "
                       f"({state.noise:.4g})")
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
        options[stage.name] = [stage_runs(stage, inherited(plan, base), base) for base in bases]
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
