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
from data.lotka_volterra import load_or_simulate, split_indices
from forecasting.budget import record_dir_of
from forecasting.config import ForecastConfig
from forecasting.evaluate import FORECAST_METRICS, select_trajectories
from forecasting.forecast import generation_plan, target_tokens
from forecasting.grammar import max_forecast_tokens
from ledger import RECORD_NAME, Ledger, read_record, totals
from qwen_mini.config import config_for_model
from qwen_mini.flop_report import format_flops, log10
from qwen_mini.model import meta_model
from training.budget import plan_run_flops
from training.config import TrainConfig
from training.rundir import holds_run, resume_point

from .halving import keep_count
from .plan import Plan, Stage, StudyRun, forecast_config, forecast_out, is_complete
from .standing import forecast_targets, replay, replicates, resolve

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
        return self.committed + self.needed <= self.budget

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
    return PlanEstimate(stages, ledger.max_flops, totals(records).committed, gqa)


def _booked(record_dir: Path) -> dict:
    path = record_dir / RECORD_NAME
    return read_record(path).by_kind if path.is_file() else {"train": 0, "eval": 0, "forecast": 0}


def _most_expensive(estimates: list[StageEstimate], stage: Stage, what: str) -> StageEstimate:
    chosen = max(estimates, key=lambda e: e.total)
    if len(estimates) > 1:
        chosen.note = f"{what}: at most, over {len(estimates)} possibilities until {stage.source} has run"
    else:
        chosen.note = what
    return chosen


_RUN_FLOPS: dict[tuple, object] = {}


def remembered_run_flops(config: TrainConfig, step: int, gqa: str):
    """training.budget.plan_run_flops, remembered: a plan counts the same settings many times over its
    possibilities."""
    values = {k: v for k, v in config.to_dict().items() if k not in ("out", "resume")}  # not what it computes
    key = (json.dumps(values, sort_keys=True, default=str), step, gqa)
    if key not in _RUN_FLOPS:
        _RUN_FLOPS[key] = plan_run_flops(config, step, gqa)
    return _RUN_FLOPS[key]


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
    """A search's FLOPs rung by rung: every configuration to the first rung, the noise replicates, then at each later
    rung the configurations known to go on, or, for a rung not decided yet, the most expensive keep_count of the rung
    before."""
    state = replay(plan, stage, runs)
    est = StageEstimate(stage.name, "train", len(runs))

    def cost(run: StudyRun, start: int, end: int):
        return remembered_run_flops(run.config(plan, steps=end), start, gqa)

    def segment(run: StudyRun, start: int, end: int) -> None:
        whole = cost(run, start, end)
        est.train, est.eval = est.train + whole.train, est.eval + whole.eval
        est.left += still_needed(plan, run, gqa, start, end)

    alive, start, counts, replicas = list(runs), 0, [], []
    for i, steps in enumerate(state.ladder):
        if i > 0:
            if i <= len(state.rungs) and "winner" not in state.rungs[i - 1]:
                going = set(state.rungs[i - 1].get("kept", [])) | set(state.rungs[i - 1].get("ties", []))
                alive = [r for r in alive if r.name in going]
            else:  # not decided yet: the most expensive survivors
                alive = sorted(alive, key=lambda r: -cost(r, start, steps).total)[:keep_count(len(alive),
                                                                                              stage.search.eta)]
        counts.append(len(alive))
        for run in alive:
            segment(run, start, steps)
        if i == 0 and len(state.ladder) > 1:  # the noise replicates, at most those of the dearest configuration
            replicas = state.noise_runs or replicates(stage, max(runs, key=lambda r: cost(r, 0, steps).total), steps)
            for run in replicas:
                segment(run, 0, steps)
        start = steps
    flops = search_flops(plan, runs, state.noise_runs, gqa)
    est.spent = flops["search"]
    est.search = {"eta": stage.search.eta, "ladder": state.ladder, "counts": counts,
                  "exact": state.done or len({cost(r, 0, state.ladder[-1]).per_step for r in runs}) == 1,
                  "grid": flops["grid"], "grid_train": flops["grid_train"], "train": est.train,
                  "replicates": len(replicas)}
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
            whole = remembered_run_flops(config, 0, gqa)
            est.train, est.eval = est.train + whole.train, est.eval + whole.eval
            booked = _booked(run.run_dir(plan))
            est.spent += booked["train"] + booked["eval"]
            est.left += still_needed(plan, run, gqa)
        estimates.append(est)
    return _most_expensive(estimates, stage, f"from the best run of {stage.source}" if stage.source else "")


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
    return "\n".join(lines)


def search_line(stage: StageEstimate) -> str:
    """What a search costs rung by rung, against the same configurations as a full grid."""
    search = stage.search
    rungs = ", ".join(f"{n} x {steps}" for n, steps in zip(search["counts"], search["ladder"]))
    replicas = f" + {search['replicates']} noise replicate(s) x {search['ladder'][0]}" if search["replicates"] else ""
    bound = "" if search["exact"] else " at most (the configurations' steps cost differently: the dearest go on)"
    return (f"search {stage.name}: successive halving, eta {search['eta']}: configurations x steps reached "
            f"{rungs}{replicas}: training {format_flops(search['train'])}, in all {format_flops(stage.total)}{bound}; "
            f"as a full grid to {search['ladder'][-1]} steps: training {format_flops(search['grid_train'])}, in all "
            f"{format_flops(search['grid'])} (the search: {100 * search['train'] / search['grid_train']:.0f} % of "
            "its training FLOPs)")


# ---- one forecast --------------------------------------------------------------------------------------------------

def planned_forecast(plan: Plan, stage: Stage, run: StudyRun | None, gqa: str) -> tuple[int, int]:
    """(estimate, upper bound) of one forecast's FLOPs: the model's, and the untrained baseline's when it runs."""
    config = forecast_config(plan, stage)
    train = TrainConfig(**(run.settings if run is not None else plan.train))
    methods = 2 if run is not None and "untrained" in config.baselines else 1
    estimate, bound = _forecast_flops(config, train.data, train.split_mode, train.split_seed, train.decimals,
                                      train.model, gqa)
    return methods * estimate, methods * bound


@functools.lru_cache(maxsize=64)
def _forecast_flops(config: ForecastConfig, data_path, split_mode: str, split_seed: int, decimals: int,
                    model_spec: str, gqa: str) -> tuple[int, int]:
    """(estimate, bound) of one forecast of `model_spec` (what it is forecast with does not depend on the rank or
    the context it was trained with: adapters are merged)."""
    train = TrainConfig(model=model_spec, data=data_path, split_mode=split_mode, split_seed=split_seed,
                        decimals=decimals)
    data = load_or_simulate(train.data)
    split = split_indices(len(data), seed=train.split_seed, mode=train.split_mode)
    indices = select_trajectories(split, config.split, None, config.limit).indices
    examples = [make_eval_example(data.trajectories[i], i, config.context, config.horizon, train.decimals)
                for i in indices]
    prompts = [len(ex.prompt) for ex in examples]  # one token per character (see the module docstring)
    model = meta_model(config_for_model(train.model))
    longest = max_forecast_tokens(config.horizon, data.trajectories.shape[2], train.decimals, config.int_digits,
                                  config.allow_negative)
    options = dict(batch=config.batch, num_samples=config.num_samples, constrained=config.constrained,
                   allow_negative=config.allow_negative, gqa=gqa)
    estimate = generation_plan(model, prompts, [target_tokens(ex, train.decimals) for ex in examples], **options)
    return estimate, generation_plan(model, prompts, [longest] * len(examples), **options)
