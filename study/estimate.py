"""A study plan's FLOPs before anything runs (`estimate_plan`; `flops.py --plan` prints `format_estimate`): every
stage's training, validation and forecasting FLOPs, what the ledger already holds of them, and whether the rest
fits the budget.

Planning counts every run with `training.budget.plan_run_flops` (training steps + validation passes) and every forecast
with `forecasting.forecast.generation_plan`: prompts as long as their LLMTIME text (one token per character, which the
number grammar requires of a tokenizer), forecasts as long as the true continuation (an estimate; the reservation a
forecast makes uses the grammar's longest forecast). A stage that starts from a stage not yet run is counted at its most
expensive possible setting.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from data.dataset import make_eval_example
from data.llmtime import DEFAULT_SCALER
from data.lotka_volterra import load_or_simulate, split_indices
from forecasting.budget import record_dir_of
from forecasting.config import ForecastConfig
from forecasting.evaluate import FORECAST_METRICS, select_trajectories
from forecasting.forecast import generation_plan, target_tokens
from forecasting.grammar import max_forecast_tokens
from forecasting.tuning import validation_temperatures
from ledger import RECORD_NAME, BudgetExceeded, Ledger, read_record, totals
from qwen_mini.config import config_for_model
from qwen_mini.flop_report import format_flops, log10
from qwen_mini.model import meta_model
from training.budget import RunFlopPlan, evaluation_count, plan_run_flops, steps_within
from training.config import MAX_STEPS, ConfigError, TrainConfig
from training.run import CONFIG_NAME, read_run_config
from training.rundir import holds_run, resume_point

from .halving import keep_count
from .plan import Plan, Stage, StudyRun, forecast_config, forecast_out, is_complete
from .standing import forecast_targets, recorded_search, replay, replicates, resolve

# ---- the estimate --------------------------------------------------------------------------------------------------

@dataclass
class StageEstimate:
    name: str
    kind: str
    runs: int  # runs trained, or forecasts made
    train: int = 0
    eval: int = 0
    forecast: int = 0
    spent: int = 0  # already booked by this stage's runs and forecasts
    left: int = 0  # what its unfinished work still needs (estimate)
    excess: int = 0  # the most one unfinished job's reservation exceeds its estimate (forecasts: longest outputs)
    note: str = ""
    search: dict | None = None  # a search: its rungs and what its configurations would cost as a full grid
    steps: int | None = None  # a sized stage (steps = "rest", flops = N): its run's steps (now)
    short: str = ""  # a sized stage whose run would get fewer steps than it needs: why

    @property
    def total(self) -> int:
        return self.train + self.eval + self.forecast


@dataclass
class PlanEstimate:
    stages: list[StageEstimate]
    budget: int
    committed: int  # spent or reserved in the runs directory now (the whole ledger)
    gqa: str

    @property
    def total(self) -> int:
        return sum(s.total for s in self.stages)

    @property
    def left(self) -> int:
        return sum(s.left for s in self.stages)

    @property
    def needed(self) -> int:
        """What the rest of the study may have to hold at once: its estimate, plus the largest excess of one job's
        reservation over its estimate (jobs run one after another, each settled before the next reserves)."""
        return self.left + max([s.excess for s in self.stages] + [0])

    @property
    def fits(self) -> bool:
        return self.committed + self.needed <= self.budget and not any(s.short for s in self.stages)

    def to_dict(self) -> dict:
        return {"stages": [{**dataclasses.asdict(s), "total": s.total} for s in self.stages], "total": self.total,
                "left": self.left, "needed": self.needed, "budget": self.budget, "committed": self.committed,
                "fits": self.fits, "gqa": self.gqa}


def estimate_plan(plan: Plan) -> PlanEstimate:
    """Every stage's FLOPs (the most expensive possibility where an earlier stage's best is not known yet), what the
    ledger already holds of it, and what the rest needs."""
    ledger = Ledger(plan.runs_dir, plan.max_flops, change_max_flops=plan.change_max_flops)
    records = ledger.records()
    gqa = ledger.convention(plan.gqa, records)
    options = resolve(plan)
    stages = []
    for stage in plan.stages:
        if stage.kind == "train":
            stages.append(_estimate_training(plan, stage, options[stage.name], gqa))
        else:
            stages.append(_estimate_forecasts(plan, stage, forecast_targets(plan, stage, options), gqa))
    committed = totals(records).committed
    for i, stage in enumerate(plan.stages):  # after every other stage: `rest` is what they leave
        if stage.size is not None:
            others = stages[:i] + stages[i + 1:]
            room = stage.size if stage.size != "rest" else ledger.max_flops - committed - sum(s.left for s in others) \
                - max([s.excess for s in others] + [0])
            stages[i] = _most_expensive([_estimate_sized(plan, stage, runs, room, gqa) for runs in options[stage.name]],
                                        stage, "")
    return PlanEstimate(stages, ledger.max_flops, committed, gqa)


MIN_SIZED_STEPS = 10  # the fewest new steps a sized stage's run may get: fewer is a curve of a few points, no run


def _estimate_sized(plan: Plan, stage: Stage, runs: list[StudyRun], room: int, gqa: str) -> StageEstimate:
    """A sized stage's one run at the steps `room` FLOPs buy (steps = "rest": the cap less everything else of the
    plan; flops = N: N), or at the steps its config.json recorded once it started (a stopped study keeps them). Its
    run needs MIN_SIZED_STEPS new steps, and a continued run a stable phase that reaches the run it continues."""
    (run,) = runs
    start, run_dir, every = run.start, run.run_dir(plan), run.settings.get("eval_every")
    if stage.size == "rest" and (run_dir / RECORD_NAME).is_file():
        room += read_record(run_dir / RECORD_NAME).outstanding  # a reservation of its own that died with its process

    def enough(steps: int) -> bool:
        try:
            return run.config(plan, steps=steps).stable_steps >= start
        except ConfigError:  # a wsd warmup that would not end before the decay: too few steps
            return False

    recorded = (run_dir / CONFIG_NAME).is_file()
    per_pass = remembered_run_flops(run.config(plan), start, gqa)  # (the per-step and per-pass FLOPs)
    steps = read_run_config(run_dir)["steps"] if recorded else \
        min(steps_within(room, per_pass, start, lambda n: every or max(n // 10, 1)), MAX_STEPS)  # (the default
    # eval_every is TrainConfig's; a cap of 1e30 on a tiny model would buy more steps than a run may take)
    low, high = start + MIN_SIZED_STEPS, 10 * start + 10 ** 4  # enough() holds from some steps on: the least, or None
    while low < high:
        low, high = (low, (low + high) // 2) if enough((low + high) // 2) else ((low + high) // 2 + 1, high)
    least = low if enough(low) else None
    sized = dataclasses.replace(run, settings={**run.settings, "steps": max(steps, least or 0)})
    est = _estimate_training(plan, stage, [[sized]], gqa)
    est.steps = steps
    what = 'steps = "rest"' if stage.size == "rest" else f"flops = {format_flops(stage.size)}"
    origin = f" from step {start} of {run.continues.stage}/{run.continues.name}" if run.continues else ""
    est.note = f"{what}: {steps} steps{origin}" + (" (recorded when it started)" if recorded else " now")
    if not recorded and (least is None or steps < least):
        need = f"at least {least - start}" if least is not None else "a stable phase, which its decay leaves none of"
        if least is not None and least > start + MIN_SIZED_STEPS:
            need += f" (for its decay to start after step {start})"
        fix = "make the earlier stages cheaper, or raise max_flops" if stage.size == "rest" else "give it more flops"
        left = f" (the {format_flops(max(room, 0))} FLOPs left)" if stage.size == "rest" else ""
        est.short = (f"stage {stage.name}: {what} buys {steps - start} new steps{left} of {run.name}{origin}; it "
                     f"needs {need}: {fix}")
        est.note += f", too few ({need})"
    return est


def sized_runs(plan: Plan, stage: Stage, runs: list[StudyRun]) -> list[StudyRun]:
    """A sized stage's run at the steps it gets now (`estimate_plan`), when the stage starts; BudgetExceeded when
    they are fewer than it needs."""
    est = next(s for s in estimate_plan(plan).stages if s.name == stage.name)
    if est.short:
        raise BudgetExceeded(est.short)
    return [dataclasses.replace(run, settings={**run.settings, "steps": est.steps}) for run in runs]


def _booked(record_dir: Path) -> dict:
    path = record_dir / RECORD_NAME
    return read_record(path).by_kind if path.is_file() else {"train": 0, "eval": 0, "forecast": 0}


def _most_expensive(estimates: list[StageEstimate], stage: Stage, what: str) -> StageEstimate:
    chosen = max(estimates, key=lambda e: e.total)
    what = what or chosen.note  # (a sized stage's note: its steps)
    if len(estimates) > 1:
        chosen.note = f"{what}: at most, over {len(estimates)} possibilities until {stage.source} has run"
    else:
        chosen.note = what
    return chosen


_RUN_FLOPS: dict[tuple, RunFlopPlan] = {}
# Settings that change what a run learns, not what it computes (training.budget.plan_run_flops never reads them): a
# search over 1000 learning rates counts one run's FLOPs, not 1000.
NOT_COUNTED = ("out", "resume", "lr", "seed", "warmup", "schedule", "decay", "grad_clip", "weight_decay", "alpha",
               "checkpoint_every", "tensorboard", "tensorboard_dir", "continue_from",
               "steps", "eval_every")  # (the last two: below)


def remembered_run_flops(config: TrainConfig, step: int, gqa: str) -> RunFlopPlan:
    """training.budget.plan_run_flops, its per-step and per-pass FLOPs remembered: a plan counts the same settings
    many times over its possibilities and a search's rungs."""
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_COUNTED}
    key = (json.dumps(values, sort_keys=True, default=str), gqa)
    if key not in _RUN_FLOPS:
        _RUN_FLOPS[key] = plan_run_flops(config, 0, gqa)
    return dataclasses.replace(_RUN_FLOPS[key], steps=config.steps - step,
                               evaluations=evaluation_count(step, config.steps, config.eval_every))


