"""Broad synthetic 2-channel series: a stand-in for the general data a pretrained model has seen.

Not the users' calibrated Lotka-Volterra prior (`data.lotka_volterra.PRIORS`): a mixture of generic series families,
so a base pretrained on it knows what series look like in LLMTIME text, and even knows the predator-prey family, but
not the users' dynamics (their parameters; the logistic prey and saturating predation the calibrated prior fits to
them): the broad classic-LV draws put one in six at the users' periods, at other levels and orbit sizes. Written in
the project's own h5 schema, so `data.lotka_volterra.load` and `train.py --data` read the file unchanged:

    /trajectories  float32 (N, steps, 2), finite, >= 0     (channel 0 and channel 1 of each series)
    /time          float64 (steps,), 0..t_end               (default: 100 steps over 0..200, the users' grid)
    /component     int8 (N,): each trajectory's component, an index into COMPONENTS (extra: `load` ignores it)
    root attrs     generator, seed, steps, t_end, mix and counts (JSON), components (JSON list: the names of the
                   /component codes)

Components (the keys of a mix; every parameter is drawn per trajectory from the component's seeded generator):
    kernelsynth  Gaussian-process draws from random kernel compositions, after Chronos' KernelSynth (Ansari et al.
                 2024): 1-5 kernels drawn from KERNEL_BANK (RBF, periodic ExpSineSquared at 10 periods, rational
                 quadratic, linear DotProduct, white noise, constant), combined with random + / *. Channel 1 is a
                 draw; channel 2 mixes a second independent draw (same kernel) with channel 1 lagged by 0-9 steps and
                 transformed (identity, negated or differenced): rho * h(lagged ch1) + sqrt(1 - rho^2) * draw2.
    ar           AR(p), p in 1..3 with stationary coefficients (reciprocal roots inside the unit circle: real, or a
                 complex pair = a noisy quasi-cycle); channel 2 its own AR(p) plus a lagged coupling to channel 1.
    sines        sums of 1-4 sinusoids (periods log-uniform over 4-300 steps, random phases and amplitudes), an
                 optional growing/decaying envelope, a linear or exponential trend, Gaussian noise; channel 2 shares
                 channel 1's periods with other phases and amplitudes (70 %) or is drawn on its own.
    ode          other ODE systems, integrated with the project's RK4 (`data.lotka_volterra.rk4`), both state
                 variables as the two channels, equally often: damped / driven harmonic oscillator (x, velocity),
                 Van der Pol (Lienard form), FitzHugh-Nagumo, SIR / SIRS epidemics (S, I), Brusselator. Each
                 system's time scale is set so its oscillation period (or infectious period) spans a random
                 number of steps.
    lv           classic Lotka-Volterra over a broad prior, not the users' calibrated one: near-equilibrium period
                 4-300 steps log-uniform (the users' series have dominant periods of 15-32 steps: one draw in six
                 lands there), equilibria 0.05x-20x the users' typical levels, orbits from small to large (no
                 logistic prey, no saturation).
    predprey     the users' model family (logistic prey, saturating Holling type II predator: Rosenzweig-MacArthur,
                 the equations of data/lotka_volterra.py) over a broad prior: rates 0.05-0.8, attack 0.1-1.5,
                 efficiency 0.2-1, carrying capacity 3-40, handling 0-0.4, starts 0.2-3, noise 0-3 % (the users'
                 calibrated ranges are a corner of these; series_families.PREDPREY_*RANGES): dominant periods
                 10-64 steps (5-95 %), 39 % damped to an equilibrium or without a clear period (the users': 2 %).

Non-negative, varied in scale. The users' series are non-negative (prey 0.002-13.7, predator 4e-5-4.8), so every
series here is too: signed families (kernelsynth, ar, sines, oscillator, Van der Pol, FitzHugh-Nagumo) go through
`positivise`, per channel one of: shifted to start at a random fraction (0.01-1) of its span above zero (60 %), a
softplus of the standardised series (hugging zero with bursts, 20 %) or its exponential (log-normal-like, 20 %);
then each channel is scaled to a maximum drawn log-uniformly from LEVEL_RANGE (1e-2..1e2). SIR and the Brusselator
are non-negative by construction (clipped at 0 against integration error), LV is integrated in log coordinates.

What the LLMTIME scaler sees. `data.llmtime.Scaler.fit` divides each channel by the 95th percentile of its history
(the first 50 steps in training and in the default forecast), so the absolute level does not reach the text at all;
what does is the shape relative to zero and how far the rest of the series rises above the history's level. On the
users' file the maximum of the last 50 steps is at most 2.25x the first 50 steps' 95th percentile; a trend or an
epidemic that starts near zero can make it 1000x here, i.e. texts of numbers like "734.21". `headroom` caps that
ratio at HEADROOM (10) by adding a constant to such a channel (its shape is kept), so every encoded value of a
50-step-scaled text has at most two integer digits.

    python -m data.synthetic --n 40000 --seed 1 --out synth.h5
    python -m data.synthetic --n 2000 --seed 0 --mix kernelsynth=0.5,ar=0.5 --out small.h5
    python -m data.synthetic --n 2000 --seed 0 --out s.h5 --compare lotka_volterra_data.h5   # periods and ranges
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time as _time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from common.args import MAX_SEED, positive_float, positive_int, seed_int
from data.lotka_volterra import LVData, load, validate
from data.lotka_volterra import save as save_lv
from data.series_families import GENERATORS, HEADROOM_FIT_STEPS, largest_remainder

COMPONENTS = ("kernelsynth", "ar", "sines", "ode", "lv", "predprey")  # /component codes 0..5
# The default mixture (normalised weights): mostly generic series (GP draws, AR, sinusoids: 70 %), some dynamical
# systems (20 %) and a little classic Lotka-Volterra over a broad prior (10 %).
DEFAULT_MIX = {"kernelsynth": 0.35, "ar": 0.15, "sines": 0.2, "ode": 0.2, "lv": 0.1}
DEFAULT_STEPS, DEFAULT_T_END = 100, 200.0
# The shuffle's generator is seeded by (seed, SHUFFLE_STREAM), apart from every component's (seed, code). Fixed at 5
# (the component count when the first base was pretrained): a component added since must not reorder the series
# an existing recipe trains on.
SHUFFLE_STREAM = 5


@dataclass
class SyntheticData(LVData):
    """An LVData (params None) that also knows each trajectory's component: an index into COMPONENTS."""
    component: np.ndarray | None = None  # (N,) int8


