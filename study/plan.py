"""A study plan: a TOML file of stages — a grid, a sweep from the best run of a stage, a search, a final run,
forecasts — read and checked (`load_plan`), and each training stage's runs (`stage_runs`). What the plan resolves to
on disk (each stage's winner, the runs it then trains) is `study.standing`; `study.estimate` counts its FLOPs before
anything runs (`flops.py --plan`); `study.run` runs it stage by stage (`train.py --plan`), continuing a stopped study
where it stopped.

    [study]
    name = "coursework"              # its directory: <runs_dir>/<name>/<stage>/<run>
    runs_dir = "runs"                # optional; the ledger it spends from (train.py --runs-dir overrides)
    max_flops = 1e17                 # optional (default: the runs directory's recorded cap, else 1e17)
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

    [[stage]]                        # a search: successive halving over a grid or drawn ranges (study.halving)
    name = "search"
    search = "halving"
    lr = {log = [1e-5, 1e-2]}
    configs = 27
    steps = 450

    [[stage]]
    name = "final"
    from = "search"                  # its winner's settings; a run of them (but the schedule) continues its checkpoint
    schedule = "wsd"                 # when it trained under the constant schedule (continue = false: from step 0)
    steps = "rest"                   # the cap minus everything else of the plan (or flops = 3.5e16: what it buys)

    [[stage]]                        # a forecast stage: "base" (the untrained model) or a stage's runs
    name = "test"
    forecast = "context"
    which = "best"                   # or "all" (default)
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from common.fields import SettingsError
from forecasting.config import ForecastConfig
from qwen_mini.flops import GQA_MODES
from training.config import CONTINUE_KEYS, MAX_STEPS, ConfigError, TrainConfig
from training.run import CONFIG_NAME, METRICS_NAME, read_metrics, weights_saved
from training.rundir import different_settings

from . import selection
from .halving import MAX_CONFIGS, SearchError, SearchSpec, config_names, draw_configs, parse_search, rung_steps, tag

# TrainConfig fields a plan may set (the rest belong to the study or to each run's place).
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in ("out", "resume", "runs_dir", "max_flops", "change_max_flops", "gqa", "no_budget",
                                     "tensorboard_dir", "continue_from"))
# ForecastConfig fields a plan may set; their defaults are ForecastConfig's (the decimals are each run's; the device
# and dtype come from the command line).
FORECAST_KEYS = ("split", "limit", "context", "horizon", "batch", "baselines", "num_samples", "temperature", "top_p",
                 "int_digits", "allow_negative", "constrained", "seed", "temperature_grid", "calibrate", "val_limit",
                 "scaler")
STUDY_KEYS = ("name", "runs_dir", "max_flops", "gqa")
STUDY_FILE = "study.json"  # in the study directory: what each stage did
# In the study directory: every run's TensorBoard events ([train] tensorboard = true), <stage>/<run> under it, so
# `tensorboard --logdir <study>/tensorboard` overlays them all.
TENSORBOARD_DIR = "tensorboard"
JOBS_DIR = "jobs"  # in the study directory: each stage's job specs and logs (train.py --plan --jobs N, --launcher)


class PlanError(ValueError):
    """A plan file that cannot be read or run."""


# ---- the plan ------------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    kind: str  # "train" or "forecast"
    settings: dict  # train: fixed TrainConfig values; forecast: ForecastConfig values over the plan's [forecast]
    grid: dict = field(default_factory=dict)  # train: the listed values, one run per combination
    source: str | None = None  # train: the stage whose best run it starts from; forecast: "base" or a stage
    which: str = "all"  # forecast: every run of the source stage, or its best
    search: SearchSpec | None = None  # train: successive halving over its configurations (study.halving)
    drawn: list[dict] = field(default_factory=list)  # a search's configurations drawn from its ranges
    continues: bool | None = None  # train: `continue`, its run continues the source's winner (None: where it can)
    size: str | int | None = None  # train: steps = "rest" or flops = N (its steps are sized by study.estimate)


@dataclass
class Plan:
    path: Path
    text: str
    name: str
    runs_dir: Path
    max_flops: int | None  # None: the runs directory's recorded cap (ledger.cap), else 1e17
    gqa: str | None
    train: dict
    forecast: dict  # the [forecast] table: what it sets of ForecastConfig
    stages: list[Stage]
    # The command line's settings over [train] (`with_train_settings`) where they differ from the plan's own: with
    # `digest` and the data's bytes, the study's identity (study.identity).
    overrides: dict = field(default_factory=dict)
    change_max_flops: bool = False  # --change-max-flops: max_flops becomes the runs directory's cap (ledger.cap)

    @property
    def study_dir(self) -> Path:
        return self.runs_dir / self.name

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def digest(self) -> str:
        """The plan text's sha256 (16 hex digits): one part of the study's identity (`study.identity`), the others the
        command line's `overrides` and the data's bytes."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def _number(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
            or int(value) != value:
        raise PlanError(f"{name} must be a positive whole number such as 1e17, got {value!r}")
    return int(value)


