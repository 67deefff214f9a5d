"""Lotka-Volterra predator-prey data: the users' h5 schema, a validating loader and writer, the default data set (the
built-in simulator's, `data.lv_simulator`, generated once and cached) and the train/val/test split. The simulator's
names (`simulate`, `PRIORS`, `LVData`, ...) are importable from here too.

Schema (as in the coursework's `lotka_volterra_data.h5`):
    /trajectories  float (N, T, 2), N >= 1, T >= 2: prey in [..., 0], predator in [..., 1]; finite, >= 0
    /time          float (T,), finite, strictly increasing
    /params/{alpha,beta,gamma,delta,x0,y0}  (N,) — written for simulated sets; optional when loading
    /params/{inv_capacity,handling,noise}  (N,) — the simulator's terms beyond classic LV; optional
    root attributes  how a simulated set was made (prior, seed, t_end, substeps, ranges as JSON); optional
Any other dataset or group is ignored. Every violation raises `DataError` naming the file, the dataset and the fault.

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
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from common.args import positive_float, positive_int, seed_int
from common.fileio import atomic_write

from .lv_simulator import (  # noqa: F401  (the simulator's public names, re-exported: tests and tools import them here)
    DEFAULT_N,
    DEFAULT_PRIOR,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_SUBSTEPS,
    DEFAULT_T_END,
    MAY_BE_ZERO,
    MODEL_PARAM_NAMES,
    PARAM_NAMES,
    PRIORS,
    LVData,
    draw_params,
    lv_invariant,
    lv_rhs,
    observe,
    prior_ranges,
    rk4,
    simulate,
)


class DataError(ValueError):
    """An h5 file that does not follow the schema; the message names the file, dataset and the fault."""


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


def default_data_file() -> Path:
    """The cached file of the built-in simulated set, simulated and written first if it is not there yet (the same
    bytes every time: same settings, same file)."""
    cached = default_data_path()
    if not cached.is_file():
        print(f"[data] simulating the default data set ({DEFAULT_N} trajectories x {DEFAULT_STEPS} steps, "
              f"seed {DEFAULT_SEED}) -> {cached}", file=sys.stderr)
        settings = _default_settings()
        # save() writes through a temporary file and a rename, so concurrent first uses each write a whole file.
        save(cached, simulate(DEFAULT_N, DEFAULT_STEPS, DEFAULT_SEED, settings["t_end"], settings["substeps"],
                              prior=settings["prior"], **settings["ranges"]))
    return cached


def load_or_simulate(path: str | os.PathLike | None) -> LVData:
    """The h5 at `path`, or (None) the built-in simulated set, generated once and cached on disk."""
    if path is not None:
        return load(path)
    cached = default_data_file()
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
    def from_dict(cls, d: dict) -> Split:
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
    p.add_argument("--n", type=positive_int, default=DEFAULT_N, help="trajectories (default %(default)s)")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                   help="samples per trajectory, >= 2 (default %(default)s)")
    p.add_argument("--t-end", type=positive_float, default=DEFAULT_T_END, help="last time point (default %(default)s)")
    p.add_argument("--substeps", type=positive_int, default=DEFAULT_SUBSTEPS,
                   help="RK4 steps between samples (default %(default)s)")
    p.add_argument("--seed", type=seed_int, default=DEFAULT_SEED, help="random seed (default %(default)s)")
    p.add_argument("--prior", choices=list(PRIORS), default=DEFAULT_PRIOR,
                   help="parameter prior (see PRIORS in data/lv_simulator.py): varied = logistic prey, "
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