def still_needed(plan: Plan, run: StudyRun, gqa: str, start: int = 0, end: int | None = None) -> int:
    """What `run` still computes to `end` steps (default: its own): 0 when it got there, else from its checkpoint
    (no earlier than `start`, where a search's rung begins)."""
    config = run.config(plan) if end is None else run.config(plan, steps=end)
    if is_complete(run.run_dir(plan), config.steps):
        return 0
    step = resume_point(dataclasses.replace(config, resume=True)).step if holds_run(config.run_dir) else start
    return remembered_run_flops(config, max(start, step), gqa).total


def search_flops(plan: Plan, runs: list[StudyRun], noise_runs: list[StudyRun], gqa: str) -> dict:
    """What a search spent (its configurations and seed replicates, from their records), and what the same
    configurations would cost as a full grid to the top rung (counted): study.json's "flops" of a search."""
    spent = [_booked(run.run_dir(plan)) for run in [*runs, *noise_runs]]
    grid = [remembered_run_flops(run.config(plan), 0, gqa) for run in runs]
    return {"search": sum(b["train"] + b["eval"] for b in spent), "search_train": sum(b["train"] for b in spent),
            "grid": sum(g.total for g in grid), "grid_train": sum(g.train for g in grid)}


def _estimate_search(plan: Plan, stage: Stage, runs: list[StudyRun], gqa: str) -> StageEstimate:
    """A search's FLOPs rung by rung, without ties within the noise: the configurations known to go on from a decided
    rung, else the dearest keep_count of the rung before; the noise's seed replicates to every rung, and its reference
    (the first rung's best; until known, the dearest configuration) apart wherever it is, or may be, cut. What ties
    could add: `search["with_ties"]`, every configuration to the top rung."""
    record = recorded_search(plan, stage.name)
    state = replay(plan, stage, runs, record)
    est = StageEstimate(stage.name, "train", len(runs))

    def cost(run: StudyRun, start: int, end: int):
        return remembered_run_flops(run.config(plan, steps=end), start, gqa)

    def segment(run: StudyRun, start: int, end: int) -> None:
        whole = cost(run, start, end)
        est.train, est.eval = est.train + whole.train, est.eval + whole.eval
        est.left += still_needed(plan, run, gqa, start, end)

    top = state.ladder[-1]
    measuring = len(state.ladder) > 1 and stage.search.noise_seeds != ()
    reference = state.reference or max(runs, key=lambda r: cost(r, 0, top).total)
    noise_runs = (state.noise_runs or replicates(stage, reference)) if measuring else []
    alive, start, counts, bounds = list(runs), 0, [], set()
    if len({cost(r, 0, top).per_step for r in runs}) > 1:
        bounds.add("the dearest configurations counted going on")
    for i, steps in enumerate(state.ladder):
        uncertain = False  # whether the reference may be cut here, not known yet
        if i > 0 and i <= len(state.rungs) and "winner" not in state.rungs[i - 1]:
            going = set(state.rungs[i - 1].get("kept", [])) | set(state.rungs[i - 1].get("ties", []))
            alive = [r for r in alive if r.name in going]
        elif i > 0:  # not decided yet: the most expensive survivors
            k = keep_count(len(alive), stage.search.eta)
            uncertain = measuring and state.noise_carried and k < len(alive) and reference in alive
            alive = sorted(alive, key=lambda r: -cost(r, start, steps).total)[:k]
        counts.append(len(alive))
        carrying = measuring and (i == 0 or state.noise_carried)  # (a search recorded before: its first rung only)
        carried = [reference] if carrying and i > 0 and (uncertain or reference not in alive) else []
        if uncertain:
            bounds.add("the noise's reference counted apart where it may be cut")
        for run in [*alive, *(noise_runs if carrying else []), *carried]:
            segment(run, start, steps)
        start = steps
    flops = search_flops(plan, runs, state.noise_runs, gqa)
    everything = [cost(r, 0, top) for r in [*runs, *noise_runs]]
    est.spent = flops["search"]
    est.search = {"eta": stage.search.eta, "ladder": state.ladder, "counts": counts,
                  "bounds": sorted(bounds) if not state.done else
                  ["a run that diverged counted to its rung's end"] if record.get("diverged") else [],
                  "grid": flops["grid"], "grid_train": flops["grid_train"], "train": est.train,
                  "replicates": len(noise_runs), "reference": reference.name if state.reference else None,
                  "with_ties": sum(c.total for c in everything), "done": state.done}
    return est