def load_plan(path, runs_dir=None, max_flops=None, gqa=None, change_max_flops: bool = False) -> Plan:
    """Read and check a plan; `runs_dir`, `max_flops`, `gqa` (when not None) override the plan's [study];
    `change_max_flops`: its max_flops may replace the runs directory's recorded cap."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except OSError as e:
        raise PlanError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); a plan is a "
                        "TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: not valid TOML ({e})") from None
    for table in ("study", "train", "forecast"):
        if not isinstance(raw.get(table, {}), dict):
            raise PlanError(f"{path}: {table} must be a table [{table}], got {raw[table]!r}")
    if not isinstance(raw.get("stage", []), list) or not all(isinstance(t, dict) for t in raw.get("stage", [])):
        raise PlanError(f"{path}: stages are written [[stage]] (a list of tables, one per stage), got "
                        f"stage = {raw['stage']!r}")
    unknown = sorted(set(raw) - {"study", "train", "forecast", "stage"})
    if unknown:
        raise PlanError(f"{path}: unknown table(s) {', '.join(unknown)}; a plan has [study], [train], [forecast] "
                        "and [[stage]]")
    study = raw.get("study", {})
    bad = sorted(set(study) - set(STUDY_KEYS))
    if bad:
        raise PlanError(f"{path}: [study] does not take {', '.join(bad)} (it takes {', '.join(STUDY_KEYS)})")
    name = study.get("name") or path.stem
    if not plain_name(name):
        raise PlanError(f"{path}: [study] name must be a plain directory name, got {name!r}")
    for value in (study.get("gqa"), gqa):  # the plan's value is checked even when the command line overrides it
        if value is not None and value not in GQA_MODES:
            raise PlanError(f"{path}: [study] gqa must be one of {', '.join(GQA_MODES)}, got {value!r}")
    gqa = gqa if gqa is not None else study.get("gqa")
    train = raw.get("train", {})
    _check_keys(path, "[train]", train, TRAIN_KEYS)
    if train.get("steps") == "rest":
        raise PlanError(f"{path}: [train]: steps = \"rest\" sizes one stage's run: put it in that [[stage]]")
    forecast = raw.get("forecast", {})
    _check_keys(path, "[forecast]", forecast, FORECAST_KEYS)
    _forecast_config(forecast, {}, f"{path}: [forecast]", "")
    planned_max_flops = _number(f"{path}: [study] max_flops", study["max_flops"]) if "max_flops" in study else None
    planned_runs_dir = study.get("runs_dir", "runs")  # checked even when the command line overrides it
    if not isinstance(planned_runs_dir, str) or not planned_runs_dir:
        raise PlanError(f"{path}: [study] runs_dir must be a directory name (a string), got {planned_runs_dir!r}")
    runs_dir = runs_dir if runs_dir is not None else planned_runs_dir
    plan = Plan(path, text, name, Path(runs_dir),
                _number("--max-flops", max_flops) if max_flops is not None else planned_max_flops,
                gqa, train, forecast, [], change_max_flops=change_max_flops)
    if (plan.study_dir / CONFIG_NAME).is_file():
        raise PlanError(f"{path}: the study's directory {plan.study_dir} holds a training run of its own "
                        f"({CONFIG_NAME}): give the study another [study] name")
    stages = raw.get("stage", [])
    if not stages:
        raise PlanError(f"{path}: no [[stage]]: a plan needs at least one")
    for number, table in enumerate(stages, start=1):
        plan.stages.append(_stage(path, number, table, plan))
    return plan


def plain_name(name) -> bool:
    """A name that can be a directory's, the same on every system: a string of printable characters (no NUL, no
    newline), no "/", not hidden, at most 200 bytes (a study of its own adds a suffix; 255 is the usual limit)."""
    return (isinstance(name, str) and bool(name) and name.isprintable() and "/" not in name
            and not name.startswith(".") and len(name.encode("utf-8", "surrogatepass")) <= 200)


def _check_keys(path, where: str, table: dict, allowed) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise PlanError(f"{path}: {where} does not take {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}")


def _stage(path, number: int, table: dict, plan: Plan) -> Stage:
    table = dict(table)
    name = table.pop("name", None)
    where = f"{path}: stage {number}" + (f" ({name})" if name else "")
    if not plain_name(name):
        raise PlanError(f"{path}: stage {number}: every stage needs a plain `name`, got {name!r}")
    if any(s.name == name for s in plan.stages):
        raise PlanError(f"{where}: two stages are named {name!r}")
    _check_stage_name(where, name, plan)
    earlier = {s.name: s for s in plan.stages}
    if "forecast" in table:
        source, which = table.pop("forecast"), table.pop("which", None)
        if not isinstance(source, str) or source != "base" and source not in earlier:
            raise PlanError(f"{where}: forecast = {source!r} must be \"base\" or an earlier stage")
        if source != "base" and earlier[source].kind != "train":
            raise PlanError(f"{where}: forecast = {source!r} names a forecast stage; name a training stage")
        if which is None:  # a search's cut configurations are not worth forecasting: its winner by default
            which = "best" if source != "base" and earlier[source].search is not None else "all"
        if which not in ("all", "best"):
            raise PlanError(f"{where}: which must be \"all\" or \"best\", got {which!r}")
        if source != "base" and earlier[source].search is not None and which != "best":
            raise PlanError(f"{where}: forecast = {source!r} is a search: forecast its winner (which = \"best\"); "
                            "its cut configurations were never trained to the end")
        _check_keys(path, f"stage {name}", table, FORECAST_KEYS)
        _forecast_config(plan.forecast, table, f"{path}: [forecast]", where)
        return Stage(name, "forecast", table, source=source, which=which)
    source = table.pop("from", None)
    if source is not None and (not isinstance(source, str) or source not in earlier or earlier[source].kind != "train"):
        raise PlanError(f"{where}: from = {source!r} must name an earlier training stage")
    continues, size = _sizing(where, table, source, plan, earlier)
    try:
        search = parse_search(table)
    except SearchError as e:
        raise PlanError(f"{where}: {e}") from None
    if search is not None and (continues is not None or size is not None):
        what = "continue" if continues is not None else 'steps = "rest" or flops'
        raise PlanError(f"{where}: a search's configurations train from step 0 to its steps: it takes no {what}")
    _check_keys(path, f"stage {name}", table, TRAIN_KEYS)
    grid = {k: v for k, v in table.items() if isinstance(v, list) and k != "targets"}
    if "targets" in table and isinstance(table["targets"], list) and table["targets"] \
            and isinstance(table["targets"][0], list):
        grid["targets"] = table["targets"]  # a list of target lists is a grid over targets
    if any(len(values) == 0 for values in grid.values()):
        raise PlanError(f"{where}: an empty list leaves the grid without runs")
    _check_lists(where, grid, search)
    fixed = {k: v for k, v in table.items() if k not in grid}
    if size is not None and grid:
        raise PlanError(f"{where}: steps = \"rest\" and flops size a stage of one run; its lists ({', '.join(grid)}) "
                        "make a grid")
    stage = Stage(name, "train", fixed, grid, source, search=search, continues=continues, size=size)
    if search is not None and search.drawn:  # the lists are choices of the drawn configurations, not a grid
        stage.search = dataclasses.replace(search, choices=grid)
        stage.grid = {}
        try:
            stage.drawn = draw_configs(stage.search, grid)
        except SearchError as e:
            raise PlanError(f"{where}: {e}") from None
    ranges = stage.search.ranges if stage.search is not None else {}
    for key, (kind, low, high) in ranges.items():  # both ends must be values of the setting, not just the draws
        for end in (low, high):
            try:
                TrainConfig(**{**plan.train, **fixed, key: int(end) if kind == "int" else end})
            except (ConfigError, TypeError) as e:
                if getattr(e, "key", None) == key:
                    raise PlanError(f"{where}: the range {key} = {{{kind} = [{low:g}, {high:g}]}} ends at {end:g}: "
                                    f"{e}") from None
    for settings in _combinations(stage, {**plan.train}):  # every run's settings must make a TrainConfig
        _train_config(settings, where, {**table, **ranges}, f"{path}: [train]")
    if search is not None:
        check_search(stage, plan.train, where, plan)
        if len(_combinations(stage, {})) < 2:
            raise PlanError(f"{where}: a search of one configuration has nothing to cut (and would still train its "
                            "noise replicate): drop `search` to train it as a plain stage")
    return stage


def _check_lists(where: str, grid: dict, search) -> None:
    """A stage's lists: no value twice (the same run twice, or a choice drawn twice as often), at most MAX_CONFIGS
    runs."""
    for key, values in grid.items():
        twice = next((v for i, v in enumerate(values) if any(v == w and type(v) is type(w) for w in values[:i])),
                     None)
        if twice is not None:
            raise PlanError(f"{where}: {key} = {values!r} lists {twice!r} twice: every value once")
    runs = search.configs if search is not None and search.drawn else math.prod(len(v) for v in grid.values())
    if runs > MAX_CONFIGS:
        raise PlanError(f"{where}: {runs} runs, more than {MAX_CONFIGS}: a stage's runs each train (and are "
                        "counted) on their own; split the stage or draw fewer configs")


def _sizing(where: str, table: dict, source: str | None, plan: Plan, earlier: dict) -> tuple[bool | None, object]:
    """Pop a training stage's `continue` and its sizing (steps = "rest", or flops = N) and check them."""
    continues = table.pop("continue", None)
    if continues is not None and (not isinstance(continues, bool) or source is None):
        raise PlanError(f"{where}: continue = {continues!r}: true or false, whether the stage's run continues the "
                        "winner of its `from` stage (which it needs)")
    size = "rest" if table.get("steps") == "rest" else None
    if size is not None:
        del table["steps"]
        if any(s.size == "rest" for s in plan.stages):
            raise PlanError(f"{where}: steps = \"rest\" a second time: one stage takes what the others leave")
    elif isinstance(table.get("steps"), str):
        raise PlanError(f"{where}: steps = {table['steps']!r}: a whole number, or \"rest\" (what the cap leaves)")
    if "flops" in table:
        if size is not None:
            raise PlanError(f"{where}: steps = \"rest\" and flops both size the stage: give one")
        size = _number(f"{where}: flops", table.pop("flops"))
        if plan.max_flops is not None and size > plan.max_flops:
            raise PlanError(f"{where}: flops = {size:.3g} is more than the study's max_flops {plan.max_flops:.3g}: "
                            "a stage's share of the cap is at most the cap")
    if source is not None and earlier[source].size is not None and size is None and "steps" not in table:
        raise PlanError(f"{where}: from = {source!r}, a stage sized when it starts: give this stage its own steps")
    return continues, size


