"""Lotka-Volterra predator-prey data: the users' h5 schema, a validating loader, and a built-in simulator.

Schema (as in the coursework's `lotka_volterra_data.h5`):
    /trajectories  float (N, T, 2), N >= 1, T >= 2: prey in [..., 0], predator in [..., 1]; finite, >= 0
    /time          float (T,), finite, strictly increasing
    /params/{alpha,beta,gamma,delta,x0,y0}  (N,) — written for simulated sets; optional when loading
    root attributes  how a simulated set was made (seed, t_end, substeps, ranges as JSON); optional
Any other dataset or group is ignored. Every violation raises `DataError` naming the file, the dataset and the fault.

Equations: dx/dt = alpha*x - beta*x*y (prey), dy/dt = delta*x*y - gamma*y (predator).

    python -m data.lotka_volterra --simulate --out lv.h5 [--n 1000 --steps 100 --seed 0]
    python -m data.lotka_volterra --check lotka_volterra_data.h5     # validate and summarise a file
    python -m data.lotka_volterra --default                          # the data every CLI uses without --data
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from qwen_mini.fileio import atomic_write

PARAM_NAMES = ("alpha", "beta", "gamma", "delta", "x0", "y0")

# Ranges the simulator draws from (uniformly), chosen to resemble the coursework file. Positive rates always give
# closed orbits; beta and delta are set through the equilibrium (x*, y*) = (gamma/delta, alpha/beta) so that every
# orbit circles a point of the data's magnitude rather than one far from its starting populations.
# Regressing d(ln x)/dt = alpha - beta*y and d(ln y)/dt = delta*x - gamma on the coursework trajectories gives
# alpha, gamma ~ 0.08-0.25 (5th-95th percentile), x* ~ 0.6-3.9, y* ~ 0.26-1.0; its starting points are 0.8-1.2.
# With these ranges (seed 0) the per-trajectory prey peak has quartiles 1.8 / 3.0 / 4.5 (coursework: 2.0 / 3.0 /
# 4.4), 95 % of peaks stay below 7.5 (7.6), and a trajectory shows a median of 4 prey peaks over 0..200 (4).
# x* < e also keeps the LV invariant V >= gamma*(1 - ln x*) + alpha*(1 - ln y*) > 0, so its relative drift is a
# meaningful check of the integrator.
DEFAULT_RANGES = {
    "alpha": (0.08, 0.25),
    "gamma": (0.08, 0.25),
    "prey_equilibrium": (0.5, 2.5),
    "predator_equilibrium": (0.25, 1.0),
    "x0": (0.8, 1.2),
    "y0": (0.8, 1.2),
}
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
            params = {k: _read_float(f["params"], k, path, prefix="params/") for k in PARAM_NAMES if k in f["params"]}
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


def _open(path: Path) -> h5py.File:
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an h5 file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
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
        for key in PARAM_NAMES:
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
                for key in PARAM_NAMES:
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


def lv_rhs(state: np.ndarray, alpha, beta, gamma, delta) -> np.ndarray:
    """d/dt of state (..., 2) = (prey x, predator y); rates broadcast against state[..., 0]. numpy or torch."""
    x, y = state[..., 0], state[..., 1]
    return _stack([alpha * x - beta * x * y, delta * x * y - gamma * y], axis=-1)


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


def draw_params(n: int, rng: np.random.Generator, ranges: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Draw each trajectory's (alpha, beta, gamma, delta, x0, y0) uniformly from `ranges` (keys of DEFAULT_RANGES)."""
    for key, (low, high) in ranges.items():
        if not 0 < low <= high:
            raise ValueError(f"simulate: range {key}=({low}, {high}) must satisfy 0 < low <= high "
                             f"(rates and populations are positive)")
    draw = {key: rng.uniform(*ranges[key], n) for key in DEFAULT_RANGES}  # fixed order: same seed, same draws
    return {"alpha": draw["alpha"], "beta": draw["alpha"] / draw["predator_equilibrium"],
            "gamma": draw["gamma"], "delta": draw["gamma"] / draw["prey_equilibrium"],
            "x0": draw["x0"], "y0": draw["y0"]}