def _estimate_training(plan: Plan, stage: Stage, options: list[list[StudyRun]], gqa: str) -> StageEstimate:
    estimates = []
    for runs in options:
        if stage.search is not None:
            estimates.append(_estimate_search(plan, stage, runs, gqa))
            continue
        est = StageEstimate(stage.name, "train", len(runs))
        for run in runs:
            if run.stage != stage.name:
                continue  # the earlier stage's best run, reused: counted there
            config = run.config(plan)
            whole = remembered_run_flops(config, run.start, gqa)  # a continued run: only its own steps
            est.train, est.eval = est.train + whole.train, est.eval + whole.eval
            booked = _booked(run.run_dir(plan))
            est.spent += booked["train"] + booked["eval"]
            est.left += still_needed(plan, run, gqa, run.start)
        estimates.append(est)
    continued = next((r for runs in options for r in runs if r.continues is not None), None)
    what = f"from the best run of {stage.source}" if stage.source else ""
    if continued is not None:
        what += f"; its run of that run's settings continues it from step {continued.start}"
    return _most_expensive(estimates, stage, what)


def _estimate_forecasts(plan: Plan, stage: Stage, options: list[list[StudyRun | None]], gqa: str
                        ) -> StageEstimate:
    estimates = []
    for targets in options:
        est = StageEstimate(stage.name, "forecast", len(targets))
        for run in targets:
            estimate, bound = planned_forecast(plan, stage, run, gqa)
            est.forecast += estimate
            out = forecast_out(plan, stage, run)
            if (out / FORECAST_METRICS).is_file():
                record_dir = record_dir_of(run.run_dir(plan) if run is not None else None, out)
                est.spent += sum(e["flops"] for e in _forecast_entries(record_dir, out))
            else:
                est.left += estimate
                est.excess = max(est.excess, bound - estimate)
        estimates.append(est)
    what = "the untrained base model" if stage.source == "base" else f"{stage.which} of {stage.source}"
    return _most_expensive(estimates, stage, what)


