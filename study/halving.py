"""A search stage's rules, apart from running it: its plan keys (`SearchSpec`, `parse_search`), its configurations
(a grid, or drawn from ranges by `scipy.stats.qmc`), their run names, the rungs (`rung_steps`) and who goes on from
a rung (`cut_rung`). `study.search` runs a search with these rules; nothing here trains or reads a run.

Successive halving (Jamieson & Talwalkar 2016; the inner loop of Hyperband): every configuration trains to the first
rung's steps; the best max(1, n // eta) of the n configurations of a rung, by validation loss on the same positions
(`study.selection`), go on to eta x the steps, and so on up to the stage's `steps` (the top rung, where the winner is
chosen). A survivor continues from its own checkpoint, so no step is trained twice.

A rung scores each configuration by its validation loss at the rung's step: the weights that go on (never an earlier
or the untrained step-0 loss). The noise rule: a configuration whose score is within the seed noise of the last one
kept (its score minus that score <= the noise) goes on too, so two configurations that the noise cannot tell apart
are not split by chance. The noise is measured by the stage itself, at every rung's length: after the first rung,
its best configuration (the noise's reference) is trained again at each of `noise_seeds`, and these replicates go
on with the search to every rung (the reference too, as the noise's reference only, if it is cut), so the noise of a
rung is the largest spread of the reference's score at that rung's step over its seeds. A configuration without a
finite score (NaN, diverged) never goes on.

    [[stage]]
    name = "search"
    search = "halving"
    eta = 3                          # keep the best third at each rung (default 3)
    first_steps = 50                 # the first rung; then 150, then 450 (= steps, the top rung)
                                     # (default: ceil(steps / eta**2), three rungs ending exactly at steps)
    steps = 450
    noise_seeds = [1]                # the first rung's best again at these seeds, to every rung (default: seed + 1;
                                     # [] = none)
    lr = [1e-5, 1e-4, 1e-3]          # lists: a grid, every combination is a configuration ...
    rank = [2, 4, 8]
    # ... or ranges, `configs` configurations drawn by a Latin hypercube (scipy.stats.qmc, seeded by sample_seed);
    # lists then are choices:
    # lr = {log = [1e-5, 1e-2]}      # log-uniform;  {uniform = [a, b]}; {int = [a, b]} (whole numbers, a..b)
    # rank = [2, 4, 8, 16]
    # configs = 27
    # sample_seed = 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

METHODS = ("halving",)
SEARCH_KEYS = ("search", "eta", "first_steps", "configs", "sample_seed", "noise_seeds")
RANGE_KINDS = ("log", "uniform", "int")
# Settings a search cannot vary: its rungs are steps of one length, and a seed is noise, not a setting.
FIXED_IN_SEARCH = ("steps", "seed", "eval_every", "schedule", "warmup")
MAX_CONFIGS = 1000  # a search's first rung trains every configuration: more is beyond any budget this trains for
SIGNIFICANT_DIGITS = 3  # drawn floats are rounded to this: readable run names and tables, the same draw every time
TARGET_LETTERS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "g", "up_proj": "u",
                  "down_proj": "d"}


class SearchError(ValueError):
    """A search stage's keys that cannot make a search (study.plan names the file and stage)."""