# ---- the mixture -----------------------------------------------------------------------------------------------

def check_mix(mix: dict | None) -> dict[str, float]:
    """The mix as normalised weights over COMPONENTS (a missing key weighs 0); None: DEFAULT_MIX. Raises ValueError
    naming the bad key or value: an unknown component, a weight that is not a finite number >= 0, all weights 0."""
    mix = DEFAULT_MIX if mix is None else mix
    if not isinstance(mix, dict):
        raise ValueError(f"mix must be a dict of component -> weight, got {type(mix).__name__}")
    weights = {}
    for key, value in mix.items():
        if key not in COMPONENTS:
            raise ValueError(f"unknown component {key!r} (components: {', '.join(COMPONENTS)})")
        try:
            weight = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {key!r} is {value!r}, not a number") from None
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight of {key!r} is {value!r}; weights must be finite and >= 0")
        weights[key] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mix {mix!r} has no positive weight")
    return {key: weights.get(key, 0.0) / total for key in COMPONENTS}


def parse_mix(text: str) -> dict[str, float]:
    """"kernelsynth=0.4,ar=0.2" -> {"kernelsynth": 0.4, "ar": 0.2} (checked by check_mix, not normalised)."""
    mix = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{item!r} is not COMPONENT=WEIGHT")
        if key in mix:
            raise ValueError(f"component {key!r} is given twice")
        try:
            mix[key] = float(value)
        except ValueError:
            raise ValueError(f"weight of {key!r} is {value.strip()!r}, not a number") from None
    check_mix(mix)
    return mix


def allocate(n: int, mix: dict | None) -> dict[str, int]:
    """How many of `n` trajectories each component gets: n * weight, rounded by largest remainder (sums to n)."""
    weights = check_mix(mix)
    return dict(zip(COMPONENTS, largest_remainder(n, [weights[k] for k in COMPONENTS])))