def _forecast_entries(record_dir: Path, out: Path) -> list[dict]:
    path = record_dir / RECORD_NAME
    if not path.is_file():
        return []
    return [e for e in read_record(path).forecasts if e.get("out") == str(out.resolve())]


def format_estimate(plan: Plan, estimate: PlanEstimate) -> str:
    """The plan as a table: one line per stage, then the totals and whether the rest fits."""
    width = max(len("stage"), *(len(s.name) for s in estimate.stages))
    header = (f"{'stage':<{width}}  {'kind':<8}  {'runs':>4}  {'train':>9}  {'eval':>9}  {'forecast':>9}  "
              f"{'total':>9}  {'log10':>6}  {'spent':>9}  {'left':>9}  note")
    lines = [f"plan {plan.path} (study {plan.name} in {plan.runs_dir}, gqa={estimate.gqa}):", header,
             "-" * len(header)]
    for s in estimate.stages:
        lines.append(f"{s.name:<{width}}  {s.kind:<8}  {s.runs:>4}  {format_flops(s.train):>9}  "
                     f"{format_flops(s.eval):>9}  {format_flops(s.forecast):>9}  {format_flops(s.total):>9}  "
                     f"{log10(s.total) if s.total else 0:>6.2f}  {format_flops(s.spent):>9}  {format_flops(s.left):>9}"
                     f"  {s.note}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<{width}}  {'':<8}  {sum(s.runs for s in estimate.stages):>4}  "
                 f"{format_flops(sum(s.train for s in estimate.stages)):>9}  "
                 f"{format_flops(sum(s.eval for s in estimate.stages)):>9}  "
                 f"{format_flops(sum(s.forecast for s in estimate.stages)):>9}  {format_flops(estimate.total):>9}  "
                 f"{log10(estimate.total):>6.2f}  {'':>9}  {format_flops(estimate.left):>9}")
    left = estimate.budget - estimate.committed
    verdict = "fits" if estimate.fits else "DOES NOT FIT"
    lines.append(f"budget {format_flops(estimate.budget)}; spent or reserved in {plan.runs_dir} now "
                 f"{format_flops(estimate.committed)}, {format_flops(left)} left. The rest of the plan needs "
                 f"{format_flops(estimate.left)} (up to {format_flops(estimate.needed)} reserved at once, forecasts "
                 f"at their longest): {verdict}.")
    lines.append("forecasts: prompts one token per character, forecasts as long as the true continuation; eval: "
                 "--val-batches x --batch windows per pass")
    lines += [search_line(s) for s in estimate.stages if s.search is not None]
    lines += [f"refused: {s.short}" for s in estimate.stages if s.short]
    return "\n".join(lines)


