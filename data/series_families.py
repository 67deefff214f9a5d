"""The series families of the synthetic pretraining mixture (`data.synthetic`): KernelSynth Gaussian-process draws,
AR(p) processes, sums of sinusoids, other ODE systems and classic Lotka-Volterra over a broad prior, and the
post-processing they share (non-negative, varied levels, capped headroom over the history). Each family is a function
(n, rng, time) -> (n, steps, 2) float64; `GENERATORS` names them. `data/synthetic.py` documents what each draws."""
from __future__ import annotations

import math

import numpy as np

from data.lotka_volterra import lv_rhs, observe, rk4

ODE_SYSTEMS = ("oscillator", "van_der_pol", "fitzhugh_nagumo", "sir", "brusselator")
LEVEL_RANGE = (1e-2, 1e2)  # each channel's maximum, log-uniform
HEADROOM, HEADROOM_FIT_STEPS = 10.0, 50  # max(series) <= HEADROOM x the 95th percentile of the first 50 steps
ODE_SUBSTEPS, LV_SUBSTEPS = 30, 50  # RK4 steps between samples (stiffest case: |h * lambda| ~ 1)
GP_MAX_LAG = 10  # the GP grid starts this many steps early, for channel 2's lagged copy of channel 1
GP_CHUNK = 500  # trajectories per batched Cholesky (500 x 110 x 110 float64 = 48 MB)
GP_JITTER = 1e-6  # added to the diagonal of the covariance, relative to its mean variance

# KernelSynth's bank. x is the time grid in units of the series length (0..1, as in Chronos), so periods and length
# scales are fractions of the series: "periodic" 0.04 = a 4-step period in a 100-step series.
KERNEL_BANK: tuple[tuple[str, dict], ...] = (
    *(("rbf", {"length_scale": s}) for s in (0.03, 0.1, 0.3, 1.0)),
    *(("rq", {"length_scale": s, "alpha": a}) for s in (0.1, 0.3) for a in (0.1, 1.0, 10.0)),
    *(("periodic", {"period": p / 100, "length_scale": 1.0}) for p in (4, 6, 8, 12, 16, 24, 32, 48, 64, 100)),
    *(("linear", {"sigma_0": s}) for s in (0.0, 1.0, 10.0)),
    *(("white", {"noise_level": v}) for v in (0.1, 1.0)),
    ("constant", {"value": 1.0}),
)
MAX_KERNELS = 5