def check_search(stage: Stage, base: dict, where: str, plan: Plan) -> None:
    """A search's configurations, over `base`, must make rungs: one length (steps), a schedule that does not
    depend on it (a survivor continues from its checkpoint as if it had been trained straight to the next rung), its
    own or the one it inherits, validation at every rung's end, and noise seeds other than the configurations'."""
    for schedule, origin in origins(plan, stage, "schedule", base):
        if schedule != "constant":
            raise PlanError(f"{where}: a search trains with schedule = \"constant\" (after any warmup), got "
                            f"{schedule!r} from {origin}: a decay depends on the run's final length, so a survivor "
                            "could not continue from its checkpoint as if trained straight to the next rung; set "
                            "schedule = \"constant\" in the stage, and put the decay in a later stage (from = it)")
    for settings in _combinations(stage, {**base, "schedule": "constant"}):
        config = _train_config(settings, where)
        try:
            first = stage.search.first_rung(config.steps)
            rung_steps(first, stage.search.eta, config.steps)
        except SearchError as e:
            raise PlanError(f"{where}: {e}") from None
        if "eval_every" in settings and first % config.eval_every:
            origin = "the stage's" if "eval_every" in stage.settings else "[train]'s"
            raise PlanError(f"{where}: eval_every {config.eval_every} must divide first_steps {first}, so every rung "
                            f"ends with a validation pass (eval_every is {origin})")
        if config.seed in stage.search.seeds_for_noise(config.seed):
            raise PlanError(f"{where}: noise_seeds {list(stage.search.seeds_for_noise(config.seed))} holds the "
                            f"configurations' own seed {config.seed}: the noise is measured at other seeds")