@dataclass(frozen=True)
class SearchSpec:
    method: str = "halving"
    eta: int = 3
    first_steps: int | None = None  # None: ceil(steps / eta**2), three rungs ending exactly at steps
    configs: int | None = None  # drawn configurations (ranges); None: the grid's combinations
    sample_seed: int = 0
    noise_seeds: tuple[int, ...] | None = None  # None: (the configurations' seed + 1,)
    ranges: dict = field(default_factory=dict)  # key -> (kind, low, high)
    choices: dict = field(default_factory=dict)  # key -> list (drawn mode: the lists of the stage)

    @property
    def drawn(self) -> bool:
        return bool(self.ranges)

    def first_rung(self, steps: int) -> int:
        return self.first_steps if self.first_steps is not None else -(-steps // self.eta ** 2)

    def seeds_for_noise(self, seed: int) -> tuple[int, ...]:
        return self.noise_seeds if self.noise_seeds is not None else (seed + 1,)


def _whole(value, at_least: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value or value < at_least or value > 10**9:
        raise SearchError(f"{what} must be a whole number from {at_least} to 1e9, got {value!r}")
    return int(value)


def parse_search(table: dict) -> SearchSpec | None:
    """Pop a stage table's search keys and its ranges; None (and the table unchanged) when it is not a search."""
    if "search" not in table:
        extra = [k for k in SEARCH_KEYS if k in table] + [k for k, v in table.items() if isinstance(v, dict)]
        if extra:
            raise SearchError(f"{', '.join(extra)}: only a search stage takes these; add search = \"halving\"")
        return None
    method = table.pop("search")
    if method not in METHODS:
        raise SearchError(f"search must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    eta = _whole(table.pop("eta", 3), 2, "eta")
    first = table.pop("first_steps", None)
    first = None if first is None else _whole(first, 1, "first_steps")
    configs = table.pop("configs", None)
    configs = None if configs is None else _whole(configs, 1, "configs")
    if configs is not None and configs > MAX_CONFIGS:
        raise SearchError(f"configs {configs} is more than {MAX_CONFIGS}: every configuration trains the first rung")
    sample_seed = _whole(table.pop("sample_seed", 0), 0, "sample_seed")
    noise_seeds = table.pop("noise_seeds", None)
    if noise_seeds is not None:
        if not isinstance(noise_seeds, list):
            raise SearchError(f"noise_seeds must be a list of seeds such as [1, 2], got {noise_seeds!r}")
        noise_seeds = tuple(_whole(s, 0, "a seed of noise_seeds") for s in noise_seeds)
        if len(set(noise_seeds)) != len(noise_seeds):
            raise SearchError(f"noise_seeds names a seed twice: {list(noise_seeds)}")
    ranges = {k: _range(k, table.pop(k)) for k in [k for k, v in table.items() if isinstance(v, dict)]}
    fixed = [k for k in FIXED_IN_SEARCH if k in ranges or isinstance(table.get(k), list)]
    if fixed:
        raise SearchError(f"a search cannot vary {', '.join(fixed)}: its rungs are steps of one schedule, and a seed "
                          "is noise (noise_seeds measures it)")
    if ranges and configs is None:
        raise SearchError(f"ranges ({', '.join(ranges)}) need `configs`: how many configurations to draw")
    if configs is not None and not ranges:
        raise SearchError("configs draws configurations from ranges such as lr = {log = [1e-5, 1e-2]}; without "
                          "ranges the stage's lists make a grid and set the number of configurations")
    return SearchSpec(method, eta, first, configs, sample_seed, noise_seeds, ranges)


def _range(key: str, value: dict) -> tuple[str, float, float]:
    if len(value) != 1 or next(iter(value)) not in RANGE_KINDS:
        kinds = ", ".join(f"{{{k} = [low, high]}}" for k in RANGE_KINDS)
        raise SearchError(f"{key} = {value!r}: a range is one of {kinds}")
    kind, bounds = next(iter(value.items()))
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
            and bounds[0] < bounds[1]):
        raise SearchError(f"{key} = {{{kind} = {bounds!r}}}: give [low, high] with low < high, both finite numbers")
    if kind == "log" and bounds[0] <= 0:
        raise SearchError(f"{key} = {{log = {bounds!r}}}: a log range needs low > 0")
    if kind == "int" and not all(float(b).is_integer() for b in bounds):
        raise SearchError(f"{key} = {{int = {bounds!r}}}: an int range needs whole numbers")
    return kind, bounds[0], bounds[1]


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    return float(f"{value:.{digits}g}")


def draw_configs(spec: SearchSpec, choices: dict) -> list[dict]:
    """`spec.configs` configurations: a scrambled Latin hypercube (scipy.stats.qmc, seeded by spec.sample_seed) over
    the ranges and the choices (lists), each unit coordinate mapped to its key's range or list."""
    from scipy.stats import qmc  # only a drawn search needs scipy

    keys = [*spec.ranges, *choices]
    points = qmc.LatinHypercube(d=len(keys), rng=spec.sample_seed).random(spec.configs)
    configs = []
    for point in points:
        config = {}
        for key, u in zip(keys, point):
            if key in choices:
                config[key] = choices[key][min(int(u * len(choices[key])), len(choices[key]) - 1)]
                continue
            kind, low, high = spec.ranges[key]
            if kind == "int":
                config[key] = int(low) + min(int(u * (high - low + 1)), int(high - low))
            elif kind == "log":
                config[key] = round_significant(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
            else:
                config[key] = round_significant(low + u * (high - low))
        configs.append(config)
    seen = {}
    for i, config in enumerate(configs):
        key = repr(sorted(config.items()))
        if key in seen:
            raise SearchError(f"configurations {seen[key]} and {i} drew the same values ({config}): with so few "
                              "distinct values, write lists without ranges (a grid) or draw fewer configs")
        seen[key] = i
    return configs


def tag(key: str, value) -> str:
    """A short name for one setting of a configuration: lr0.001, r8, ctx256, qkvo (LoRA targets)."""
    if key == "targets":
        return "".join(TARGET_LETTERS.get(t, t) for t in value)
    prefix = {"rank": "r", "alpha": "a"}.get(key, key)
    return f"{prefix}{value:g}" if isinstance(value, float) else f"{prefix}{value}"


def config_names(configs: list[dict], varied: list[str]) -> list[str]:
    """c00_lr0.001_r8_qv, ...: the configuration's number, then its varied settings."""
    width = max(2, len(str(len(configs) - 1)))
    return [f"c{i:0{width}d}_" + "_".join(tag(k, c[k]) for k in varied).replace("/", "-")
            for i, c in enumerate(configs)]


def rung_steps(first: int, eta: int, steps: int) -> list[int]:
    """The steps of every rung: first, first x eta, ... while below `steps`, then `steps` (the top rung)."""
    if first > steps:
        raise SearchError(f"first_steps {first} is beyond steps {steps} (the top rung)")
    rungs, s = [], first
    while s < steps:
        rungs.append(s)
        s *= eta
    return rungs + [steps]


def keep_count(n: int, eta: int) -> int:
    """How many of a rung's n configurations go on before the noise rule: the best max(1, n // eta)."""
    return max(1, n // eta)


def survivor_counts(n: int, eta: int, rungs: int) -> list[int]:
    """Configurations trained at each rung, without ties: n, then keep_count of the one before, ..."""
    counts = [n]
    for _ in range(rungs - 1):
        counts.append(keep_count(counts[-1], eta))
    return counts


@dataclass(frozen=True)
class Cut:
    kept: list[int]  # indices (into the rung's list) that go on by rank
    ties: list[int]  # indices that go on by the noise rule (within the noise of the last one kept)
    cut: list[int]  # the rest, and every one without a finite score

    @property
    def going_on(self) -> list[int]:
        return sorted(self.kept + self.ties)


def cut_rung(scores: list[float | None], eta: int, noise: float | None) -> Cut:
    """Who goes on from a rung: the best keep_count(n) by score (the first of equals), then every one within `noise`
    of the last kept (None: unmeasured, only exact equals); a None score (no finite loss) never goes on."""
    ranked = sorted((s, i) for i, s in enumerate(scores) if s is not None)
    k = keep_count(len(scores), eta)
    kept = [i for _, i in ranked[:k]]
    line = ranked[:k][-1][0] if kept else None
    ties = [i for s, i in ranked[k:] if s - line <= (noise or 0.0)]
    cut = [i for i in range(len(scores)) if i not in kept and i not in ties]
    return Cut(kept, ties, cut)


def record_fault(record: dict, names: list[str] | None = None) -> str | None:
    """What is damaged in a search's study.json record (its "rungs" and "diverged"), in words naming the field, or
    None when its form is sound; `names`: the configurations' run names, which every recorded name must be."""
    def names_fault(where: str, value, among, non_empty: bool = False) -> str | None:
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value) or (non_empty and not value):
            return f"{where} must be a {'non-empty ' * non_empty}list of run names, got {value!r}"
        unknown = [n for n in value if among is not None and n not in among]
        return f"{where} names {unknown[0]!r}, which is not one of the search's runs" if unknown else None

    rungs = record.get("rungs", [])
    if not isinstance(rungs, list):
        return f'"rungs" must be a list of rung records, got {rungs!r}'
    noise = record.get("noise")
    faults = [names_fault('"diverged"', record.get("diverged", []), None),
              names_fault('"noise_runs"', record.get("noise_runs", []), None),
              None if noise is None or isinstance(noise, (int, float)) and not isinstance(noise, bool) else
              f'"noise" must be a number or null, got {noise!r}']
    for i, rung in enumerate(rungs):
        where = f'"rungs"[{i}]'
        if not isinstance(rung, dict):
            faults.append(f"{where} must be a rung record (an object), got {rung!r}")
            break
        steps, runs, scores = rung.get("steps"), rung.get("runs"), rung.get("scores")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            faults.append(f'{where}["steps"] must be a whole number of steps, got {steps!r}')
        faults.append(names_fault(f'{where}["runs"]', runs, names, non_empty=True))
        if not isinstance(runs, list):
            continue
        if not (isinstance(scores, list) and len(scores) == len(runs) and all(
                s is None or isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
            faults.append(f'{where}["scores"] must be a number or null for each of its runs, got {scores!r}')
        if "winner" in rung:
            if rung["winner"] not in runs:
                faults.append(f'{where}["winner"] must name one of its runs, got {rung["winner"]!r}')
            continue
        faults += [names_fault(f'{where}["{key}"]', rung.get(key, []), runs, non_empty=key == "kept")
                   for key in ("kept", "ties", "cut", "ties_dropped")]
    return next((f for f in faults if f is not None), None)