def largest_remainder(n: int, weights) -> list[int]:
    """n split in proportion to `weights` (summing to 1): floors, then +1 by largest remainder (ties: first)."""
    exact = [n * w for w in weights]
    counts = [int(math.floor(v)) for v in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    return counts


# ---- shared post-processing ------------------------------------------------------------------------------------

def _loguniform(rng: np.random.Generator, low: float, high: float, size) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def _rows(x: np.ndarray) -> np.ndarray:
    """(n, T, C) -> (n*C, T): one row per channel (a copy)."""
    n, t, c = x.shape
    return x.transpose(0, 2, 1).reshape(n * c, t).copy()


def _unrows(rows: np.ndarray, n: int) -> np.ndarray:
    return rows.reshape(n, -1, rows.shape[1]).transpose(0, 2, 1)


def positivise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signed (n, T, C) series -> non-negative, per channel one of (see the module docstring): shifted to start at
    0.01-1 of its span above zero (60 %), softplus of the standardised series (20 %), exp of it (20 %). A flat
    channel becomes a constant 1. Scale-free: the level is set afterwards (`scale_levels`)."""
    n = x.shape[0]
    rows = _rows(np.asarray(x, dtype=np.float64))
    m = rows.shape[0]
    # Every draw is made for every row, whatever its mode: the stream does not depend on the modes.
    mode = rng.choice(3, size=m, p=[0.6, 0.2, 0.2])[:, None]
    offset = _loguniform(rng, 0.01, 1.0, (m, 1))
    sharp, centre = rng.uniform(1.0, 4.0, (m, 1)), rng.uniform(-1.0, 1.5, (m, 1))
    sigma = rng.uniform(0.2, 1.2, (m, 1))
    low, high = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
    span = high - low
    flat = span <= 1e-9 * (np.abs(rows).max(1, keepdims=True) + 1e-300)
    std = np.where(flat, 1.0, rows.std(1, keepdims=True))
    z = np.clip((rows - rows.mean(1, keepdims=True)) / std, -30, 30)
    shifted = (rows - low) / np.where(flat, 1.0, span) + offset
    soft = np.logaddexp(0.0, sharp * (z - centre)) / sharp
    expo = np.exp(sigma * z)
    out = np.where(mode == 0, shifted, np.where(mode == 1, soft, expo))
    out = np.where(flat, 1.0, out)
    return _unrows(out, n)


def headroom(x: np.ndarray, ratio: float = HEADROOM, fit_steps: int = HEADROOM_FIT_STEPS) -> np.ndarray:
    """Non-negative (n, T, C) -> the same, each channel whose maximum exceeds `ratio` x the 95th percentile of its
    first `fit_steps` steps (the LLMTIME scale) raised by the constant that makes it exactly `ratio`."""
    n = x.shape[0]
    rows = _rows(np.asarray(x, dtype=np.float64))
    level = np.percentile(rows[:, :min(fit_steps, rows.shape[1])], 95, axis=1)
    top = rows.max(1)
    lift = np.where(top > ratio * level, (top - ratio * level) / (ratio - 1.0), 0.0)
    return _unrows(rows + lift[:, None], n)


def scale_levels(x: np.ndarray, rng: np.random.Generator, level_range=LEVEL_RANGE) -> np.ndarray:
    """Non-negative (n, T, C) -> each channel scaled to a maximum drawn log-uniformly from `level_range`."""
    n, _, c = x.shape
    level = _loguniform(rng, *level_range, (n, 1, c))
    top = x.max(axis=1, keepdims=True)
    return np.where(top > 0, x / np.where(top > 0, top, 1.0), 1.0) * level


def _finish_signed(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return scale_levels(headroom(positivise(x, rng)), rng)


# ---- kernelsynth -----------------------------------------------------------------------------------------------

def kernel(name: str, x: np.ndarray, **params) -> np.ndarray:
    """One kernel of the bank on the grid x (T,) -> (T, T), as scikit-learn defines them (length scales and
    periods in the units of x)."""
    d = x[:, None] - x[None, :]
    if name == "rbf":
        return np.exp(-0.5 * (d / params["length_scale"]) ** 2)
    if name == "rq":
        a = params["alpha"]
        return (1.0 + d ** 2 / (2.0 * a * params["length_scale"] ** 2)) ** (-a)
    if name == "periodic":
        return np.exp(-2.0 * np.sin(np.pi * np.abs(d) / params["period"]) ** 2 / params["length_scale"] ** 2)
    if name == "linear":
        return params["sigma_0"] ** 2 + x[:, None] * x[None, :]
    if name == "white":
        return params["noise_level"] * np.eye(len(x))
    if name == "constant":
        return np.full((len(x), len(x)), float(params["value"]))
    raise ValueError(f"unknown kernel {name!r} (kernels: rbf, rq, periodic, linear, white, constant)")


def kernel_matrix(kernels, x: np.ndarray, ops=()) -> np.ndarray:
    """A composition: kernels [(name, params), ...] combined left to right by ops ("+" or "*", one fewer)."""
    if len(ops) != len(kernels) - 1:
        raise ValueError(f"kernel_matrix: {len(kernels)} kernels need {len(kernels) - 1} ops, got {len(ops)}")
    out = kernel(kernels[0][0], x, **kernels[0][1])
    for (name, params), op in zip(kernels[1:], ops):
        k = kernel(name, x, **params)
        if op not in ("+", "*"):
            raise ValueError(f"kernel_matrix: op {op!r} is not '+' or '*'")
        out = out + k if op == "+" else out * k
    return out


def sample_gp(cov: np.ndarray, size: int | tuple, rng: np.random.Generator, jitter: float = GP_JITTER) -> np.ndarray:
    """Zero-mean Gaussian draws with covariance `cov` (..., T, T): (..., T, size) for an int size. `jitter` x the
    mean variance is added to the diagonal (a composition may be singular); an eigendecomposition (negative
    eigenvalues clipped) stands in if Cholesky still fails."""
    cov = np.asarray(cov, dtype=np.float64)
    t = cov.shape[-1]
    scale = np.trace(cov, axis1=-2, axis2=-1)[..., None, None] / t
    scale = np.where(scale > 0, scale, 1.0)
    eye = np.eye(t)
    try:
        factor = np.linalg.cholesky(cov + jitter * scale * eye)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(cov)
        factor = v * np.sqrt(np.clip(w, 0, None))[..., None, :]
    z = rng.standard_normal(cov.shape[:-2] + (t, size))
    return factor @ z


def compose(bank: np.ndarray, picks: np.ndarray, n_kernels: np.ndarray, plus: np.ndarray) -> np.ndarray:
    """Batched `kernel_matrix`: row i combines bank[picks[i, 0]], ..., bank[picks[i, n_kernels[i] - 1]] left to
    right, the j-th (j >= 1) joined by "+" where plus[i, j] else "*". bank (K, T, T) -> (rows, T, T)."""
    cov = bank[picks[:, 0]]  # a copy
    for j in range(1, picks.shape[1]):
        active = n_kernels > j
        add, mul = np.nonzero(active & plus[:, j])[0], np.nonzero(active & ~plus[:, j])[0]
        cov[add] += bank[picks[add, j]]
        cov[mul] *= bank[picks[mul, j]]
    return cov


def kernelsynth(n: int, rng: np.random.Generator, time: np.ndarray) -> np.ndarray:
    """The kernelsynth component: (n, T, 2) non-negative (see the module docstring)."""
    steps = len(time)
    x = np.arange(-GP_MAX_LAG, steps) / steps
    bank = np.stack([kernel(name, x, **params) for name, params in KERNEL_BANK])
    n_kernels = rng.integers(1, MAX_KERNELS + 1, n)
    picks = rng.integers(0, len(KERNEL_BANK), (n, MAX_KERNELS))
    plus = rng.random((n, MAX_KERNELS)) < 0.5
    rho = rng.uniform(0.0, 1.0, n)
    lag = rng.integers(0, GP_MAX_LAG, n)
    transform = rng.choice(3, size=n, p=[0.45, 0.3, 0.25])  # identity, negated, differenced
    out = np.empty((n, steps, 2))
    for start in range(0, n, GP_CHUNK):
        rows = slice(start, min(n, start + GP_CHUNK))
        cov = compose(bank, picks[rows], n_kernels[rows], plus[rows])
        draws = sample_gp(cov, 2, rng)  # (chunk, GP_MAX_LAG + steps, 2)
        out[rows] = _correlated_channels(draws, rho[rows], lag[rows], transform[rows], steps)
    return _finish_signed(out, rng)


def _standardise(rows: np.ndarray) -> np.ndarray:
    std = rows.std(axis=1, keepdims=True)
    return (rows - rows.mean(axis=1, keepdims=True)) / np.where(std > 1e-12, std, 1.0)


def _correlated_channels(draws, rho, lag, transform, steps):
    """Channel 1 = draw 1 on the last `steps` points; channel 2 = rho * h(draw 1 `lag` steps earlier) +
    sqrt(1 - rho^2) * draw 2, h the identity, negation or first difference, both terms standardised."""
    first = draws[..., 0]
    index = GP_MAX_LAG - lag[:, None] + np.arange(steps)[None, :]
    lagged = np.take_along_axis(first, index, axis=1)
    diff = lagged - np.take_along_axis(first, index - 1, axis=1)
    h = np.where((transform == 0)[:, None], lagged, np.where((transform == 1)[:, None], -lagged, diff))
    second = _standardise(h) * rho[:, None] + _standardise(draws[:, GP_MAX_LAG:, 1]) * np.sqrt(1 - rho ** 2)[:, None]
    return np.stack([first[:, GP_MAX_LAG:], second], axis=-1)


# ---- AR(p) -----------------------------------------------------------------------------------------------------

def ar_coefficients(n: int, rng: np.random.Generator, max_order: int = 3) -> np.ndarray:
    """(n, 3) stationary AR coefficients phi (x_t = sum_i phi_i x_{t-i} + e_t), order 1..max_order (unused ones 0):
    from reciprocal roots inside the unit circle, real (-0.9..0.98) or, for order >= 2 with probability 1/2, a
    complex pair (modulus 0.6..0.98, a quasi-period of 3-50 steps) first."""
    order = rng.integers(1, max_order + 1, n)
    roots = rng.uniform(-0.9, 0.98, (n, 3)).astype(complex)
    pair = (rng.random(n) < 0.5) & (order >= 2)
    modulus, angle = rng.uniform(0.6, 0.98, n), 2 * np.pi / _loguniform(rng, 3.0, 50.0, n)
    roots[pair, 0] = modulus[pair] * np.exp(1j * angle[pair])
    roots[pair, 1] = np.conj(roots[pair, 0])
    roots[np.arange(3)[None, :] >= order[:, None]] = 0
    r1, r2, r3 = roots.T
    # (1 - r1 B)(1 - r2 B)(1 - r3 B) = 1 - phi1 B - phi2 B^2 - phi3 B^3
    return np.stack([r1 + r2 + r3, -(r1 * r2 + r1 * r3 + r2 * r3), r1 * r2 * r3], axis=1).real


def sample_ar(phi: np.ndarray, steps: int, rng: np.random.Generator, burn_in: int = 100,
              drive: np.ndarray | None = None) -> np.ndarray:
    """(n, p) coefficients -> (n, steps) AR series with unit Gaussian innovations, after `burn_in` steps from 0.
    `drive` (n, burn_in + steps), if given, is added at each step (an exogenous input)."""
    phi = np.atleast_2d(np.asarray(phi, dtype=np.float64))
    n, p = phi.shape
    total = burn_in + steps
    noise = rng.standard_normal((n, total))
    if drive is not None:
        noise = noise + drive
    x = np.zeros((n, total + p))
    for t in range(total):
        x[:, p + t] = np.einsum("ni,ni->n", phi, x[:, t:p + t][:, ::-1]) + noise[:, t]
    return x[:, p + burn_in:]


def ar(n: int, rng: np.random.Generator, time: np.ndarray) -> np.ndarray:
    """The ar component: (n, T, 2) non-negative. Channel 2 = its own AR(p) driven by kappa x channel 1 `lag` (0-5)
    steps earlier (kappa 0 for 30 %, else -1..1)."""
    steps, burn_in = len(time), 100
    phi1, phi2 = ar_coefficients(n, rng), ar_coefficients(n, rng)
    first = sample_ar(phi1, burn_in + steps, rng, burn_in=0)  # the burn-in kept: it is channel 2's drive
    kappa = np.where(rng.random(n) < 0.3, 0.0, rng.uniform(-1, 1, n))
    lag = rng.integers(0, 6, n)
    index = np.clip(np.arange(burn_in + steps)[None, :] - lag[:, None], 0, None)
    drive = kappa[:, None] * np.take_along_axis(first, index, axis=1)
    second = sample_ar(phi2, steps, rng, burn_in=burn_in, drive=drive)
    return _finish_signed(np.stack([first[:, burn_in:], second], axis=-1), rng)


# ---- sums of sinusoids -----------------------------------------------------------------------------------------

def sines(n: int, rng: np.random.Generator, time: np.ndarray) -> np.ndarray:
    """The sines component: (n, T, 2) non-negative (see the module docstring)."""
    steps, k_max = len(time), 4
    s = np.arange(steps)[None, None, :]  # time in steps
    u = np.arange(steps)[None, :] / (steps - 1)  # 0..1
    n_sines = rng.integers(1, k_max + 1, n)
    used = (np.arange(k_max)[None, :] < n_sines[:, None])[..., None]
    period = _loguniform(rng, 4.0, 300.0, (n, k_max))[..., None]
    channels = []
    shared = rng.random(n) < 0.7
    amp1, phase1 = _loguniform(rng, 0.1, 1.0, (n, k_max, 1)), rng.uniform(0, 2 * np.pi, (n, k_max, 1))
    for c in range(2):
        if c == 0:
            amp, phase = amp1, phase1
        else:  # shared periods: other amplitudes and phases; else channel 2's own periods too
            own_period = _loguniform(rng, 4.0, 300.0, (n, k_max))[..., None]
            period = np.where(shared[:, None, None], period, own_period)
            amp = _loguniform(rng, 0.1, 1.0, (n, k_max, 1)) * np.where(shared[:, None, None], amp1, 1.0)
            phase = rng.uniform(0, 2 * np.pi, (n, k_max, 1))
        wave = (used * amp * np.sin(2 * np.pi * s / period + phase)).sum(axis=1)
        size = (used * amp).sum(axis=1)[:, 0]  # the sinusoids' total amplitude
        envelope = np.where(rng.random(n) < 0.3, rng.uniform(-1.5, 1.5, n), 0.0)
        wave = wave * np.exp(envelope[:, None] * u)
        kind = rng.choice(3, size=n, p=[0.3, 0.4, 0.3])  # no trend, linear, exponential
        rise = rng.uniform(-2, 2, n) * size
        rate = rng.choice([-1.0, 1.0], n) * rng.uniform(1, 4, n)
        curve = np.expm1(rate[:, None] * u) / np.expm1(rate)[:, None]
        trend = rise[:, None] * np.where((kind == 1)[:, None], u, np.where((kind == 2)[:, None], curve, 0.0))
        noise = rng.uniform(0, 0.3, n)[:, None] * size[:, None] * rng.standard_normal((n, steps))
        channels.append(wave + trend + noise)
    return _finish_signed(np.stack(channels, axis=-1), rng)


# ---- ODE systems -----------------------------------------------------------------------------------------------

def _period_steps(rng, n, low=4.0, high=200.0):
    return _loguniform(rng, low, high, n)


def oscillator(n, rng, time):
    """x'' + 2 zeta w x' + w^2 x = F cos(W t + phi): damped (zeta 0-0.3) and, half the time, driven (F 0.2-1 w^2,
    W 0.3-3 w). Channels x and x'/w. Signed."""
    dt = time[1] - time[0]
    w = 2 * np.pi / (_period_steps(rng, n) * dt)
    zeta = rng.uniform(0, 0.3, n)
    force = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0.2, 1.0, n)) * w ** 2
    drive_w, drive_phase = w * _loguniform(rng, 0.3, 3.0, n), rng.uniform(0, 2 * np.pi, n)
    state = np.stack([rng.standard_normal(n), rng.standard_normal(n) * w, np.full(n, time[0])], axis=-1)

    def rhs(s):
        x, v, t = s[..., 0], s[..., 1], s[..., 2]
        a = -2 * zeta * w * v - w ** 2 * x + force * np.cos(drive_w * t + drive_phase)
        return np.stack([v, a, np.ones_like(t)], axis=-1)

    out = rk4(rhs, state, time, ODE_SUBSTEPS)
    return np.stack([out[..., 0], out[..., 1] / w[:, None]], axis=-1)