def origins(plan: Plan, stage: Stage, key: str, base: dict) -> list[tuple[object, str]]:
    """The values of `key` a training stage's runs may take, and where each comes from: the stage itself, else the
    nearest stage up its `from` chain that sets it (a setting, a list, a draw), else [train] (`base`)."""
    for s in [stage, *_sources(plan, stage)]:
        values = s.grid.get(key) or [d[key] for d in s.drawn if key in d] or \
            ([s.settings[key]] if key in s.settings else [])
        if values:
            return [(v, "the stage" if s is stage else f"stage {s.name}") for v in values]
    return [(base.get(key, getattr(TrainConfig, key)), "[train]")]


def _sources(plan: Plan, stage: Stage) -> list[Stage]:
    earlier = {s.name: s for s in plan.stages}
    chain = []
    while stage.source is not None and stage.source in earlier:
        stage = earlier[stage.source]
        chain.append(stage)
    return chain


def _check_stage_name(where: str, name: str, plan: Plan) -> None:
    """A stage's directory (<study>/<name>) holds its runs or forecasts: refuse a name that is the study's own file
    or a directory that holds a run itself (a run trained there by hand, or the study dir of another plan)."""
    if name in (STUDY_FILE, TENSORBOARD_DIR, JOBS_DIR):
        raise PlanError(f"{where}: a stage cannot be named {name!r}: the study keeps its record, its TensorBoard "
                        "logs or its jobs' logs under that name")
    stage_dir = plan.study_dir / name
    if (stage_dir / CONFIG_NAME).is_file():
        raise PlanError(f"{where}: {stage_dir} holds a training run of its own ({CONFIG_NAME}); a stage's directory "
                        "holds its runs: name the stage otherwise")


