"""Lotka-Volterra predator-prey data: the users' h5 schema, a validating loader, and a built-in simulator.

Schema (as in the coursework's `lotka_volterra_data.h5`):
    /trajectories  float (N, T, 2), N >= 1, T >= 2: prey in [..., 0], predator in [..., 1]; finite, >= 0
    /time          float (T,), finite, strictly increasing
    /params/{alpha,beta,gamma,delta,x0,y0}  (N,) — written for simulated sets; optional when loading
    /params/{inv_capacity,handling,noise}  (N,) — the simulator's terms beyond classic LV; optional
    root attributes  how a simulated set was made (prior, seed, t_end, substeps, ranges as JSON); optional
Any other dataset or group is ignored. Every violation raises `DataError` naming the file, the dataset and the fault.

Equations (classic LV when inv_capacity = handling = 0; the priors' comment below says more):
    dx/dt = alpha*x*(1 - inv_capacity*x) - beta*x*y/(1 + handling*x)   (prey)
    dy/dt = delta*x*y/(1 + handling*x) - gamma*y                         (predator)

Default split: trajectories in file order, the first 70 % train, the next 15 % validation, the last 15 % test
(`split_indices`; a seeded random split with mode="random").

    python -m data.lotka_volterra --simulate --out lv.h5 [--n 1000 --steps 100 --seed 0 --prior varied]
    python -m data.lotka_volterra --check lotka_volterra_data.h5     # validate and summarise a file
    python -m data.lotka_volterra --default                          # the data every CLI uses without --data
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from common.fileio import atomic_write

PARAM_NAMES = ("alpha", "beta", "gamma", "delta", "x0", "y0")
# Parameters beyond classic LV, written by the simulator and read when present (0 for every one: classic LV).
MODEL_PARAM_NAMES = ("inv_capacity", "handling", "noise")

# ---- the priors: every range the simulator draws from, in one place -----------------------------------------------
# Equations (both priors):
#     dx/dt = alpha*x*(1 - inv_capacity*x) - beta*x*y / (1 + handling*x)           prey
#     dy/dt = delta*x*y / (1 + handling*x) - gamma*y                                predator
# observed as x*exp(noise*e1), y*exp(noise*e2) with e1, e2 ~ N(0, 1) at every sample (multiplicative, stays > 0).
# Each trajectory draws every quantity uniformly and independently from its range.
#
# "varied" (the default data set): logistic prey (carrying capacity K = 1/inv_capacity) and a saturating (Holling
# type II) predator, i.e. the Rosenzweig-MacArthur model: depending on K and the handling time an orbit spirals in
# to the equilibrium (damped), or out to a limit cycle (growing), or keeps a near-LV cycle. Calibrated on the
# coursework file by regressing d(ln x)/dt on (1, x, y/(1+h*x)) and d(ln y)/dt on (1, x/(1+h*x)) per trajectory
# (h on a grid): this fits its derivatives to ~2 % (classic LV only to ~6 %), with 5th-95th percentiles alpha
# 0.11-0.29, beta 0.21-0.49, delta/beta 0.32-0.70, gamma 0.11-0.29, handling 0.08-0.20, K 5.3-13, and no
# measurable noise (third differences as smooth as noise-free simulation). The ranges below are those, a little
# wider. With seed 0 the simulated set then matches the file's summaries (simulated / file, 5th-50th-95th
# percentile): prey peak 1.3-2.8-8.4 / 1.3-3.0-7.6, predator peak 0.85-1.14-2.7 / 0.86-1.14-2.2, prey mean
# 0.58-1.38-4.3 / 0.57-1.39-3.9, oscillation std of the second half over the first 0.05-0.60-1.65 /
# 0.08-0.76-1.51; starting points 0.8-1.2 in both.
# Noise up to 1 % (about the resolution of 2-decimal LLMTIME text) keeps a model from relying on exact smoothness.
#
# "lv": classic Lotka-Volterra (closed orbits), the earlier default. beta and delta are set through the equilibrium
# (x*, y*) = (gamma/delta, alpha/beta) so that every orbit circles a point of the data's magnitude; regressing
# d(ln x)/dt = alpha - beta*y and d(ln y)/dt = delta*x - gamma on the coursework file gives alpha, gamma ~
# 0.08-0.25, x* ~ 0.6-3.9, y* ~ 0.26-1.0. x* < e keeps the LV invariant V > 0, so its relative drift is a
# meaningful check of the integrator.
PRIORS: dict[str, dict[str, tuple[float, float]]] = {
    "varied": {
        "alpha": (0.1, 0.3),  # prey growth rate
        "beta": (0.2, 0.5),  # attack rate
        "efficiency": (0.3, 0.7),  # delta = efficiency * beta: prey eaten -> predators born
        "gamma": (0.1, 0.3),  # predator death rate
        "handling": (0.0, 0.25),  # Holling type II saturation; 0 = LV's mass action
        "capacity": (3.0, 16.0),  # prey carrying capacity K
        "x0": (0.8, 1.2),
        "y0": (0.8, 1.2),
        "noise": (0.0, 0.01),  # std of the log observation noise
    },
    "lv": {
        "alpha": (0.08, 0.25),
        "gamma": (0.08, 0.25),
        "prey_equilibrium": (0.5, 2.5),
        "predator_equilibrium": (0.25, 1.0),
        "x0": (0.8, 1.2),
        "y0": (0.8, 1.2),
    },
}
DEFAULT_PRIOR = "varied"
# Quantities a range may start at 0 (every other one is a rate or a population and must be > 0).
MAY_BE_ZERO = ("handling", "noise")
DEFAULT_SUBSTEPS = 100  # RK4 steps between samples: h = 0.02 at the default grid; invariant drift ~1e-7
DEFAULT_SEED = 0
DEFAULT_N, DEFAULT_STEPS, DEFAULT_T_END = 1000, 100, 200.0


class DataError(ValueError):
    """An h5 file that does not follow the schema; the message names the file, dataset and the fault."""


@dataclass
class LVData:
    trajectories: np.ndarray  # (N, T, 2) float32
    time: np.ndarray  # (T,) float64
    params: dict[str, np.ndarray] | None = None  # alpha, beta, gamma, delta, x0, y0: each (N,), simulated sets only
    path: str | None = field(default=None, compare=False)
    attrs: dict = field(default_factory=dict)  # how a simulated set was made (see `simulate`); {} for other files

    def __len__(self) -> int:
        return len(self.trajectories)


# ---- h5 I/O ------------------------------------------------------------------------------------------------------

def load(path: str | os.PathLike) -> LVData:
    """Read and validate an h5 file of the schema above; raises DataError naming the file, dataset and fault."""
    path = Path(path)
    with _open(path) as f:
        trajectories = _read_float(f, "trajectories", path).astype(np.float32)
        time = _read_float(f, "time", path).astype(np.float64)
        params = None
        if "params" in f and isinstance(f["params"], h5py.Group):
            params = {k: _read_float(f["params"], k, path, prefix="params/") for k in PARAM_NAMES + MODEL_PARAM_NAMES
                      if k in f["params"]}
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
    validate(trajectories, time, str(path), params)
    return LVData(trajectories, time, params, str(path), attrs)


def trajectories_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The (N, T, 2) shape of a file's /trajectories, read from its header without loading the data: for refusing
    settings the data cannot serve before any work starts. Raises DataError as `load` does."""
    path = Path(path)
    with _open(path) as f:
        shape = tuple(_dataset(f, "trajectories", path).shape)
    _check_shape(shape, path)
    return shape