def van_der_pol(n, rng, time):
    """Lienard form x' = mu (x - x^3/3 - y), y' = x / mu (mu 0.2-4), time scaled to a 4-200-step period. Signed."""
    dt = time[1] - time[0]
    mu = rng.uniform(0.2, 4.0, n)
    natural = np.sqrt((2 * np.pi) ** 2 + (1.614 * mu + 1.0) ** 2)  # ~ the limit cycle's period in natural time
    speed = natural / (_period_steps(rng, n) * dt)
    state = rng.uniform(-2, 2, (n, 2))

    def rhs(s):
        x, y = s[..., 0], s[..., 1]
        return speed[:, None] * np.stack([mu * (x - x ** 3 / 3 - y), x / mu], axis=-1)

    return rk4(rhs, state, time, ODE_SUBSTEPS)


def fitzhugh_nagumo(n, rng, time):
    """v' = v - v^3/3 - w + I, w' = eps (v + 0.7 - 0.8 w) (eps 0.03-0.3, I 0.3-1.2: spiking, or settling to rest
    near the edges), time scaled to a 4-200-step period. Channels v and w. Signed."""
    dt = time[1] - time[0]
    eps, current = _loguniform(rng, 0.03, 0.3, n), rng.uniform(0.3, 1.2, n)
    speed = (3.0 / eps) / (_period_steps(rng, n) * dt)
    state = np.stack([rng.uniform(-2, 2, n), rng.uniform(-0.5, 1.5, n)], axis=-1)

    def rhs(s):
        v, w = s[..., 0], s[..., 1]
        return speed[:, None] * np.stack([v - v ** 3 / 3 - w + current, eps * (v + 0.7 - 0.8 * w)], axis=-1)

    return rk4(rhs, state, time, ODE_SUBSTEPS)