def _forecast_config(base: dict, table: dict, base_where: str, where: str) -> ForecastConfig:
    """ForecastConfig(**base, **table), its errors naming the table of the key at fault."""
    try:
        return ForecastConfig(**{**base, **table})
    except (SettingsError, TypeError) as e:
        key = getattr(e, "key", None)
        raise PlanError(f"{where if key in table else base_where}: {e}") from None


def with_train_settings(plan: Plan, settings: dict) -> Plan:
    """The plan with `settings` (train.py's flags given with --plan: --data, --model, ...) over its [train]; every
    stage's runs are checked again. A stage's own settings still apply over them."""
    if not settings:
        return plan
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()
               if _plain(v) != _plain(plan.train.get(k, defaults.get(k)))}
    plan = dataclasses.replace(plan, train={**plan.train, **settings}, overrides={**plan.overrides, **changed})
    for stage in plan.stages:
        if stage.kind == "train":
            where = f"{plan.path}: stage {stage.name} with the command line's settings"
            for combination in _combinations(stage, plan.train):
                _train_config(combination, where)
            if stage.search is not None:
                check_search(stage, plan.train, where, plan)
    return plan


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---- runs of a stage -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyRun:
    """One training run of a study: its stage, its directory's name, its settings, the run it continues (from that
    run's checkpoint: `continues`), and the settings its name carries (`varied`)."""
    stage: str
    name: str
    settings: dict  # TrainConfig values, without the run's place
    continues: StudyRun | None = None
    varied: tuple[str, ...] = ()

    @property
    def start(self) -> int:
        """The step it starts from: the steps of the run it continues, else 0."""
        return self.continues.settings.get("steps", TrainConfig.steps) if self.continues is not None else 0

    def run_dir(self, plan: Plan) -> Path:
        return plan.study_dir / self.stage / self.name

    def config(self, plan: Plan, **overrides) -> TrainConfig:
        origin = str(self.continues.run_dir(plan)) if self.continues is not None else None
        return TrainConfig(**{**self.settings, **overrides}, out=str(self.run_dir(plan)), runs_dir=str(plan.runs_dir),
                           max_flops=plan.max_flops, change_max_flops=plan.change_max_flops, gqa=plan.gqa,
                           tensorboard_dir=str(plan.study_dir / TENSORBOARD_DIR / self.stage / self.name),
                           continue_from=origin)