def search_line(stage: StageEstimate) -> str:
    """What a search costs rung by rung, against the same configurations as a full grid; a warning where the search
    costs its grid or more."""
    search = stage.search
    rungs = ", ".join(f"{n} x {steps}" for n, steps in zip(search["counts"], search["ladder"]))
    if search["replicates"]:
        reference = search["reference"] or "the first rung's best"
        rungs += (f"; the noise: {search['replicates']} seed replicate(s) of {reference} to every rung, and it too "
                  "where it is cut")
    bound = f" at most: {'; '.join(search['bounds'])}" if search["bounds"] else " exact"
    bound = f"{bound}, every rung decided" if search["done"] else f" without ties,{bound}"
    text = (f"search {stage.name}: successive halving, eta {search['eta']}: configurations x steps reached {rungs}: "
            f"training {format_flops(search['train'])}, in all {format_flops(stage.total)}{bound}")
    if not search["done"]:
        text += (f"; each tie within the noise goes on too, while the plan fits the budget: at most "
                 f"{format_flops(search['with_ties'])} in all if every configuration did")
    share = 100 * search["train"] / search["grid_train"]
    text += (f"; as a full grid to {search['ladder'][-1]} steps: training {format_flops(search['grid_train'])}, in "
             f"all {format_flops(search['grid'])} (the search: {share:.0f} % of its training FLOPs)")
    if share >= 100 and not search["done"]:
        text += (f"\nwarning: search {stage.name} costs {share:.0f} % of the same configurations as a grid: too few "
                 "rungs or configurations to save anything; make it a grid (drop `search`), or give it more of them")
    return text