def sir(n, rng, time):
    """S' = -beta S I + xi (1 - S - I), I' = beta S I - gamma I, fractions of a population: infectious period 1-20
    steps, R0 1.3-6, waning immunity xi (SIRS: damped epidemic waves) half the time. Channels S and I (I integrated
    as log I). Non-negative."""
    dt = time[1] - time[0]
    gamma = 1.0 / (_loguniform(rng, 1.0, 20.0, n) * dt)
    beta = gamma * rng.uniform(1.3, 6.0, n)
    xi = np.where(rng.random(n) < 0.5, 0.0, gamma * _loguniform(rng, 0.01, 0.3, n))
    infected = _loguniform(rng, 1e-3, 0.05, n)
    state = np.stack([rng.uniform(0.5, 1.0, n) * (1 - infected), np.log(infected)], axis=-1)

    def rhs(s):
        sus, i = s[..., 0], np.exp(s[..., 1])
        return np.stack([-beta * sus * i + xi * (1 - sus - i), beta * sus - gamma], axis=-1)

    out = rk4(rhs, state, time, ODE_SUBSTEPS)
    return np.stack([np.maximum(out[..., 0], 0.0), np.exp(out[..., 1])], axis=-1)


def brusselator(n, rng, time):
    """x' = A + x^2 y - (B + 1) x, y' = B x - x^2 y (A 0.5-2, B 0.7-1.8 x the Hopf point 1 + A^2: spirals in or a
    limit cycle), time scaled to a 4-200-step period near the Hopf point. Non-negative (clipped at 0)."""
    dt = time[1] - time[0]
    a = rng.uniform(0.5, 2.0, n)
    b = (1 + a ** 2) * rng.uniform(0.7, 1.8, n)
    speed = (2 * np.pi / a) / (_period_steps(rng, n) * dt)
    state = np.stack([a * rng.uniform(0.5, 1.5, n), b / a * rng.uniform(0.5, 1.5, n)], axis=-1)

    def rhs(s):
        x, y = s[..., 0], s[..., 1]
        return speed[:, None] * np.stack([a + x * x * y - (b + 1) * x, b * x - x * x * y], axis=-1)

    return np.maximum(rk4(rhs, state, time, ODE_SUBSTEPS), 0.0)