def _train_config(settings: dict, where, table: dict | None = None, base_where: str | None = None) -> TrainConfig:
    """TrainConfig(**settings); its errors name `where` (the stage), or `base_where` (the plan's [train]) when the
    key at fault is not in the stage's own `table`."""
    try:
        return TrainConfig(**settings)
    except (ConfigError, TypeError) as e:
        key = getattr(e, "key", None)
        if base_where is not None and key is not None and key not in (table or {}):
            where = base_where
        raise PlanError(f"{where}: {e}") from None


def _combinations(stage: Stage, base: dict) -> list[dict]:
    if stage.drawn:
        return [{**base, **stage.settings, **drawn} for drawn in stage.drawn]
    keys = list(stage.grid)
    return [{**base, **stage.settings, **dict(zip(keys, values))}
            for values in itertools.product(*(stage.grid[k] for k in keys))]


def varied_keys(stage: Stage) -> list[str]:
    """The settings a training stage varies: its grid's keys, or a drawn search's ranges and choices."""
    if stage.search is not None and stage.search.drawn:
        return [*stage.search.ranges, *stage.search.choices]
    return list(stage.grid)


def inherited(plan: Plan, base_run: StudyRun | None) -> dict:
    """The settings a stage starts from: the plan's [train], then those of `base_run` (the best run of its `from`
    stage) but its eval_every, which belongs to the stage that set it (a search derives it from its first rung; a
    6,000-step final run would validate as often as a 40-step rung): [train]'s, the stage's own, or steps // 10."""
    if base_run is None:
        return dict(plan.train)
    return {**plan.train, **{k: v for k, v in base_run.settings.items() if k != "eval_every"}}


def stage_runs(stage: Stage, base: dict, base_run: StudyRun | None = None) -> list[StudyRun]:
    """The runs of a training stage that starts from `base` (the plan's [train], or the settings of `base_run`, the
    best run of an earlier stage). A run with exactly `base_run`'s settings is that run itself, not trained again;
    one with its settings but the steps and schedule continues it (`continued`). Run names carry the settings
    varied by the stage and by the stages it comes from."""
    if stage.search is not None:
        return search_runs(stage, base)
    runs = []
    varied = tuple(dict.fromkeys([*(base_run.varied if base_run is not None else ()), *stage.grid]))
    for settings in _combinations(stage, base):
        if stage.size is not None:  # sized when the stage starts (study.estimate); till then, the most it may take
            settings = {**settings, "steps": MAX_STEPS}
        config = _train_config(settings, f"stage {stage.name}")
        if base_run is not None and config.to_dict() == _train_config(base_run.settings, base_run.stage).to_dict():
            runs.append(base_run)
            continue
        extra = "".join("_" + (tag(k, settings[k]) if k == "targets" else f"{k}{settings[k]}")  # _qkvo: targets
                        for k in varied if k not in ("lr", "rank", "ctx", "model", "full"))
        name = config.run_name + extra.replace("/", "-")
        runs.append(StudyRun(stage.name, name, settings, continued(stage, name, config, base_run), varied))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise PlanError(f"stage {stage.name}: two runs would share a directory ({names})")
    return runs


