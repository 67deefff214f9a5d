"""How sure a test-split difference is: a paired bootstrap over the forecast trajectories.

A forecast's MSE is the mean of its trajectories' MSEs (every trajectory has the same horizon), MAE likewise, and
medMSE their median. Two methods forecast the same trajectories, so their difference is judged on the same draws:
resample the trajectories with replacement (BOOTSTRAP_RESAMPLES times, seeded: the report is the same every time),
compute both methods' score on each resample, and take the 2.5th and 97.5th percentiles of the ratio
new / reference. An interval that holds 1 (a change of 0 %) is "not distinguishable": the trajectories forecast
cannot tell the two methods apart. The per-trajectory errors come from each forecast's per_trajectory.csv.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import format as fmt

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 95  # % of the bootstrap distribution inside the interval
# Scores with a per-trajectory form: (metrics.json key, label, per_trajectory.csv metric, statistic over trajectories)
PER_TRAJECTORY = (("mse", "MSE", "mse", "mean"), ("mae", "MAE", "mae", "mean"),
                  ("median_trajectory_mse", "medMSE", "mse", "median"))


def paired_bootstrap(new, old, statistic: str = "mean", resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> tuple[float, float] | None:
    """The `level` % percentile interval of statistic(new[i]) / statistic(old[i]) over `resamples` draws i of the
    trajectories with replacement, the same draws for both (paired); None when there is nothing to resample or
    every resample has a zero reference."""
    new, old = np.asarray(new, float), np.asarray(old, float)
    if new.shape != old.shape or new.ndim != 1 or len(new) == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-d arrays, got {new.shape} and {old.shape}")
    draws = resampled_rows(len(new), resamples, seed)
    reduce = np.median if statistic == "median" else np.mean
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = reduce(new[draws], axis=1) / reduce(old[draws], axis=1)
    factors = factors[np.isfinite(factors)]
    if not len(factors):
        return None
    return central_interval(factors, level)


def resampled_rows(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n): each resample's draw of n trajectories with replacement (seeded: the same every time)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def central_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` % percentile interval of resampled statistics."""
    low, high = np.percentile(values, [(100 - level) / 2, 100 - (100 - level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class TrajectoryErrors:
    """One forecast's per_trajectory.csv: trajectory index -> {column: value} of the scored trajectories, and the
    split of every trajectory forecast."""
    rows: dict[int, dict[str, float]]
    splits: dict[int, str]


def read_trajectory_errors(out: Path) -> TrajectoryErrors:
    """The scored rows of `out`/per_trajectory.csv; ValueError naming the file and what is wrong with it."""
    path = Path(out) / "per_trajectory.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, csv.Error) as e:
        raise ValueError(f"{path}: {e}") from None
    rows, splits = {}, {}
    for number, row in enumerate(table, start=2):
        try:
            index = int(row["index"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: line {number} has no trajectory index") from None
        splits[index] = str(row.get("split"))
        if row.get("scored") == "True":
            rows[index] = {k: _float(v) for k, v in row.items() if k not in ("index", "split", "scored")}
    return TrajectoryErrors(rows, splits)


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class Difference:
    """A method's score against a reference's on the test split, with its bootstrap interval (factor bounds)."""
    species: str
    label: str  # the score's column label
    reference: str  # the reference row's name
    new: float
    old: float
    interval: tuple[float, float] | None
    trajectories: int  # paired trajectories the interval is over

    @property
    def as_factors(self) -> bool:
        """The change and its interval are written as factors ("x1.34 [x0.66, x3.08]") when any of them is past
        +100 % (or below -99 %); else as percentages: one notation per difference."""
        factors = [self.new / self.old] if fmt.finite(self.new) and fmt.finite(self.old) and self.old else []
        return any(fmt.factor_text(f).startswith("x") for f in factors + list(self.interval or ()))

    @property
    def change(self) -> str:
        if self.as_factors and self.new != self.old:
            return fmt.ratio(self.new / self.old)
        return fmt.relative(self.new, self.old)

    @property
    def interval_text(self) -> str:
        if self.interval is None:
            return "-"
        write = fmt.ratio if self.as_factors else fmt.factor_text
        return f"[{write(self.interval[0])}, {write(self.interval[1])}]"

    @property
    def distinguishable(self) -> bool | None:
        """The interval excludes "no change" (None: no interval)."""
        return None if self.interval is None else not (self.interval[0] <= 1.0 <= self.interval[1])

    @property
    def verdict(self) -> str:
        if self.new == self.old:
            return "equal"
        word = "lower" if self.new < self.old else "higher"
        if self.distinguishable is None:
            return word
        return word if self.distinguishable else "not distinguishable"


def paired_values(new: tuple[TrajectoryErrors, str], old: tuple[TrajectoryErrors, str], column: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The per-trajectory `column` (e.g. "prey_mse") of two methods, each (its forecast's errors, its column prefix),
    over the trajectories both scored with finite values, in index order."""
    (a, prefix_a), (b, prefix_b) = new, old
    pairs = [(a.rows[i].get(f"{prefix_a}_{column}", math.nan), b.rows[i].get(f"{prefix_b}_{column}", math.nan))
             for i in sorted(set(a.rows) & set(b.rows))]
    pairs = [p for p in pairs if all(math.isfinite(v) for v in p)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def differences(subject: str, methods: dict[str, dict], sources: dict[str, tuple[TrajectoryErrors, str]],
                species: str) -> list[Difference]:
    """`subject`'s MSE, MAE and medMSE against every other method of `methods` (metrics.json's per-method dicts), one
    Difference each, with a paired bootstrap interval where both methods' per-trajectory errors are in `sources`."""
    out = []
    mine = (methods.get(subject) or {}).get(species) or {}
    for reference, metrics in methods.items():
        theirs = (metrics or {}).get(species) or {}
        if reference == subject:
            continue
        for key, label, column, statistic in PER_TRAJECTORY:
            new, old = mine.get(key), theirs.get(key)
            if not (fmt.finite(new) and fmt.finite(old)):
                continue
            interval, n = None, 0
            if subject in sources and reference in sources:
                a, b = paired_values(sources[subject], sources[reference], f"{species}_{column}")
                if len(a):
                    interval, n = paired_bootstrap(a, b, statistic), len(a)
            out.append(Difference(species, label, reference, new, old, interval, n))
    return out


def differences_table(diffs: list[Difference], subject: str) -> list[str]:
    header = ["score", "against", subject, "reference", "change", f"{LEVEL} % interval", "trajectories", "verdict"]
    rows = [[d.label, d.reference, fmt.number(d.new), fmt.number(d.old), d.change, d.interval_text,
             str(d.trajectories) if d.interval is not None else "-", d.verdict] for d in diffs]
    return fmt.table(header, rows)


def bootstrap_mean(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                   level: float = LEVEL) -> tuple[float, float] | None:
    """The `level` % percentile interval of the mean of `values`, one per trajectory, over `resamples` draws of the
    trajectories with replacement (seeded: the same every time): the values of one trajectory are correlated (a
    forecast that drifts misses many steps at once), so the trajectory, not the single value, is what is resampled.
    None when there is no trajectory."""
    values = np.asarray(values, float)
    if values.ndim != 1:
        raise ValueError(f"bootstrap_mean needs one value per trajectory (a 1-d array), got shape {values.shape}")
    if len(values) == 0:
        return None
    return central_interval(values[resampled_rows(len(values), resamples, seed)].mean(axis=1), level)