ODE_FUNCTIONS = {"oscillator": oscillator, "van_der_pol": van_der_pol, "fitzhugh_nagumo": fitzhugh_nagumo,
                 "sir": sir, "brusselator": brusselator}
SIGNED_ODES = ("oscillator", "van_der_pol", "fitzhugh_nagumo")


def _observation_noise(x, rng):
    """Multiplicative noise exp(sigma e), sigma 0-2 % for half the trajectories: stays >= 0."""
    n = x.shape[0]
    return observe(x, np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0, 0.02, n)), rng)


def ode(n: int, rng: np.random.Generator, time: np.ndarray) -> np.ndarray:
    """The ode component: ODE_SYSTEMS equally often (exact shares: `allocate`), in ODE_SYSTEMS order."""
    counts = largest_remainder(n, [1 / len(ODE_SYSTEMS)] * len(ODE_SYSTEMS))
    parts = []
    for (system, function), count in zip(ODE_FUNCTIONS.items(), counts):
        if not count:
            continue
        x = function(count, rng, time)
        x = _finish_signed(x, rng) if system in SIGNED_ODES else scale_levels(headroom(x), rng)
        parts.append(_observation_noise(x, rng))
    return np.concatenate(parts)


# ---- classic Lotka-Volterra, broad prior -----------------------------------------------------------------------