def continued(stage: Stage, name: str, config: TrainConfig, base_run: StudyRun | None) -> StudyRun | None:
    """The run that the stage's run `name` continues: `base_run`, where its settings are base_run's but the steps and
    the schedule, base_run's learning rate never decayed (the constant schedule) and this run's stays constant past
    base_run's steps; else None (it trains from step 0). `continue = true` refuses the else; `continue = false`
    always trains from step 0. A sized stage's steps are checked when it is sized (study.estimate)."""
    if base_run is None or stage.continues is False:
        return None
    source = _train_config(base_run.settings, base_run.stage)
    steps, where = source.steps, f"stage {stage.name}: its run {name}"
    different = different_settings(source.trajectory_values(), config.trajectory_values(), skip=CONTINUE_KEYS)
    why = (f"its settings differ from {base_run.stage}'s winner {base_run.name} in {', '.join(different)}"
           if different else f"{base_run.stage}'s winner {base_run.name} trained under schedule {source.schedule}"
           if source.stable_steps < steps else f"its schedule is {config.schedule}"
           if config.schedule not in ("constant", "wsd") else f"its {config.steps} steps do not go past the winner's"
           if stage.size is None and config.steps <= steps else None)
    if why is not None:
        if stage.continues:
            raise PlanError(f"{where} cannot continue (continue = true): {why}; a run continues a constant-schedule "
                            "run of its own settings, under the constant or the wsd schedule")
        return None
    if stage.size is None and config.stable_steps < steps:
        raise PlanError(f"{where} continues {base_run.stage}'s winner {base_run.name} from its step {steps}, past "
                        f"which its own learning rate is not constant ({config.schedule}, {config.steps} steps, the "
                        f"decay from step {config.stable_steps}): give it more steps or a shorter decay, or "
                        "continue = false to train it from step 0")
    return base_run


def search_runs(stage: Stage, base: dict) -> list[StudyRun]:
    """A search's configurations as runs of their own (c00_..., never a run of an earlier stage: each continues
    from its own checkpoint), every one validating at every rung's end."""
    combinations = _combinations(stage, base)
    runs = []
    for name, settings in zip(config_names(combinations, varied_keys(stage)), combinations):
        config = _train_config(settings, f"stage {stage.name}")
        first = stage.search.first_rung(config.steps)
        if "eval_every" not in settings:
            settings = {**settings, "eval_every": first}
        elif first % config.eval_every:
            raise PlanError(f"stage {stage.name}: eval_every {config.eval_every} must divide first_steps {first}")
        runs.append(StudyRun(stage.name, name, settings, varied=tuple(varied_keys(stage))))
    return runs


def is_complete(run_dir: Path, steps: int) -> bool:
    """The run trained all its steps and saved its weights (adapter or model)."""
    metrics = read_metrics(run_dir, drop_torn_tail=True) if (run_dir / METRICS_NAME).is_file() else []
    return weights_saved(run_dir) and bool(metrics) and metrics[-1]["step"] >= steps


def best_val_loss(run_dir: Path) -> float | None:
    """The run's lowest finite validation loss (None if it has none)."""
    return selection.best_val_loss(selection.run_metrics(run_dir))


def best_run(runs: list[StudyRun], plan: Plan) -> StudyRun:
    """The best run of a stage by `study.selection.choose_best` (lowest validation loss, on the same positions when
    the context lengths differ; NaN never wins)."""
    choice = selection.choose_best([r.run_dir(plan) for r in runs])
    if choice is None:
        raise PlanError(f"stage {runs[0].stage}: no run has a finite validation loss to choose the best by")
    return runs[choice.index]


# ---- forecasts -----------------------------------------------------------------------------------------------------

def forecast_config(plan: Plan, stage: Stage) -> ForecastConfig:
    """A forecast stage's settings: ForecastConfig's defaults, then the plan's [forecast], then the stage's."""
    return ForecastConfig(**{**plan.forecast, **stage.settings})


def forecast_out(plan: Plan, stage: Stage, run: StudyRun | None) -> Path:
    """A forecast's output directory: <study>/<stage>/ for the base model, <study>/<stage>/<run>/ for a run."""
    return plan.study_dir / stage.name / (run.name if run is not None else "")