# ---- one forecast --------------------------------------------------------------------------------------------------

def planned_forecast(plan: Plan, stage: Stage, run: StudyRun | None, gqa: str) -> tuple[int, int]:
    """(estimate, upper bound) of one forecast's FLOPs: the model's, the untrained baseline's when it runs, and the
    model's forecasts of the validation split before them for temperature "auto" (one per temperature) or calibrate."""
    config = forecast_config(plan, stage)
    train = TrainConfig(**(run.settings if run is not None else plan.train))
    methods = 2 if run is not None and "untrained" in config.baselines else 1
    scaler = config.scaler or train.scaler  # a run forecasts with its own scaler; the base with [train]'s
    estimate, bound = _forecast_flops(config, train.data, train.split_mode, train.split_seed, train.decimals,
                                      train.model, gqa, scaler)
    estimate, bound = methods * estimate, methods * bound
    temperatures = validation_temperatures(config)  # --temperature auto / --calibrate: the validation forecasts
    if temperatures:
        validation = dataclasses.replace(config, split="val", limit=config.val_limit or config.limit,
                                         temperature=temperatures[0], calibrate=False, val_limit=None)
        one = _forecast_flops(validation, train.data, train.split_mode, train.split_seed, train.decimals,
                              train.model, gqa, scaler)
        estimate, bound = estimate + len(temperatures) * one[0], bound + len(temperatures) * one[1]
    return estimate, bound


@functools.lru_cache(maxsize=64)
def _forecast_flops(config: ForecastConfig, data_path, split_mode: str, split_seed: int, decimals: int,
                    model_spec: str, gqa: str, scaler: str = DEFAULT_SCALER) -> tuple[int, int]:
    """(estimate, bound) of one forecast of `model_spec` (what it is forecast with does not depend on the rank or
    the context it was trained with: adapters are merged)."""
    train = TrainConfig(model=model_spec, data=data_path, split_mode=split_mode, split_seed=split_seed,
                        decimals=decimals)
    data = load_or_simulate(train.data)
    split = split_indices(len(data), seed=train.split_seed, mode=train.split_mode)
    indices = select_trajectories(split, config.split, None, config.limit).indices
    examples = [make_eval_example(data.trajectories[i], i, config.context, config.horizon, train.decimals, scaler)
                for i in indices]
    prompts = [len(ex.prompt) for ex in examples]  # one token per character (see the module docstring)
    model = meta_model(config_for_model(train.model))
    longest = max_forecast_tokens(config.horizon, data.trajectories.shape[2], train.decimals, config.int_digits,
                                  config.allow_negative)
    options = dict(batch=config.batch, num_samples=config.num_samples, constrained=config.constrained,
                   allow_negative=config.allow_negative, gqa=gqa)
    estimate = generation_plan(model, prompts, [target_tokens(ex, train.decimals) for ex in examples], **options)
    return estimate, generation_plan(model, prompts, [longest] * len(examples), **options)