LV_TYPICAL = (1.5, 0.6)  # the users' typical prey and predator equilibria (data.lotka_volterra: "lv" prior)
LV_PERIOD_STEPS = (4.0, 300.0)  # the classic system's near-equilibrium period, log-uniform


def lotka_volterra(n: int, rng: np.random.Generator, time: np.ndarray) -> np.ndarray:
    """The lv component (see the module docstring): x = X* e^u, y = Y* e^v with u' = a (1 - e^v), v' = c (e^u - 1);
    near-equilibrium period 2 pi / sqrt(a c) of 4-300 steps (log-uniform: the users' 15-32 is one sixth of it),
    a/c 1/4-4, (u, v) starting uniformly in [-1.2, 1.2]^2, X*, Y* = the users' typical levels x 0.05-20
    (log-uniform)."""
    dt = time[1] - time[0]
    period = _loguniform(rng, LV_PERIOD_STEPS[0], LV_PERIOD_STEPS[1], n) * dt
    ratio = _loguniform(rng, 0.25, 4.0, n)
    a = 2 * np.pi / period * np.sqrt(ratio)
    c = 2 * np.pi / period / np.sqrt(ratio)
    state = rng.uniform(-1.2, 1.2, (n, 2))
    level = np.array(LV_TYPICAL)[None, :] * _loguniform(rng, 0.05, 20.0, (n, 2))

    def rhs(s):
        u, v = s[..., 0], s[..., 1]
        return np.stack([a * (1 - np.exp(v)), c * (np.exp(u) - 1)], axis=-1)

    x = np.exp(rk4(rhs, state, time, LV_SUBSTEPS)) * level[:, None, :]
    lifted = headroom(x)
    x = lifted * (x.max(axis=1, keepdims=True) / lifted.max(axis=1, keepdims=True))  # keep the drawn scale
    return _observation_noise(x, rng)


