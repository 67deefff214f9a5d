"""Lotka-Volterra predator-prey data: the users' h5 schema, a validating loader, and a built-in simulator.

Schema (as in the coursework's `lotka_volterra_data.h5`):
    /trajectories  float (N, T, 2): prey in [..., 0], predator in [..., 1]
    /time          float (T,), strictly increasing
    /params/{alpha,beta,gamma,delta,x0,y0}  (N,) — written by `simulate`; optional when loading

Equations: dx/dt = alpha*x - beta*x*y (prey), dy/dt = delta*x*y - gamma*y (predator).

    python -m data.lotka_volterra --simulate --out lv.h5 [--n 1000 --steps 100 --seed 0]
    python -m data.lotka_volterra --check lotka_volterra_data.h5
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from qwen_mini.fileio import atomic_write

PARAM_NAMES = ("alpha", "beta", "gamma", "delta", "x0", "y0")

# Ranges the simulator draws from (uniformly). Rates are set through the equilibrium (x*, y*) = (gamma/delta,
# alpha/beta) so that every trajectory orbits a point of the coursework data's magnitude (prey ~1-3, predator
# ~0.3-1); periods 2*pi/sqrt(alpha*gamma) of 16-63 time units give 8-30 samples per cycle at T=100 over 0..200,
# and starting points 0.5-1.5 keep peaks below about 10.
DEFAULT_RANGES = {
    "alpha": (0.1, 0.4),
    "gamma": (0.1, 0.4),
    "prey_equilibrium": (1.0, 3.0),
    "predator_equilibrium": (0.3, 1.0),
    "x0": (0.5, 1.5),
    "y0": (0.5, 1.5),
}
DEFAULT_SEED = 0
DEFAULT_N, DEFAULT_STEPS, DEFAULT_T_END = 1000, 100, 200.0


class DataError(ValueError):
    """An h5 file that does not follow the schema; the message names the file, dataset and the fault."""


@dataclass
class LVData:
    trajectories: np.ndarray  # (N, T, 2) float32
    time: np.ndarray  # (T,) float64
    params: dict[str, np.ndarray] | None = None
    path: str | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.trajectories)


# ---- h5 I/O ------------------------------------------------------------------------------------------------------

def load(path: str | os.PathLike) -> LVData:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        for name in ("trajectories", "time"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise DataError(f"{path}: dataset /{name} is missing (found: {', '.join(sorted(f.keys())) or 'none'})")
        trajectories = np.asarray(f["trajectories"][()], dtype=np.float32)
        time = np.asarray(f["time"][()], dtype=np.float64)
        params = None
        if "params" in f and isinstance(f["params"], h5py.Group):
            params = {k: np.asarray(f["params"][k][()]) for k in PARAM_NAMES if k in f["params"]}
    validate(trajectories, time, str(path))
    return LVData(trajectories, time, params, str(path))


def validate(trajectories: np.ndarray, time: np.ndarray, where: str = "data") -> None:
    if trajectories.ndim != 3 or trajectories.shape[2] != 2:
        raise DataError(f"{where}: /trajectories has shape {trajectories.shape}, expected (N, T, 2)")
    if time.ndim != 1 or time.shape[0] != trajectories.shape[1]:
        raise DataError(f"{where}: /time has shape {time.shape}, expected ({trajectories.shape[1]},) to match "
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
    steps = np.diff(time)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        raise DataError(f"{where}: time is not strictly increasing: time[{i}]={float(time[i])!r}, "
                        f"time[{i + 1}]={float(time[i + 1])!r}")


def save(path: str | os.PathLike, data: LVData) -> Path:
    """Write the schema atomically (a partly written file never replaces a good one)."""
    validate(data.trajectories, data.time, str(path))
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("trajectories", data=data.trajectories.astype(np.float32))
            f.create_dataset("time", data=data.time.astype(np.float64))
            if data.params:
                group = f.create_group("params")
                for key, value in data.params.items():
                    group.create_dataset(key, data=value)

    return atomic_write(path, write)


# ---- simulation --------------------------------------------------------------------------------------------------

def lv_rhs(state: np.ndarray, alpha, beta, gamma, delta) -> np.ndarray:
    x, y = state[..., 0], state[..., 1]
    return np.stack([alpha * x - beta * x * y, delta * x * y - gamma * y], axis=-1)


def rk4(rhs, state: np.ndarray, times: np.ndarray, substeps: int) -> np.ndarray:
    """Classic RK4 with `substeps` equal steps between consecutive output times; returns (..., T, dim)."""
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
    return np.stack(out, axis=-2)


def draw_params(n: int, rng: np.random.Generator, ranges: dict | None = None) -> dict[str, np.ndarray]:
    r = {**DEFAULT_RANGES, **(ranges or {})}
    alpha, gamma = rng.uniform(*r["alpha"], n), rng.uniform(*r["gamma"], n)
    prey_eq, predator_eq = rng.uniform(*r["prey_equilibrium"], n), rng.uniform(*r["predator_equilibrium"], n)
    return {"alpha": alpha, "beta": alpha / predator_eq, "gamma": gamma, "delta": gamma / prey_eq,
            "x0": rng.uniform(*r["x0"], n), "y0": rng.uniform(*r["y0"], n)}


def simulate(n: int = DEFAULT_N, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED, t_end: float = DEFAULT_T_END,
             substeps: int = 100, ranges: dict | None = None) -> LVData:
    """n trajectories of `steps` samples on an even grid over [0, t_end], parameters drawn from `ranges`
    (see DEFAULT_RANGES) with a seeded generator."""
    if n <= 0 or steps < 2:
        raise ValueError(f"simulate needs n >= 1 and steps >= 2, got n={n}, steps={steps}")
    rng = np.random.default_rng(seed)
    params = draw_params(n, rng, ranges)
    time = np.linspace(0.0, t_end, steps)
    rates = [params[k] for k in ("alpha", "beta", "gamma", "delta")]
    state = np.stack([params["x0"], params["y0"]], axis=-1)
    trajectories = rk4(lambda s: lv_rhs(s, *rates), state, time, substeps)
    return LVData(trajectories.astype(np.float32), time, params)


def lv_invariant(x, y, alpha, beta, gamma, delta):
    """Conserved along exact LV trajectories: V = delta*x - gamma*ln(x) + beta*y - alpha*ln(y)."""
    return delta * x - gamma * np.log(x) + beta * y - alpha * np.log(y)


# ---- default data source and split -------------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get("QWEN_MINI_CACHE"):
        return Path(os.environ["QWEN_MINI_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen_mini"


def default_data_path() -> Path:
    return cache_dir() / f"lv_simulated_n{DEFAULT_N}_t{DEFAULT_STEPS}_seed{DEFAULT_SEED}.h5"


def load_or_simulate(path: str | os.PathLike | None) -> LVData:
    """The h5 at `path`, or (None) the built-in simulated set, generated once and cached on disk."""
    if path is not None:
        return load(path)
    cached = default_data_path()
    if not cached.is_file():
        print(f"[data] simulating the default data set ({DEFAULT_N} trajectories x {DEFAULT_STEPS} steps, "
              f"seed {DEFAULT_SEED}) -> {cached}", file=sys.stderr)
        save(cached, simulate(DEFAULT_N, DEFAULT_STEPS, DEFAULT_SEED))
    return load(cached)


@dataclass
class Split:
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
        return next(name for name in ("train", "val", "test") if index in set(self[name].tolist()))

    def to_dict(self) -> dict:
        return {"seed": self.seed, "fractions": list(self.fractions), "n": self.n,
                **{k: self[k].tolist() for k in ("train", "val", "test")}}

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(*(np.asarray(d[k], dtype=np.int64) for k in ("train", "val", "test")), seed=d["seed"],
                   fractions=tuple(d["fractions"]), n=d["n"])


def split_indices(n: int, seed: int = 0, fractions=(0.7, 0.15, 0.15)) -> Split:
    """Seeded train/val/test split of trajectory indices; the same (n, seed, fractions) always gives the same one."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = round(n * fractions[0]), round(n * fractions[1])
    parts = np.split(order, [n_train, n_train + n_val])
    return Split(*(np.sort(p) for p in parts), seed=seed, fractions=fractions, n=n)