_KINDS = {"FIFO": "a named pipe (FIFO)", "CHR": "a character device", "BLK": "a block device", "SOCK": "a socket"}


def _open(path: Path) -> h5py.File:
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an h5 file")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():  # a FIFO, a device (/dev/null), a socket: h5py would block or fail obscurely
        kind = next((k for k in _KINDS if getattr(stat, f"S_IS{k}")(path.stat().st_mode)), "")
        raise DataError(f"{path}: is {_KINDS.get(kind, 'no regular file')}, not an h5 file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None


def _dataset(group: h5py.Group, name: str, path: Path, prefix: str = "") -> h5py.Dataset:
    if name not in group:
        found = ", ".join(sorted(group.keys())) or "none"
        raise DataError(f"{path}: dataset /{prefix}{name} is missing (found: {found})")
    if not isinstance(group[name], h5py.Dataset):
        kind = "a group" if isinstance(group[name], h5py.Group) else type(group[name]).__name__
        raise DataError(f"{path}: /{prefix}{name} is {kind}, expected a dataset of numbers")
    return group[name]


def _read_float(group: h5py.Group, name: str, path: Path, prefix: str = "") -> np.ndarray:
    dataset = _dataset(group, name, path, prefix)
    # Integers are fine (a hand-made file may store whole numbers); strings, compounds or complex numbers are not.
    if not (np.issubdtype(dataset.dtype, np.floating) or np.issubdtype(dataset.dtype, np.integer)):
        raise DataError(f"{path}: dataset /{prefix}{name} has dtype {dataset.dtype}, expected real numbers")
    return np.asarray(dataset[()])


def _plain(value):
    """h5py attribute -> a plain Python value (numpy scalars and bytes do not survive json or equality well)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.item() if isinstance(value, np.generic) else value


def _check_shape(shape: tuple[int, ...], where) -> None:
    if len(shape) != 3 or shape[2] != 2:
        raise DataError(f"{where}: /trajectories has shape {shape}, expected (N, T, 2)")


def validate(trajectories: np.ndarray, time: np.ndarray, where: str = "data",
             params: dict[str, np.ndarray] | None = None) -> None:
    """Raise DataError (message starts with `where`) unless the arrays follow the schema."""
    trajectories, time = np.asarray(trajectories), np.asarray(time)
    _check_shape(trajectories.shape, where)
    n, steps = trajectories.shape[:2]
    if n < 1 or steps < 2:
        raise DataError(f"{where}: /trajectories has shape {trajectories.shape}: needs at least 1 trajectory "
                        f"of at least 2 steps")
    if time.shape != (steps,):
        raise DataError(f"{where}: /time has shape {time.shape}, expected ({steps},) to match "
                        f"/trajectories {trajectories.shape}")
    for name, fault, bad in (("trajectories", "is NaN", np.isnan(trajectories)),
                             ("trajectories", "is infinite", np.isinf(trajectories)),
                             ("trajectories", "is negative", trajectories < 0),
                             ("time", "is not finite", ~np.isfinite(time))):
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            value = float((trajectories if name == "trajectories" else time)[index])
            raise DataError(f"{where}: {name}[{', '.join(map(str, index))}] {fault} ({value!r}); "
                            f"{int(bad.sum())} such value(s) in all")
    steps_dt = np.diff(time)
    if (steps_dt <= 0).any():
        i = int(np.argmax(steps_dt <= 0))
        raise DataError(f"{where}: time is not strictly increasing: time[{i}]={float(time[i])!r}, "
                        f"time[{i + 1}]={float(time[i + 1])!r}")
    if params is not None:
        missing = [k for k in PARAM_NAMES if k not in params]
        if missing:
            raise DataError(f"{where}: /params lacks {', '.join(missing)} (a params group needs all of "
                            f"{', '.join(PARAM_NAMES)})")
        for key in [k for k in PARAM_NAMES + MODEL_PARAM_NAMES if k in params]:
            value = np.asarray(params[key])
            if value.shape != (n,):
                raise DataError(f"{where}: /params/{key} has shape {value.shape}, expected ({n},), one per trajectory")
            if not np.isfinite(value).all():
                raise DataError(f"{where}: /params/{key}[{int(np.argmax(~np.isfinite(value)))}] is not finite")


def save(path: str | os.PathLike, data: LVData) -> Path:
    """Write the schema atomically (a partly written file never replaces a good one); returns the path."""
    validate(data.trajectories, data.time, str(path), data.params)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("trajectories", data=np.asarray(data.trajectories, dtype=np.float32))
            f.create_dataset("time", data=np.asarray(data.time, dtype=np.float64))
            if data.params:
                group = f.create_group("params")
                for key in [k for k in PARAM_NAMES + MODEL_PARAM_NAMES if k in data.params]:
                    group.create_dataset(key, data=np.asarray(data.params[key], dtype=np.float64))
            for key, value in data.attrs.items():
                f.attrs[key] = value

    return atomic_write(path, write)


# ---- simulation --------------------------------------------------------------------------------------------------

def _stack(arrays, axis):
    """np.stack or torch.stack, whichever the arrays are: the integrator also runs under autograd (the LV fit)."""
    if isinstance(arrays[0], torch.Tensor):
        return torch.stack(arrays, dim=axis)
    return np.stack(arrays, axis=axis)


def lv_rhs(state: np.ndarray, alpha, beta, gamma, delta, inv_capacity=None, handling=None) -> np.ndarray:
    """d/dt of state (..., 2) = (prey x, predator y) under the equations above (PRIORS); rates broadcast against
    state[..., 0]. inv_capacity and handling None (or 0): classic LV. numpy or torch."""
    x, y = state[..., 0], state[..., 1]
    growth = alpha * x if inv_capacity is None else alpha * x * (1 - inv_capacity * x)
    encounters = x * y if handling is None else x * y / (1 + handling * x)
    return _stack([growth - beta * encounters, delta * encounters - gamma * y], axis=-1)


def rk4(rhs, state: np.ndarray, times: np.ndarray, substeps: int) -> np.ndarray:
    """Classic RK4 with `substeps` equal steps between consecutive output times; returns (..., T, dim).
    numpy arrays or torch tensors (then differentiable)."""
    out = [state]
    for t0, t1 in zip(times[:-1], times[1:]):
        h = (t1 - t0) / substeps
        for _ in range(substeps):
            k1 = rhs(state)
            k2 = rhs(state + 0.5 * h * k1)
            k3 = rhs(state + 0.5 * h * k2)
            k4 = rhs(state + h * k3)
            state = state + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(state)
    return _stack(out, axis=-2)


def prior_ranges(prior: str = DEFAULT_PRIOR, **overrides: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """The (low, high) range of every quantity `prior` draws (see PRIORS), with `overrides` replacing some."""
    if prior not in PRIORS:
        raise ValueError(f"simulate: unknown prior {prior!r}; choose from {', '.join(PRIORS)}")
    unknown = [key for key in overrides if key not in PRIORS[prior]]
    if unknown:
        raise ValueError(f"simulate: the {prior!r} prior has no range {unknown[0]!r} (it has "
                         f"{', '.join(PRIORS[prior])})")
    ranges = {key: tuple(float(v) for v in overrides.get(key, value)) for key, value in PRIORS[prior].items()}
    for key, (low, high) in ranges.items():
        floor_ok = low >= 0 if key in MAY_BE_ZERO else low > 0
        if not (floor_ok and low <= high and np.isfinite(high)):
            bound = "0 <= low" if key in MAY_BE_ZERO else "0 < low"
            raise ValueError(f"simulate: range {key}=({low}, {high}) must satisfy {bound} <= high (finite)")
    return ranges


def draw_params(n: int, rng: np.random.Generator, ranges: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Each trajectory's parameters (PARAM_NAMES + MODEL_PARAM_NAMES), drawn uniformly from `ranges` (those of a
    prior: see PRIORS; the "lv" keys or the "varied" keys), in the ranges' order: same seed, same draws."""
    draw = {key: rng.uniform(low, high, n) for key, (low, high) in ranges.items()}
    if "prey_equilibrium" in draw:  # the "lv" prior: rates set through the equilibrium, no extra terms
        zeros = np.zeros(n)
        return {"alpha": draw["alpha"], "beta": draw["alpha"] / draw["predator_equilibrium"],
                "gamma": draw["gamma"], "delta": draw["gamma"] / draw["prey_equilibrium"],
                "x0": draw["x0"], "y0": draw["y0"], "inv_capacity": zeros, "handling": zeros, "noise": zeros}
    return {"alpha": draw["alpha"], "beta": draw["beta"], "gamma": draw["gamma"],
            "delta": draw["efficiency"] * draw["beta"], "x0": draw["x0"], "y0": draw["y0"],
            "inv_capacity": 1.0 / draw["capacity"], "handling": draw["handling"], "noise": draw["noise"]}


def observe(trajectories: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Trajectories (N, T, V) observed with multiplicative log-normal noise: x * exp(noise * e), e ~ N(0, 1) per
    value, `noise` (N,) each trajectory's standard deviation; stays >= 0."""
    return trajectories * np.exp(noise[:, None, None] * rng.standard_normal(trajectories.shape))


def simulate(n: int = DEFAULT_N, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED, t_end: float = DEFAULT_T_END,
             substeps: int = DEFAULT_SUBSTEPS, *, prior: str = DEFAULT_PRIOR,
             **ranges: tuple[float, float]) -> LVData:
    """`n` trajectories sampled at `steps` evenly spaced times over [0, t_end], integrated by RK4 with `substeps`
    steps between samples, then observed with the trajectory's noise. Each trajectory's parameters are drawn from
    `prior` (PRIORS: "varied", the default data set, or "lv", classic Lotka-Volterra); keyword ranges, e.g.
    alpha=(0.2, 0.2), replace the prior's. Same arguments, same data."""
    if n < 1 or steps < 2 or substeps < 1 or not t_end > 0:
        raise ValueError(f"simulate needs n >= 1, steps >= 2, substeps >= 1 and t_end > 0, got n={n}, "
                         f"steps={steps}, substeps={substeps}, t_end={t_end}")
    ranges = prior_ranges(prior, **ranges)
    rng = np.random.default_rng(seed)
    params = draw_params(n, rng, ranges)
    time = np.linspace(0.0, t_end, steps)
    rates = [params[k] for k in ("alpha", "beta", "gamma", "delta")]
    extra = [None if not params[k].any() else params[k] for k in ("inv_capacity", "handling")]
    state = np.stack([params["x0"], params["y0"]], axis=-1)
    trajectories = rk4(lambda s: lv_rhs(s, *rates, *extra), state, time, substeps)
    if params["noise"].any():  # drawn after the parameters, so the noise never changes them
        trajectories = observe(trajectories, params["noise"], rng)
    attrs = {"generator": "data.lotka_volterra.simulate", "prior": prior, "seed": int(seed), "t_end": float(t_end),
             "substeps": int(substeps), "ranges": json.dumps(ranges)}
    return LVData(trajectories.astype(np.float32), time, params, attrs=attrs)


def lv_invariant(x, y, alpha, beta, gamma, delta):
    """Conserved along exact LV trajectories: V = delta*x - gamma*ln(x) + beta*y - alpha*ln(y)."""
    return delta * x - gamma * np.log(x) + beta * y - alpha * np.log(y)


# ---- default data source and split -------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$QWEN_MINI_CACHE, else $XDG_CACHE_HOME/qwen_mini, else ~/.cache/qwen_mini."""
    if os.environ.get("QWEN_MINI_CACHE"):
        return Path(os.environ["QWEN_MINI_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen_mini"


def _default_settings() -> dict:
    """Everything besides (n, steps, seed) that decides the default simulated set."""
    return {"t_end": DEFAULT_T_END, "substeps": DEFAULT_SUBSTEPS, "prior": DEFAULT_PRIOR,
            "ranges": {k: list(v) for k, v in PRIORS[DEFAULT_PRIOR].items()}}


def default_data_path() -> Path:
    """Where the default simulated set is cached. The name spells out n, steps and seed and ends with a digest of the
    other settings, so changing the simulator's defaults never silently reuses a set made with the old ones."""
    digest = hashlib.sha256(json.dumps(_default_settings(), sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / f"lv_simulated_n{DEFAULT_N}_t{DEFAULT_STEPS}_seed{DEFAULT_SEED}_{digest}.h5"


def load_or_simulate(path: str | os.PathLike | None) -> LVData:
    """The h5 at `path`, or (None) the built-in simulated set, generated once and cached on disk."""
    if path is not None:
        return load(path)
    cached = default_data_path()
    if not cached.is_file():
        print(f"[data] simulating the default data set ({DEFAULT_N} trajectories x {DEFAULT_STEPS} steps, "
              f"seed {DEFAULT_SEED}) -> {cached}", file=sys.stderr)
        settings = _default_settings()
        # save() writes through a temporary file and a rename, so concurrent first uses each write a whole file.
        save(cached, simulate(DEFAULT_N, DEFAULT_STEPS, DEFAULT_SEED, settings["t_end"], settings["substeps"],
                              prior=settings["prior"], **settings["ranges"]))
    try:
        return load(cached)
    except DataError as e:
        raise DataError(f"{e} (this is the cached default data set: delete it to have it simulated again)") from None


@dataclass
class Split:
    """Trajectory indices (sorted) of each part, and what made them; `to_dict` is what a run records."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    fractions: tuple[float, float, float]
    n: int
    mode: str = "random"  # "ordered" or "random" (see split_indices); runs that predate the modes were random

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in ("train", "val", "test"):
            raise KeyError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)

    def which(self, index: int) -> str:
        """The split ("train", "val" or "test") that trajectory `index` belongs to."""
        for name in ("train", "val", "test"):
            if index in self[name]:
                return name
        raise KeyError(f"trajectory index {index} is in no split (the split covers 0..{self.n - 1})")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "fractions": list(self.fractions), "n": self.n,
                **{k: self[k].tolist() for k in ("train", "val", "test")}}

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        """The split a run recorded, index lists as they were (a record without a mode predates the ordered split,
        and was random)."""
        return cls(*(np.asarray(d[k], dtype=np.int64) for k in ("train", "val", "test")), seed=d["seed"],
                   fractions=tuple(d["fractions"]), n=d["n"], mode=d.get("mode", "random"))

    def describe(self) -> str:
        if self.mode == "ordered":
            return "in file order (the last trajectories are the test split)"
        return f"random, seed {self.seed}"


SPLIT_MODES = ("ordered", "random")
DEFAULT_SPLIT_MODE = "ordered"


def split_indices(n: int, seed: int = 0, fractions=(0.7, 0.15, 0.15), mode: str = DEFAULT_SPLIT_MODE) -> Split:
    """Train/val/test split of trajectory indices. mode "ordered" (the default): in file order, the first
    fractions[0] train, the next fractions[1] validation, the rest (the last trajectories) test, so an index says
    its split at a glance (with 1000 trajectories: 0-699, 700-849, 850-999). mode "random": a seeded permutation
    (`seed` matters only here). The same arguments always give the same split."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"split mode must be one of {', '.join(SPLIT_MODES)}, got {mode!r}")
    if int(n) != n or n < 0:
        raise ValueError(f"split_indices needs a whole number of trajectories n >= 0, got {n!r}")
    n = int(n)
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = np.arange(n) if mode == "ordered" else np.random.default_rng(seed).permutation(n)
    # Train and val sizes are rounded; test takes the rest, so the three always cover all n indices exactly.
    n_train = min(n, round(n * fractions[0]))
    n_val = min(n - n_train, round(n * fractions[1]))
    parts = np.split(order, [n_train, n_train + n_val])
    return Split(*(np.sort(p) for p in parts), seed=seed, fractions=fractions, n=n, mode=mode)


# ---- CLI ---------------------------------------------------------------------------------------------------------

def summary(data: LVData) -> str:
    """One paragraph describing a data set: size, time grid, value ranges, and how it was made if recorded."""
    x = data.trajectories
    lines = [f"{data.path or 'data'}: {x.shape[0]} trajectories x {x.shape[1]} steps, "
             f"time {data.time[0]:g}..{data.time[-1]:g}",
             *(f"  {name:<8} min {x[..., i].min():.4g}  mean {x[..., i].mean():.4g}  max {x[..., i].max():.4g}"
               for i, name in enumerate(("prey", "predator")))]
    if data.params:
        lines.append("  params   " + "  ".join(f"{k} {data.params[k].min():.3g}..{data.params[k].max():.3g}"
                                               for k in PARAM_NAMES))
    if data.attrs:
        lines.append("  made by  " + ", ".join(f"{k}={v}" for k, v in data.attrs.items() if k != "ranges"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.lotka_volterra", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--simulate", action="store_true", help="simulate a data set and write it to --out")
    action.add_argument("--check", metavar="H5", help="validate an h5 file and print a summary")
    action.add_argument("--default", action="store_true",
                        help="print where the default (simulated, cached) data set lives, simulating it if needed")
    p.add_argument("--out", help="output h5 path for --simulate")
    p.add_argument("--n", type=int, default=DEFAULT_N, help="trajectories (default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="samples per trajectory (default %(default)s)")
    p.add_argument("--t-end", type=float, default=DEFAULT_T_END, help="last time point (default %(default)s)")
    p.add_argument("--substeps", type=int, default=DEFAULT_SUBSTEPS,
                   help="RK4 steps between samples (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default %(default)s)")
    p.add_argument("--prior", choices=list(PRIORS), default=DEFAULT_PRIOR,
                   help="parameter prior (see PRIORS in data/lotka_volterra.py): varied = logistic prey, "
                        "saturating predator, observation noise; lv = classic Lotka-Volterra (default %(default)s)")
    args = p.parse_args(argv)
    if args.simulate and not args.out:
        p.error("--simulate needs --out PATH")
    try:
        if args.check:
            data = load(args.check)
        elif args.default:
            data = load_or_simulate(None)
        else:
            data = simulate(args.n, args.steps, args.seed, args.t_end, args.substeps, prior=args.prior)
            data.path = str(save(args.out, data))
        print(summary(data))
        return 0
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