# ---- predator-prey (Rosenzweig-MacArthur) over a broad prior --------------------------------------------------

# The equations of data.lotka_volterra (logistic prey, Holling type II predator), every quantity drawn over a range
# wider than the users' calibrated "varied" prior (alpha, gamma 0.1-0.3, beta 0.2-0.5, efficiency 0.3-0.7,
# handling 0-0.25, K 3-16, start 0.8-1.2, noise 0-1 %), which sits inside it: the users' dynamics are a corner of
# this family, not its centre. Log-uniform for the positive quantities, uniform for handling and noise.
PREDPREY_LOG_RANGES = {"alpha": (0.05, 0.8), "gamma": (0.05, 0.8), "beta": (0.1, 1.5), "efficiency": (0.2, 1.0),
                       "capacity": (3.0, 40.0), "x0": (0.2, 3.0), "y0": (0.2, 3.0)}
PREDPREY_RANGES = {"handling": (0.0, 0.4), "noise": (0.0, 0.03)}


def predprey_prior_text() -> str:
    """The predprey ranges in words, from PREDPREY_*RANGES (what a README says about them cannot go stale)."""
    r = {**PREDPREY_LOG_RANGES, **PREDPREY_RANGES}

    def span(key, scale=1.0):
        return f"{r[key][0] * scale:g}-{r[key][1] * scale:g}"

    rates = span("alpha") if r["alpha"] == r["gamma"] else f"{span('alpha')} (prey) and {span('gamma')} (predator)"
    starts = span("x0") if r["x0"] == r["y0"] else f"{span('x0')} (prey) and {span('y0')} (predator)"
    return (f"rates {rates}, attack {span('beta')}, efficiency {span('efficiency')}, carrying capacity "
            f"{span('capacity')}, handling {span('handling')}, starts {starts}, noise {span('noise', 100)} %")


def predator_prey(n: int, rng: np.random.Generator, time: np.ndarray) -> np.ndarray:
    """The predprey component (see the module docstring of data.synthetic and PREDPREY_*RANGES)."""
    draw = {k: _loguniform(rng, low, high, n) for k, (low, high) in PREDPREY_LOG_RANGES.items()}
    draw.update({k: rng.uniform(low, high, n) for k, (low, high) in PREDPREY_RANGES.items()})

    def rhs(s):
        return lv_rhs(s, draw["alpha"], draw["beta"], draw["gamma"], draw["efficiency"] * draw["beta"],
                      1.0 / draw["capacity"], draw["handling"])

    x = np.clip(rk4(rhs, np.stack([draw["x0"], draw["y0"]], axis=-1), time, LV_SUBSTEPS), 0.0, None)
    x = headroom(x)
    return observe(x, draw["noise"], rng)


GENERATORS = {"kernelsynth": kernelsynth, "ar": ar, "sines": sines, "ode": ode, "lv": lotka_volterra,
              "predprey": predator_prey}
