"""The training runs of a runs directory as the report reads them: each run's validation losses (whole windows and
the same last-N positions, at step 0 and at their best), the stages they belong to (in the study's order), which run
won each stage by which criterion, and the seed replicates that measure the noise.

Seed replicates are runs that differ in the seed alone (on the same data bytes): two runs with identical settings and
the same seed (two demo runs, an interrupted run and its rerun) repeat one measurement and say nothing about the
noise. The noise of a criterion is the largest spread of that criterion's score between the seeds of one setting;
without replicates it is unmeasured (None), never 0. Each study's stages are held against its own noise: a search's,
measured at its top rung's step (`search_noise`), else its runs' seed replicates; runs outside a study against theirs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ledger import KINDS, Record
from study.halving import record_fault
from study.plan import STUDY_FILE
from study.selection import best_finite, common_last_count, lowest, score_runs
from training.config import TRAJECTORY_KEYS
from training.run import CONFIG_NAME, METRICS_NAME, read_metrics, read_run_config

REPORTED_SETTINGS = ("lr", "rank", "batch", "ctx", "steps")
# What makes two runs measure the same thing but the seed: every setting of their trajectory, the steps, and the
# validation windows their losses are taken over.
REPLICATE_KEYS = tuple(k for k in (*TRAJECTORY_KEYS, "steps", "val_batches", "data_sha256") if k != "seed")


@dataclass(eq=False)  # a run is itself: compared and hashed by identity
class RunInfo:
    run_dir: Path
    label: str  # the directory under the runs directory
    config: dict
    metrics: list[dict]
    record: Record | None

    @property
    def val(self) -> list[tuple[int, float]]:
        return [(m["step"], m["val_loss"]) for m in self.metrics if _number(m.get("val_loss"))]

    @property
    def val0(self) -> float | None:
        return next((v for s, v in self.val if s == 0), None)

    @property
    def best_val(self) -> float | None:
        return best_finite(v for _, v in self.val)

    @property
    def final_val(self) -> float | None:
        return self.val[-1][1] if self.val else None

    @property
    def change(self) -> float | None:
        """Best validation loss minus the step-0 loss (negative: improved)."""
        return None if self.best_val is None or self.val0 is None else self.best_val - self.val0

    def last(self, n: int) -> list[tuple[int, float]]:
        """(step, validation loss over the last `n` targets of each window) of every evaluation that recorded it."""
        return [(m["step"], m["val_loss_last"][str(n)]) for m in self.metrics
                if isinstance(m.get("val_loss_last"), dict) and _number(m["val_loss_last"].get(str(n)))]

    def at(self, step: int, n: int | None = None) -> float | None:
        """The validation loss at `step` (over the last `n` targets of each window when given)."""
        values = self.val if n is None else self.last(n)
        return next((v for s, v in values if s == step), None)

    def last0(self, n: int) -> float | None:
        return next((v for s, v in self.last(n) if s == 0), None)

    def best_last(self, n: int) -> float | None:
        return best_finite(v for _, v in self.last(n))

    @property
    def steps(self) -> int:
        return max((m["step"] for m in self.metrics if _number(m.get("step"))), default=0)

    @property
    def best_step(self) -> int | None:
        """The step of the lowest validation loss (the first of equals)."""
        best = self.best_val
        return next((s for s, v in self.val if v == best), None)

    def flops(self, kind: str) -> int:
        return self.record.by_kind[kind] if self.record is not None else 0

    @property
    def total_flops(self) -> int:
        return sum(self.flops(k) for k in KINDS)

    @property
    def model_name(self) -> str:
        return Path(str(self.config.get("model"))).name

    def short_name(self, home: Path | None = None) -> str:
        """The run directory's name without the model's (the stage is the table's heading), with the stage it was
        trained in when that is not `home` (a stage's runs include the run it started from)."""
        name = self.run_dir.name
        if name.startswith(self.model_name + "_"):
            name = name[len(self.model_name) + 1:]
        if home is not None and self.run_dir.parent.resolve() != home.resolve():
            name += f" ({self.run_dir.parent.name})"
        return name

    @property
    def stage_name(self) -> str:
        """The short name under its stage's (its parent directory's) name: "grid/r8_lr0.003_ctx256"."""
        return f"{self.run_dir.parent.name}/{self.short_name()}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Group:
    """A training stage of a study (or the runs of one directory outside any study)."""
    name: str
    runs: list[RunInfo]
    home: Path  # the stage's directory
    varied: list[str] = field(default_factory=list)
    criterion: str | None = None  # what chose the stage's winner
    best: RunInfo | None = None
    record: dict = field(default_factory=dict)  # the stage's study.json record ({} outside a study)
    replicates: list[RunInfo] = field(default_factory=list)  # a search stage's seed replicates ("noise_runs")
    order: int = 0  # the stage's place in its study
    study: Path | None = None  # the study's directory (None: runs outside a study)
    no_winner: str = ""  # why no run is named the winner (a search not finished, a study record unreadable)

    @property
    def last_n(self) -> int | None:
        """The N of the same-position (last-N) losses the stage's tables show: the largest every run recorded."""
        return common_last_count([r.metrics for r in self.runs])

    @property
    def compares_last(self) -> bool:
        """The stage's runs differ in context length: they are compared on the last N targets, not whole windows."""
        return len({json.dumps(r.config.get("ctx")) for r in self.runs}) > 1 and self.last_n is not None

    def score(self, run: RunInfo) -> float | None:
        """The run's best under the stage's criterion."""
        return run.best_last(self.last_n) if self.compares_last else run.best_val

    def score0(self, run: RunInfo) -> float | None:
        """The run's step-0 loss under the stage's criterion (the untouched model's)."""
        return run.last0(self.last_n) if self.compares_last else run.val0


def collect_runs(runs_dir: Path, records: dict[Path, Record]) -> tuple[list[RunInfo], list[str]]:
    """The training runs under `runs_dir`, and one line per run directory that could not be read."""
    runs, unreadable = [], []
    for config_path in sorted(runs_dir.rglob(CONFIG_NAME)):
        run_dir = config_path.parent
        if not (run_dir / METRICS_NAME).is_file():
            continue  # a model directory's config.json (model/, adapter/), not a run
        label = str(run_dir.relative_to(runs_dir))
        try:
            config = read_run_config(run_dir)
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: not a JSON object (a {type(config).__name__})")
            missing = [key for key in REPORTED_SETTINGS if key not in config]
            if missing:  # what the tables and the FLOP section show of every run
                raise ValueError(f"{config_path}: not a train.py run config (missing {', '.join(missing)})")
            metrics = read_metrics(run_dir, drop_torn_tail=True)
        except (ValueError, OSError) as e:
            unreadable.append(f"run {label}: {e}")
            continue
        runs.append(RunInfo(run_dir, label, config, metrics, records.get(run_dir.resolve())))
    return runs, unreadable


def collect_groups(runs: list[RunInfo], studies: list[tuple[Path, dict]]) -> list[Group]:
    """The training stages of every study (their study.json, in the plan's order), then the other runs by parent
    directory."""
    by_dir = {r.run_dir.resolve(): r for r in runs}
    groups, grouped = [], set()
    for path, study in studies:
        for order, stage in enumerate(study.get("stages", [])):
            if not isinstance(stage, dict) or stage.get("kind") != "train":
                continue
            members = _members(stage.get("runs"), by_dir)
            replicates = [r for r in _members(stage.get("noise_runs"), by_dir) if r not in members]
            if members:
                best = by_dir.get(Path(str(stage.get("best", ""))).resolve())
                searched = stage.get("search") and (record_fault(stage) is not None
                                                    or not (stage.get("done") is True and best in members))
                groups.append(Group(f"{study.get('name', path.parent.name)}/{stage.get('name')}", members,
                                    path.parent / str(stage.get("name")),
                                    [str(v) for v in stage.get("varied", []) if isinstance(v, str)],
                                    stage.get("criterion"), best, stage, replicates, order, path.parent,
                                    "the search has not chosen a winner" if searched else ""))
                grouped.update(id(m) for m in members + replicates)
    rest: dict[Path, list[RunInfo]] = {}
    for run in runs:
        if id(run) not in grouped:
            rest.setdefault(run.run_dir.parent, []).append(run)
    studied = {path.parent.resolve() for path, _ in studies}
    for home, members in sorted(rest.items()):
        name = members[0].label if len(members) == 1 else str(Path(members[0].label).parent)
        lost = (home.parent / STUDY_FILE).is_file() and home.parent.resolve() not in studied
        groups.append(Group(name if name != "." else "runs outside a study", members, home,
                            varied_settings(members), study=home.parent if lost else None,
                            no_winner=f"its study's record {home.parent / STUDY_FILE} cannot be read" if lost else ""))
    for group in groups:
        if len(group.runs) < 2 or group.no_winner:
            group.criterion, group.best = None, None  # one run wins nothing; nor does an unfinished search
        elif group.criterion is None or group.best is None:  # runs outside a study: the same rule picks
            choice = lowest(*score_runs([r.run_dir for r in group.runs], histories=[r.metrics for r in group.runs]))
            if choice is not None:
                group.criterion, group.best = choice.criterion, group.runs[choice.index]
    return groups


def _members(dirs, by_dir: dict[Path, RunInfo]) -> list[RunInfo]:
    paths = [Path(d).resolve() for d in dirs if isinstance(d, str)] if isinstance(dirs, list) else []
    return list(dict.fromkeys(by_dir[p] for p in paths if p in by_dir))


def varied_settings(runs: list[RunInfo]) -> list[str]:
    """The settings that differ between the runs (the stride only where the context does not explain it)."""
    keys = dict.fromkeys(("lr", "rank", "ctx", "steps", *TRAJECTORY_KEYS))
    varied = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    return [k for k in varied if not (k == "stride" and "ctx" in varied)]


def ranking(group: Group) -> list[tuple[RunInfo, float]]:
    """The stage's runs with a finite score under its criterion, best first (the first of equals first); none where
    the stage has no winner to name (`Group.no_winner`)."""
    if group.no_winner:
        return []
    scores = [group.score(r) for r in group.runs]
    choice = lowest(scores, group.criterion or "")
    if choice is None:
        return []
    winner = group.best if group.best is not None and group.score(group.best) is not None else \
        group.runs[choice.index]
    rest = sorted(((s, i) for i, s in enumerate(scores) if s is not None and group.runs[i] is not winner))
    return [(winner, group.score(winner))] + [(group.runs[i], s) for s, i in rest]


# ---- the noise -----------------------------------------------------------------------------------------------------

def seed_replicates(runs: list[RunInfo]) -> list[list[RunInfo]]:
    """Sets of runs that differ in the seed alone, one run per seed (a repeat of a seed adds nothing), in the order
    the runs come; only sets of two seeds or more."""
    sets: dict[str, dict] = {}
    for run in runs:
        key = json.dumps({k: run.config.get(k) for k in REPLICATE_KEYS}, sort_keys=True, default=str)
        sets.setdefault(key, {}).setdefault(json.dumps(run.config.get("seed")), run)
    return [list(by_seed.values()) for by_seed in sets.values() if len(by_seed) > 1]


@dataclass(frozen=True)
class Noise:
    """The largest spread of one criterion's score between the seeds of a setting (None: unmeasured)."""
    criterion: str  # "whole-window validation loss" or "validation loss over the last N targets"
    last_n: int | None
    value: float | None
    replicates: tuple[RunInfo, ...] = ()  # the set it was measured on
    steps: int | None = None  # a search's: the loss at this step (its top rung's); else each run's best

    @property
    def measured(self) -> bool:
        return self.value is not None

    def score(self, run: RunInfo) -> float | None:
        """A run's score as this noise measures it."""
        if self.steps is not None:
            return run.at(self.steps, self.last_n)
        return run.best_val if self.last_n is None else run.best_last(self.last_n)


def _criterion(last_n: int | None) -> str:
    return "whole-window validation loss" if last_n is None else f"validation loss over the last {last_n} targets"


def measure_noise(replicate_sets: list[list[RunInfo]], last_n: int | None) -> Noise:
    """The noise of the whole-window loss (`last_n` None) or of the loss over the last `last_n` targets."""
    spreads = []
    for members in replicate_sets:
        scores = [r.best_val if last_n is None else r.best_last(last_n) for r in members]
        if all(s is not None for s in scores):
            spreads.append((max(scores) - min(scores), tuple(members)))
    if not spreads:
        return Noise(_criterion(last_n), last_n, None)
    value, members = max(spreads, key=lambda s: s[0])
    return Noise(_criterion(last_n), last_n, value, members)


def search_noise(group: Group) -> Noise | None:
    """A search stage's own noise (study.json's "noise"): the spread of its noise's reference configuration over its
    seeds at the step it was measured at (the top rung's; a search recorded before the noise went on with the rungs:
    its first rung's), on its rungs' criterion. None for another stage, or a search without a measured noise."""
    record = group.record
    value, ladder = record.get("noise"), record.get("ladder")
    if not record.get("search") or not isinstance(value, (int, float)) or isinstance(value, bool) \
            or record_fault(record) is not None:
        return None
    steps = record.get("noise_steps")
    if not isinstance(steps, int):
        steps = ladder[0] if isinstance(ladder, list) and ladder and isinstance(ladder[0], int) else None
    rung = next((r for r in record.get("rungs", []) if isinstance(r, dict) and r.get("steps") == steps), {})
    last = re.search(r"last (\d+) targets", str(rung.get("criterion", "")))
    last_n = int(last[1]) if last else None
    named = {r.run_dir.name: r for r in group.runs + group.replicates}
    reference = Path(str(record.get("noise_reference") or "")).name or \
        next((n.removesuffix(f"_seed{r.config.get('seed')}") for n, r in named.items() if r in group.replicates), "")
    members = tuple(r for r in [named.get(reference), *group.replicates] if r is not None)
    return Noise(_criterion(last_n), last_n, float(value), members, steps)


def stage_noises(groups: list[Group], runs: list[RunInfo]) -> tuple[dict[str, Noise], dict[str, Noise],
                                                                     list[list[RunInfo]]]:
    """Each stage's noise, from its own study's runs: of its criterion, and of the whole-window loss (what a run's
    change from step 0 is held against); and every set of seed replicates. A search's own noise first; else its
    study's seed replicates; else the study's search's, where it was measured on the same criterion."""
    noise_runs = {id(r) for g in groups for r in g.replicates}
    scope = {id(r): g.study for g in groups for r in g.runs + g.replicates}
    sets_of: dict = {}
    for run in runs:
        if id(run) not in noise_runs:
            sets_of.setdefault(scope.get(id(run)), []).append(run)
    sets_of = {study: seed_replicates(members) for study, members in sets_of.items()}
    searched = [(g.study, n) for g in groups if (n := search_noise(g)) is not None]
    noises, wholes = {}, {}
    for group in groups:
        sets = sets_of.get(group.study, [])

        def found(last_n, group=group, sets=sets):
            measured = measure_noise(sets, last_n)
            same = [n for study, n in searched if study == group.study and n.last_n == last_n]
            return measured if measured.measured or not same else same[0]

        own = search_noise(group)
        noises[group.name] = own or found(group.last_n if group.compares_last else None)
        wholes[group.name] = own if own is not None and own.last_n is None else found(None)
    return noises, wholes, [s for sets in sets_of.values() for s in sets]


def improved(run: RunInfo, noise: Noise) -> bool | None:
    """Best validation loss below the step-0 loss by more than the noise (None: no change to judge, or the noise
    unmeasured)."""
    if run.change is None or not noise.measured:
        return None
    return run.change < -noise.value