def generate(n: int, seed: int = 0, mix: dict | None = None, *, steps: int = DEFAULT_STEPS,
             t_end: float = DEFAULT_T_END) -> SyntheticData:
    """`n` series of `steps` samples over [0, t_end], allocated to the components by `mix` (see `allocate`) and
    shuffled. Each component draws from its own generator, seeded by (seed, component), so the same arguments give
    the same data, and a component's series depend only on the seed and its own count."""
    if int(n) != n or n < 1 or int(steps) != steps or steps < 2 or not t_end > 0:
        raise ValueError(f"generate needs n >= 1, steps >= 2 and t_end > 0, got n={n}, steps={steps}, t_end={t_end}")
    if int(seed) != seed or not 0 <= seed <= MAX_SEED:  # checked first: an h5 attribute holds at most an int64
        raise ValueError(f"generate needs a whole seed from 0 to 2**63 - 1, got {seed!r}")
    n, steps, seed = int(n), int(steps), int(seed)
    weights = check_mix(mix)
    counts = allocate(n, weights)
    time = np.linspace(0.0, float(t_end), steps)
    parts, codes = [], []
    for code, name in enumerate(COMPONENTS):
        if counts[name]:
            rng = np.random.default_rng([seed, code])
            parts.append(GENERATORS[name](counts[name], rng, time))
            codes.append(np.full(counts[name], code, dtype=np.int8))
    order = np.random.default_rng([seed, SHUFFLE_STREAM]).permutation(n)
    trajectories = np.concatenate(parts)[order].astype(np.float32)
    component = np.concatenate(codes)[order]
    attrs = {"generator": "data.synthetic.generate", "seed": seed, "steps": steps, "t_end": float(t_end),
             "mix": json.dumps({k: round(w, 12) for k, w in weights.items()}), "counts": json.dumps(counts),
             "components": json.dumps(list(COMPONENTS))}
    validate(trajectories, time, "data.synthetic.generate")
    return SyntheticData(trajectories, time, None, attrs=attrs, component=component)


def save(path: str | os.PathLike, data: SyntheticData) -> Path:
    """The schema through `data.lotka_volterra.save`, plus /component, atomically: written beside `path` and then
    renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.synthetic.tmp")
    try:
        save_lv(tmp, data)
        if data.component is not None:
            with h5py.File(tmp, "r+") as f:
                f.create_dataset("component", data=np.asarray(data.component, dtype=np.int8))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_components(path: str | os.PathLike) -> tuple[np.ndarray, tuple[str, ...]]:
    """A synthetic file's /component codes and the names they index (its `components` attribute)."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["component"][()]), tuple(json.loads(f.attrs["components"]))


# ---- description: dominant period and value ranges -------------------------------------------------------------

