"""A study plan: a TOML file of stages — a grid, a sweep from the best run of a stage, a final run, forecasts —
counted before anything runs (`estimate_plan`, `flops.py --plan`) and run stage by stage (`run_plan`,
`train.py --plan`), continuing a stopped study where it stopped.

    [study]
    name = "coursework"              # its directory: <runs_dir>/<name>/<stage>/<run>
    runs_dir = "runs"                # optional; the ledger it spends from (train.py --runs-dir overrides)
    max_flops = 1e17                 # optional (default 1e17)
    gqa = "mha"                      # optional: the ledger's counting convention

    [train]                          # every training run's settings: train.py's flags, with underscores
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    batch = 4

    [forecast]                       # every forecast's settings: forecast.py's flags, with underscores
    limit = 50
    baselines = ["persistence", "lv_fit"]

    [[stage]]                        # a training stage: lists make a grid (every combination)
    name = "grid"
    lr = [1e-5, 1e-4]
    rank = [4, 8]
    steps = 300

    [[stage]]
    name = "context"
    from = "grid"                    # the settings of the grid's best run (lowest validation loss), then these
    ctx = [256, 512, 768]

    [[stage]]                        # a forecast stage: "base" (the untrained model) or a stage's runs
    name = "test"
    forecast = "context"
    which = "best"                   # or "all" (default)

Planning counts every run with `training.loop.plan_run` (training steps + validation passes) and every forecast with
`forecasting.forecast.generation_plan`: prompts as long as their LLMTIME text (one token per character, which the
number grammar requires of a tokenizer), forecasts as long as the true continuation (an estimate; the reservation
a forecast makes uses the grammar's longest forecast). A stage that starts from a stage not yet run is counted at
its most expensive possible setting.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from data.dataset import make_eval_example
from data.lotka_volterra import load_or_simulate, split_indices
from forecasting.budget import Booking, budgeted_evaluate, record_dir_of
from forecasting.evaluate import BASELINES, Protocol, select_trajectories, write_outputs
from forecasting.forecast import generation_plan, target_tokens
from forecasting.grammar import max_forecast_tokens
from forecasting.source import from_model, from_run, parse_dtype, pick_device
from ledger import DEFAULT_BUDGET, RECORD_NAME, BudgetExceeded, Ledger, log10, read_record, totals
from qwen_mini.fileio import write_json_atomic
from qwen_mini.flops import GQA_MODES, format_flops, meta_model
from training.config import ConfigError, TrainConfig
from training.loop import holds_run, model_config_of, plan_run, start_point, train_run
from training.run import ADAPTER_DIR, METRICS_NAME, MODEL_DIR, read_metrics

STUDY_FILE = "study.json"
FORECAST_METRICS = "metrics.json"
# TrainConfig fields a plan may set (the rest belong to the study or to each run's place).
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in ("out", "resume", "runs_dir", "max_flops", "gqa", "no_budget"))
FORECAST_DEFAULTS = {"split": "test", "limit": None, "context": 50, "horizon": 50, "batch": 32,
                     "baselines": list(BASELINES), "num_samples": 1, "temperature": 0.0, "top_p": None,
                     "int_digits": 3, "allow_negative": False, "constrained": True, "seed": 0}
STUDY_KEYS = ("name", "runs_dir", "max_flops", "gqa")


class PlanError(ValueError):
    """A plan file that cannot be read or run."""


# ---- the plan ------------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    kind: str  # "train" or "forecast"
    settings: dict  # train: fixed TrainConfig values; forecast: forecast settings over the plan's [forecast]
    grid: dict = field(default_factory=dict)  # train: the listed values, one run per combination
    source: str | None = None  # train: the stage whose best run it starts from; forecast: "base" or a stage
    which: str = "all"  # forecast: every run of the source stage, or its best


@dataclass
class Plan:
    path: Path
    text: str
    name: str
    runs_dir: Path
    max_flops: int
    gqa: str | None
    train: dict
    forecast: dict
    stages: list[Stage]

    @property
    def study_dir(self) -> Path:
        return self.runs_dir / self.name

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def _number(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or int(value) != value:
        raise PlanError(f"{name} must be a positive whole number such as 1e17, got {value!r}")
    return int(value)


def load_plan(path, runs_dir=None, max_flops=None, gqa=None) -> Plan:
    """Read and check a plan; `runs_dir`, `max_flops`, `gqa` (when not None) override the plan's [study]."""
    path = Path(path)
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except OSError as e:
        raise PlanError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(raw) - {"study", "train", "forecast", "stage"})
    if unknown:
        raise PlanError(f"{path}: unknown table(s) {', '.join(unknown)}; a plan has [study], [train], [forecast] "
                        "and [[stage]]")
    study = raw.get("study", {})
    bad = sorted(set(study) - set(STUDY_KEYS))
    if bad:
        raise PlanError(f"{path}: [study] does not take {', '.join(bad)} (it takes {', '.join(STUDY_KEYS)})")
    name = study.get("name") or path.stem
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        raise PlanError(f"{path}: [study] name must be a plain directory name, got {name!r}")
    gqa = gqa if gqa is not None else study.get("gqa")
    if gqa is not None and gqa not in GQA_MODES:
        raise PlanError(f"{path}: gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
    train = raw.get("train", {})
    _check_keys(path, "[train]", train, TRAIN_KEYS)
    forecast = {**FORECAST_DEFAULTS, **raw.get("forecast", {})}
    _check_keys(path, "[forecast]", forecast, tuple(FORECAST_DEFAULTS))
    plan = Plan(path, text, name, Path(runs_dir if runs_dir is not None else study.get("runs_dir", "runs")),
                _number("max_flops", max_flops if max_flops is not None else study.get("max_flops", DEFAULT_BUDGET)),
                gqa, train, forecast, [])
    stages = raw.get("stage", [])
    if not stages:
        raise PlanError(f"{path}: no [[stage]]: a plan needs at least one")
    for number, table in enumerate(stages, start=1):
        plan.stages.append(_stage(path, number, table, plan))
    return plan


def _check_keys(path, where: str, table: dict, allowed) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise PlanError(f"{path}: {where} does not take {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}")


def _stage(path, number: int, table: dict, plan: Plan) -> Stage:
    table = dict(table)
    name = table.pop("name", None)
    where = f"{path}: stage {number}" + (f" ({name})" if name else "")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise PlanError(f"{where}: every stage needs a plain `name`")
    if any(s.name == name for s in plan.stages):
        raise PlanError(f"{where}: two stages are named {name!r}")
    earlier = {s.name: s for s in plan.stages}
    if "forecast" in table:
        source, which = table.pop("forecast"), table.pop("which", "all")
        if source != "base" and source not in earlier:
            raise PlanError(f"{where}: forecast = {source!r} must be \"base\" or an earlier stage")
        if source != "base" and earlier[source].kind != "train":
            raise PlanError(f"{where}: forecast = {source!r} names a forecast stage; name a training stage")
        if which not in ("all", "best"):
            raise PlanError(f"{where}: which must be \"all\" or \"best\", got {which!r}")
        _check_keys(path, f"stage {name}", table, tuple(FORECAST_DEFAULTS))
        return Stage(name, "forecast", table, source=source, which=which)
    source = table.pop("from", None)
    if source is not None and (source not in earlier or earlier[source].kind != "train"):
        raise PlanError(f"{where}: from = {source!r} must name an earlier training stage")
    _check_keys(path, f"stage {name}", table, TRAIN_KEYS)
    grid = {k: v for k, v in table.items() if isinstance(v, list) and k != "targets"}
    if "targets" in table and isinstance(table["targets"], list) and table["targets"] \
            and isinstance(table["targets"][0], list):
        grid["targets"] = table["targets"]  # a list of target lists is a grid over targets
    if any(len(values) == 0 for values in grid.values()):
        raise PlanError(f"{where}: an empty list leaves the grid without runs")
    fixed = {k: v for k, v in table.items() if k not in grid}
    stage = Stage(name, "train", fixed, grid, source)
    for settings in _combinations(stage, {**plan.train}):  # every run's settings must make a TrainConfig
        _config(settings, where)
    return stage


# ---- runs of a stage -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedRun:
    stage: str
    name: str
    settings: dict  # TrainConfig values, without the run's place

    def run_dir(self, plan: Plan) -> Path:
        return plan.study_dir / self.stage / self.name

    def config(self, plan: Plan, **overrides) -> TrainConfig:
        return TrainConfig(**{**self.settings, **overrides}, out=str(self.run_dir(plan)), runs_dir=str(plan.runs_dir),
                           max_flops=plan.max_flops, gqa=plan.gqa)


def _config(settings: dict, where) -> TrainConfig:
    try:
        return TrainConfig(**settings)
    except (ConfigError, TypeError) as e:
        raise PlanError(f"{where}: {e}") from None


def _combinations(stage: Stage, base: dict) -> list[dict]:
    keys = list(stage.grid)
    return [{**base, **stage.settings, **dict(zip(keys, values))}
            for values in itertools.product(*(stage.grid[k] for k in keys))]


def stage_runs(stage: Stage, base: dict, base_run: PlannedRun | None = None) -> list[PlannedRun]:
    """The runs of a training stage that starts from `base` (the plan's [train], or the settings of `base_run`, the
    best run of an earlier stage). A run with exactly `base_run`'s settings is that run itself, not trained again."""
    runs = []
    for settings in _combinations(stage, base):
        config = _config(settings, f"stage {stage.name}")
        if base_run is not None and config.to_dict() == _config(base_run.settings, base_run.stage).to_dict():
            runs.append(base_run)
            continue
        extra = "".join(f"_{k}{settings[k]}" for k in stage.grid if k not in ("lr", "rank", "ctx", "model", "full"))
        runs.append(PlannedRun(stage.name, config.run_name + extra.replace("/", "-"), settings))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise PlanError(f"stage {stage.name}: two runs would share a directory ({names})")
    return runs


def is_complete(run_dir: Path, steps: int) -> bool:
    """The run trained all its steps and saved its weights (adapter or model)."""
    metrics = read_metrics(run_dir, drop_torn_tail=True) if (run_dir / METRICS_NAME).is_file() else []
    saved = (run_dir / ADAPTER_DIR).is_dir() or (run_dir / MODEL_DIR).is_dir()
    return saved and bool(metrics) and metrics[-1]["step"] >= steps


def best_val_loss(run_dir: Path) -> float | None:
    losses = [m["val_loss"] for m in read_metrics(run_dir, drop_torn_tail=True) if m.get("val_loss") is not None] \
        if (run_dir / METRICS_NAME).is_file() else []
    return min(losses) if losses else None


def best_run(runs: list[PlannedRun], plan: Plan) -> PlannedRun:
    """The run with the lowest validation loss (the first of equals)."""
    scored = [(best_val_loss(r.run_dir(plan)), i, r) for i, r in enumerate(runs)]
    scored = [s for s in scored if s[0] is not None]
    if not scored:
        raise PlanError(f"stage {runs[0].stage}: no run has a validation loss to choose the best by")
    return min(scored, key=lambda s: (s[0], s[1]))[2]


def resolve(plan: Plan) -> dict[str, list[list[PlannedRun]]]:
    """Each training stage's possible run lists: one list once its source stage is complete (its best run known),
    else one per run the source stage could pick."""
    options: dict[str, list[list[PlannedRun]]] = {}
    for stage in plan.stages:
        if stage.kind != "train":
            continue
        if stage.source is None:
            options[stage.name] = [stage_runs(stage, plan.train)]
            continue
        source = options[stage.source]
        if len(source) == 1 and all(is_complete(r.run_dir(plan), r.settings.get("steps", TrainConfig.steps))
                                    for r in source[0]):
            bases = [best_run(source[0], plan)]
        else:
            bases = [r for runs in source for r in runs]
        options[stage.name] = [stage_runs(stage, {**plan.train, **base.settings}, base) for base in bases]
    return options


# ---- forecasts -----------------------------------------------------------------------------------------------------

def forecast_settings(plan: Plan, stage: Stage) -> dict:
    return {**plan.forecast, **stage.settings}


def forecast_out(plan: Plan, stage: Stage, run: PlannedRun | None) -> Path:
    """A forecast's output directory: <study>/<stage>/ for the base model, <study>/<stage>/<run>/ for a run."""
    return plan.study_dir / stage.name / (run.name if run is not None else "")


def protocol_of(settings: dict, decimals: int) -> Protocol:
    return Protocol(settings["context"], settings["horizon"], decimals, settings["constrained"],
                    settings["num_samples"], settings["temperature"], settings["top_p"], settings["seed"],
                    settings["int_digits"], settings["allow_negative"])


def forecast_targets(plan: Plan, stage: Stage, options: dict) -> list[list[PlannedRun | None]]:
    """Possible target lists of a forecast stage (None: the base model)."""
    if stage.source == "base":
        return [[None]]
    lists = options[stage.source]
    if stage.which == "all":
        return [list(runs) for runs in lists]
    if len(lists) == 1 and all(is_complete(r.run_dir(plan), r.settings.get("steps", TrainConfig.steps))
                               for r in lists[0]):
        return [[best_run(lists[0], plan)]]
    return [[r] for runs in lists for r in runs]


def planned_forecast(plan: Plan, stage: Stage, run: PlannedRun | None, gqa: str) -> tuple[int, int]:
    """(estimate, upper bound) of one forecast's FLOPs: the model's, and the untrained baseline's when it runs."""
    settings = forecast_settings(plan, stage)
    train = TrainConfig(**(run.settings if run is not None else plan.train))
    methods = 2 if run is not None and "untrained" in settings["baselines"] else 1
    estimate, bound = _forecast_flops(json.dumps(settings, sort_keys=True), train.data, train.split_mode,
                                      train.split_seed, train.decimals, train.model, gqa)
    return methods * estimate, methods * bound


@functools.lru_cache(maxsize=64)
def _forecast_flops(settings_json: str, data_path, split_mode: str, split_seed: int, decimals: int, model_spec: str,
                    gqa: str) -> tuple[int, int]:
    """(estimate, bound) of one forecast of `model_spec` (what it is forecast with does not depend on the rank or
    the context it was trained with: adapters are merged)."""
    settings = json.loads(settings_json)
    train = TrainConfig(model=model_spec, data=data_path, split_mode=split_mode, split_seed=split_seed,
                        decimals=decimals)
    data = load_or_simulate(train.data)
    split = split_indices(len(data), seed=train.split_seed, mode=train.split_mode)
    indices = select_trajectories(split, settings["split"], None, settings["limit"]).indices
    examples = [make_eval_example(data.trajectories[i], i, settings["context"], settings["horizon"], train.decimals)
                for i in indices]
    prompts = [len(ex.prompt) for ex in examples]  # one token per character (see the module docstring)
    model = meta_model(model_config_of(train.model))
    longest = max_forecast_tokens(settings["horizon"], data.trajectories.shape[2], train.decimals,
                                  settings["int_digits"], settings["allow_negative"])
    options = dict(batch=settings["batch"], num_samples=settings["num_samples"], constrained=settings["constrained"],
                   allow_negative=settings["allow_negative"], gqa=gqa)
    estimate = generation_plan(model, prompts, [target_tokens(ex, train.decimals) for ex in examples], **options)
    return estimate, generation_plan(model, prompts, [longest] * len(examples), **options)


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
    ledger = Ledger(plan.runs_dir, plan.max_flops)
    records = ledger.records()
    gqa = ledger.convention(plan.gqa, records)
    options = resolve(plan)
    stages = []
    for stage in plan.stages:
        if stage.kind == "train":
            stages.append(_estimate_training(plan, stage, options[stage.name], gqa))
        else:
            stages.append(_estimate_forecasts(plan, stage, forecast_targets(plan, stage, options), gqa))
    return PlanEstimate(stages, plan.max_flops, totals(records).committed, gqa)


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


_PLANNED: dict[tuple, object] = {}


def _plan_run(config: TrainConfig, step: int, gqa: str):
    """training.loop.plan_run, remembered: a plan counts the same settings many times over its possibilities."""
    values = {k: v for k, v in config.to_dict().items() if k not in ("out", "resume")}  # not what it computes
    key = (json.dumps(values, sort_keys=True, default=str), step, gqa)
    if key not in _PLANNED:
        _PLANNED[key] = plan_run(config, step, gqa)
    return _PLANNED[key]


def _estimate_training(plan: Plan, stage: Stage, options: list[list[PlannedRun]], gqa: str) -> StageEstimate:
    estimates = []
    for runs in options:
        est = StageEstimate(stage.name, "train", len(runs))
        for run in runs:
            if run.stage != stage.name:
                continue  # the earlier stage's best run, reused: counted there
            config = run.config(plan)
            whole = _plan_run(config, 0, gqa)
            est.train, est.eval = est.train + whole.train, est.eval + whole.eval
            booked = _booked(run.run_dir(plan))
            est.spent += booked["train"] + booked["eval"]
            if not is_complete(run.run_dir(plan), config.steps):
                step = start_point(dataclasses.replace(config, resume=True)).step if holds_run(config.run_dir) else 0
                est.left += _plan_run(config, step, gqa).total
        estimates.append(est)
    return _most_expensive(estimates, stage, f"from the best run of {stage.source}" if stage.source else "")


def _estimate_forecasts(plan: Plan, stage: Stage, options: list[list[PlannedRun | None]], gqa: str
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
    return "\n".join(lines)


# ---- running it ----------------------------------------------------------------------------------------------------

def check_study_dir(plan: Plan) -> None:
    """A study directory belongs to one plan: refuse to continue it with another."""
    path = plan.study_dir / STUDY_FILE
    if path.is_file():
        recorded = json.loads(path.read_text()).get("plan_sha256")
        if recorded and recorded != plan.digest:
            raise PlanError(f"{plan.study_dir} holds a study started from another version of a plan (sha256 "
                            f"{recorded}, {plan.path} is {plan.digest}): restore that plan, or give this one "
                            "another [study] name")


def write_study(plan: Plan, done: dict) -> None:
    write_json_atomic(plan.study_dir / STUDY_FILE, {
        "name": plan.name, "plan": str(plan.path.resolve()), "plan_sha256": plan.digest, "plan_text": plan.text,
        "runs_dir": str(plan.runs_dir.resolve()), "max_flops": plan.max_flops, "gqa": plan.gqa,
        "stages": [done[s.name] for s in plan.stages if s.name in done]})


def run_plan(plan: Plan, *, device: str | None = None, dtype: str | None = None, seed: int | None = None,
             progress: bool = True, log=print) -> dict:
    """Run the plan stage by stage; a stage's finished runs and forecasts are kept, an unfinished run is resumed.
    Refuses (BudgetExceeded) before anything runs if the rest of the plan does not fit. `device`, `dtype`, `seed`
    (when not None) override the plan's. Returns study.json's dict."""
    check_study_dir(plan)
    estimate = estimate_plan(plan)
    log(format_estimate(plan, estimate))
    if not estimate.fits:
        left = estimate.budget - estimate.committed
        raise BudgetExceeded(f"the rest of plan {plan.path} needs up to {format_flops(estimate.needed)} FLOPs, "
                             f"{format_flops(left)} are left in {plan.runs_dir} (budget {format_flops(plan.max_flops)})")
    overrides = {k: v for k, v in (("device", device), ("dtype", dtype), ("seed", seed)) if v is not None}
    done: dict[str, dict] = {}
    bests: dict[str, tuple[list[PlannedRun], PlannedRun]] = {}
    for stage in plan.stages:
        if stage.kind == "train":
            best_before = bests[stage.source][1] if stage.source is not None else None
            runs = stage_runs(stage, {**plan.train, **(best_before.settings if best_before else {})}, best_before)
            for run in runs:
                _train(plan, run, overrides, progress, log)
            best = best_run(runs, plan)
            bests[stage.name] = (runs, best)
            done[stage.name] = {"name": stage.name, "kind": "train", "from": stage.source,
                                "varied": sorted(stage.grid), "runs": [str(r.run_dir(plan)) for r in runs],
                                "best": str(best.run_dir(plan)), "best_val_loss": best_val_loss(best.run_dir(plan))}
        else:
            if stage.source == "base":
                targets = [None]
            else:
                runs, best = bests[stage.source]
                targets = runs if stage.which == "all" else [best]
            outs = [_forecast(plan, stage, run, overrides, progress, log) for run in targets]
            done[stage.name] = {"name": stage.name, "kind": "forecast", "of": stage.source, "which": stage.which,
                                "forecasts": [str(out) for out in outs],
                                "runs": [str(r.run_dir(plan)) for r in targets if r is not None]}
        write_study(plan, done)
    return json.loads((plan.study_dir / STUDY_FILE).read_text())


def _train(plan: Plan, run: PlannedRun, overrides: dict, progress: bool, log) -> None:
    run_dir = run.run_dir(plan)
    config = run.config(plan, **overrides)
    if is_complete(run_dir, config.steps):
        log(f"[plan] {run.stage}/{run.name}: done already")
        return
    resume = holds_run(run_dir)
    log(f"[plan] {run.stage}/{run.name}: {'resuming' if resume else 'training'} ({config.steps} steps)")
    train_run(dataclasses.replace(config, resume=resume), progress=progress)


def _forecast(plan: Plan, stage: Stage, run: PlannedRun | None, overrides: dict, progress: bool, log) -> Path:
    out = forecast_out(plan, stage, run)
    if (out / FORECAST_METRICS).is_file():
        log(f"[plan] {stage.name}: {out} done already")
        return out
    settings = forecast_settings(plan, stage)
    if "seed" in overrides:
        settings["seed"] = overrides["seed"]
    train = TrainConfig(**{**(run.settings if run is not None else plan.train), **overrides})
    device, dtype = pick_device(train.device), parse_dtype(overrides.get("dtype", "auto"))
    if run is not None:
        source = from_run(run.run_dir(plan), context=settings["context"], device=device, dtype=dtype)
    else:
        source = from_model(train.model, data_path=train.data, decimals=train.decimals, device=device,
                            dtype=dtype)
    selection = select_trajectories(source.split, settings["split"], None, settings["limit"])
    log(f"[plan] {stage.name}: forecasting {selection.label} with {source.label} -> {out}")
    booking = Booking(plan.runs_dir, plan.max_flops, plan.gqa)
    evaluation, _ = budgeted_evaluate(source, selection, protocol_of(settings, source.decimals), out=out,
                                      run_dir=run.run_dir(plan) if run is not None else None,
                                      baselines=settings["baselines"], batch=settings["batch"], booking=booking,
                                      progress=progress)
    evaluation.notes[:0] = [f"split: {source.split_origin}", *source.notes]
    write_outputs(evaluation, out)
    return out