def simulate(n: int = DEFAULT_N, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED, t_end: float = DEFAULT_T_END,
             substeps: int = DEFAULT_SUBSTEPS, *,
             alpha: tuple[float, float] = DEFAULT_RANGES["alpha"],
             gamma: tuple[float, float] = DEFAULT_RANGES["gamma"],
             prey_equilibrium: tuple[float, float] = DEFAULT_RANGES["prey_equilibrium"],
             predator_equilibrium: tuple[float, float] = DEFAULT_RANGES["predator_equilibrium"],
             x0: tuple[float, float] = DEFAULT_RANGES["x0"],
             y0: tuple[float, float] = DEFAULT_RANGES["y0"]) -> LVData:
    """`n` trajectories sampled at `steps` evenly spaced times over [0, t_end], integrated by RK4 with `substeps`
    steps between samples. Each trajectory's parameters are drawn uniformly from the (low, high) ranges (see
    DEFAULT_RANGES for why these): alpha, gamma directly, beta = alpha / predator_equilibrium, delta = gamma /
    prey_equilibrium, and the starting populations x0 (prey), y0 (predator). Same arguments, same data."""
    if n < 1 or steps < 2 or substeps < 1 or not t_end > 0:
        raise ValueError(f"simulate needs n >= 1, steps >= 2, substeps >= 1 and t_end > 0, got n={n}, "
                         f"steps={steps}, substeps={substeps}, t_end={t_end}")
    ranges = {"alpha": alpha, "gamma": gamma, "prey_equilibrium": prey_equilibrium,
              "predator_equilibrium": predator_equilibrium, "x0": x0, "y0": y0}
    ranges = {key: (float(low), float(high)) for key, (low, high) in ranges.items()}
    params = draw_params(n, np.random.default_rng(seed), ranges)
    time = np.linspace(0.0, t_end, steps)
    rates = [params[k] for k in ("alpha", "beta", "gamma", "delta")]
    state = np.stack([params["x0"], params["y0"]], axis=-1)
    trajectories = rk4(lambda s: lv_rhs(s, *rates), state, time, substeps)
    attrs = {"generator": "data.lotka_volterra.simulate", "seed": int(seed), "t_end": float(t_end),
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
    return {"t_end": DEFAULT_T_END, "substeps": DEFAULT_SUBSTEPS,
            "ranges": {k: list(v) for k, v in DEFAULT_RANGES.items()}}


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
                              **settings["ranges"]))
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
        return {"seed": self.seed, "fractions": list(self.fractions), "n": self.n,
                **{k: self[k].tolist() for k in ("train", "val", "test")}}

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(*(np.asarray(d[k], dtype=np.int64) for k in ("train", "val", "test")), seed=d["seed"],
                   fractions=tuple(d["fractions"]), n=d["n"])


def split_indices(n: int, seed: int = 0, fractions=(0.7, 0.15, 0.15)) -> Split:
    """Seeded train/val/test split of trajectory indices; the same (n, seed, fractions) always gives the same one."""
    if int(n) != n or n < 0:
        raise ValueError(f"split_indices needs a whole number of trajectories n >= 0, got {n!r}")
    n = int(n)
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(n)
    # Train and val sizes are rounded; test takes the rest, so the three always cover all n indices exactly.
    n_train = min(n, round(n * fractions[0]))
    n_val = min(n - n_train, round(n * fractions[1]))
    parts = np.split(order, [n_train, n_train + n_val])
    return Split(*(np.sort(p) for p in parts), seed=seed, fractions=fractions, n=n)


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
    args = p.parse_args(argv)
    if args.simulate and not args.out:
        p.error("--simulate needs --out PATH")
    try:
        if args.check:
            data = load(args.check)
        elif args.default:
            data = load_or_simulate(None)
        else:
            data = simulate(args.n, args.steps, args.seed, args.t_end, args.substeps)
            data.path = str(save(args.out, data))
        print(summary(data))
        return 0
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