def dominant_period(x: np.ndarray, min_peak: float = 0.1) -> np.ndarray:
    """(n, T) series -> (n,) dominant period in steps: the lag of the highest autocorrelation (of the linearly
    detrended series) after its first zero crossing, up to 2T/3; NaN when that peak is below `min_peak`
    (aperiodic) or there is no zero crossing."""
    x = np.asarray(x, dtype=np.float64)
    n, t = x.shape
    u = np.arange(t) - (t - 1) / 2
    x = x - x.mean(1, keepdims=True)
    x = x - (x @ u / (u @ u))[:, None] * u[None, :]
    spectrum = np.fft.rfft(x, n=2 * t, axis=1)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :t]
    acf = acf / np.where(acf[:, :1] > 0, acf[:, :1], 1.0)
    lags = np.arange(t)[None, :]
    negative = acf < 0
    first_zero = np.where(negative.any(1), negative.argmax(1), t)
    search = (lags >= first_zero[:, None]) & (lags <= 2 * t // 3)
    masked = np.where(search, acf, -np.inf)
    best = masked.argmax(1)
    peak = masked[np.arange(n), best]
    return np.where(peak >= min_peak, best, np.nan).astype(np.float64)


def describe(trajectories: np.ndarray, fit_steps: int = HEADROOM_FIT_STEPS) -> dict[str, np.ndarray]:
    """Per-trajectory statistics of (N, T, 2) for comparing data sets: for each channel c, period_c (dominant
    period, steps), min_c, max_c, floor_c = min / max (the scale-free depth of the troughs: what the text sees), and
    rise_c = max of the steps after `fit_steps` / 95th percentile of the first `fit_steps` (what the LLMTIME scale
    makes of the future)."""
    x = np.asarray(trajectories, dtype=np.float64)
    out = {}
    for c in range(x.shape[2]):
        series = x[..., c]
        level = np.percentile(np.abs(series[:, :fit_steps]), 95, axis=1)
        out[f"period_{c}"] = dominant_period(series)
        out[f"min_{c}"], out[f"max_{c}"] = series.min(1), series.max(1)
        out[f"floor_{c}"] = out[f"min_{c}"] / np.where(out[f"max_{c}"] > 0, out[f"max_{c}"], np.nan)
        out[f"rise_{c}"] = np.abs(series[:, fit_steps:]).max(1) / np.where(level > 0, level, np.nan)
    return out


def compare(synthetic: np.ndarray, reference: np.ndarray, names=("synthetic", "reference")) -> str:
    """A short table: percentiles (5, 25, 50, 75, 95) of each describe() statistic in both sets, the share of
    aperiodic series, and the share of synthetic series inside the reference's 5-95 % box of (period, min, max),
    and of the scale-free (period, floor), for both channels."""
    a, b = describe(synthetic), describe(reference)
    q = (5, 25, 50, 75, 95)
    lines = [f"{'statistic':<10} {'set':<10} " + " ".join(f"{f'p{p}':>9}" for p in q) + "  aperiodic"]
    for key in a:
        for name, d in zip(names, (a, b)):
            values = d[key]
            finite = values[np.isfinite(values)]
            cells = " ".join(f"{v:9.3g}" for v in np.percentile(finite, q)) if finite.size else " " * 49
            extra = f"  {np.isnan(values).mean():8.1%}" if key.startswith("period") else ""
            lines.append(f"{key:<10} {name:<10} {cells}{extra}")
    for label, stats in (("period, min, max", ("period", "min", "max")), ("period, floor", ("period", "floor"))):
        inside = np.ones(len(synthetic), dtype=bool)
        for key in [k for k in b if k.rsplit("_", 1)[0] in stats]:
            low, high = np.nanpercentile(b[key], [5, 95])
            inside &= (a[key] >= low) & (a[key] <= high)
        lines.append(f"{names[0]} series inside the {names[1]}'s 5-95 % box of ({label}) in both channels: "
                     f"{inside.mean():.1%}")
    return "\n".join(lines)


def component_summary(data: SyntheticData) -> list[str]:
    """One line per component present: count and share, per-channel value range, median period, aperiodic share."""
    lines = []
    for code, name in enumerate(COMPONENTS):
        rows = data.component == code
        if not rows.any():
            continue
        x = data.trajectories[rows].astype(np.float64)
        period = np.concatenate([dominant_period(x[..., c]) for c in range(2)])
        ranges = "  ".join(f"ch{c} {x[..., c].min():.3g}..{x[..., c].max():.3g}" for c in range(2))
        median = f"{np.nanmedian(period):.0f}" if np.isfinite(period).any() else "-"
        lines.append(f"{name:<12} {int(rows.sum()):>7} ({rows.mean():6.1%})  {ranges}  median period {median} steps"
                     f"  aperiodic {np.isnan(period).mean():.0%}")
    return lines


# ---- CLI -------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, required=True, help="trajectories")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed, >= 0 (default %(default)s)")
    p.add_argument("--mix", default=None, metavar="NAME=W,...",
                   help=f"component weights (normalised; a missing component weighs 0), from "
                        f"{', '.join(COMPONENTS)} (default " + ",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items())
                        + ")")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="samples per series (default %(default)s)")
    p.add_argument("--t-end", type=positive_float, default=DEFAULT_T_END, help="last time point (default %(default)s)")
    p.add_argument("--out", required=True, help="output h5 path")
    p.add_argument("--compare", metavar="H5", help="also print periods and value ranges against this h5 file")
    args = p.parse_args(argv)
    try:
        mix = parse_mix(args.mix) if args.mix is not None else None
    except ValueError as e:
        print(f"error: --mix: {e}", file=sys.stderr)
        return 2
    try:
        reference = load(args.compare) if args.compare else None
        start = _time.perf_counter()
        data = generate(args.n, args.seed, mix, steps=args.steps, t_end=args.t_end)
        seconds = _time.perf_counter() - start
        data.path = str(save(args.out, data))
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{data.path}: {len(data)} trajectories x {len(data.time)} steps, time {data.time[0]:g}..{data.time[-1]:g},"
          f" seed {args.seed}, generated in {seconds:.1f} s")
    for line in component_summary(data):
        print("  " + line)
    if reference is not None:
        print(compare(data.trajectories, reference.trajectories, ("synthetic", "reference")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
