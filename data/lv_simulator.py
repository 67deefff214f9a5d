"""The Lotka-Volterra simulator behind the built-in data set: the equations, the priors every parameter is drawn
from (`PRIORS`), RK4, and `simulate`, which returns a data set in memory (`LVData`). Writing, reading and checking
the h5 file, the default data set and the train/val/test split are `data.lotka_volterra`'s (which also re-exports
these names).

Equations (classic LV when inv_capacity = handling = 0; the priors' comment below says more):
    dx/dt = alpha*x*(1 - inv_capacity*x) - beta*x*y/(1 + handling*x)   (prey)
    dy/dt = delta*x*y/(1 + handling*x) - gamma*y                         (predator)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from common.args import MAX_SEED

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


@dataclass
class LVData:
    trajectories: np.ndarray  # (N, T, 2) float32
    time: np.ndarray  # (T,) float64
    params: dict[str, np.ndarray] | None = None  # alpha, beta, gamma, delta, x0, y0: each (N,), simulated sets only
    path: str | None = field(default=None, compare=False)
    attrs: dict = field(default_factory=dict)  # how a simulated set was made (see `simulate`); {} for other files

    def __len__(self) -> int:
        return len(self.trajectories)



# ---- simulation ------------------------------------------------------------------------------------------------------

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
    if int(seed) != seed or not 0 <= seed <= MAX_SEED:  # checked first: an h5 attribute holds at most an int64
        raise ValueError(f"simulate needs a whole seed from 0 to 2**63 - 1, got {seed!r}")
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