# ---- CLI ---------------------------------------------------------------------------------------------------------

def summary(data: LVData) -> str:
    x = data.trajectories
    return (f"{data.path or 'data'}: {x.shape[0]} trajectories x {x.shape[1]} steps, time {data.time[0]:g}..{data.time[-1]:g}; "
            f"prey in [{x[..., 0].min():.4g}, {x[..., 0].max():.4g}] mean {x[..., 0].mean():.4g}; "
            f"predator in [{x[..., 1].min():.4g}, {x[..., 1].max():.4g}] mean {x[..., 1].mean():.4g}"
            + ("; parameters recorded" if data.params else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.lotka_volterra", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--simulate", action="store_true", help="simulate a data set and write it to --out")
    action.add_argument("--check", metavar="H5", help="validate an h5 file and print a summary")
    p.add_argument("--out", help="output h5 path for --simulate")
    p.add_argument("--n", type=int, default=DEFAULT_N, help="trajectories (default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="samples per trajectory (default %(default)s)")
    p.add_argument("--t-end", type=float, default=DEFAULT_T_END, help="last time point (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default %(default)s)")
    args = p.parse_args(argv)
    try:
        if args.check:
            print(summary(load(args.check)))
            return 0
        if not args.out:
            p.error("--simulate needs --out PATH")
        data = simulate(args.n, args.steps, args.seed, args.t_end)
        data.path = str(save(args.out, data))
        print(summary(data))
        return 0
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
