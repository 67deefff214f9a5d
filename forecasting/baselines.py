"""Baselines under the model's protocol: they see the context only, and are scored on the same horizon.

- persistence: the last context value, repeated over the horizon.
- seasonal_naive: the context's last period, repeated over the horizon; the period (in steps) is estimated from
  the context's autocorrelation (`estimate_period`). A context without a clear oscillation gets persistence.
- Lotka-Volterra fit: two models fitted to the context by least squares, then integrated over the horizon on the
  data's time grid: classic LV (alpha, beta, gamma, delta and the initial state (x0, y0)), and LV with logistic prey
  growth (also inv_capacity = 1/K: orbits that spiral in, i.e. damped oscillations). Each trajectory keeps the
  model that fits its context better. Levenberg-Marquardt on the logs of the values (so they stay positive), with
  the Jacobian by forward differences through the RK4 integrator (one plain batched integration of every row and
  its seven nudged copies: many times faster on CPU than forward-mode autograd, whose per-operation overhead
  dominates these small tensors), every restart of both models for every trajectory one row of a single batch. The
  forecast's integration is bounded (the state is clipped to [0,
  FALLBACK_FACTOR x the context's largest value] where the derivatives are evaluated, so nothing overflows), and a
  forecast that still leaves that range is unstable: it is replaced by persistence and counted (`LVFit.fallback`).
  (The untrained-model baseline is the model forecaster run with the base model: see evaluate.py.)

Equations (as in data.lotka_volterra, without its saturating predation): dx/dt = alpha*x*(1 - inv_capacity*x) -
beta*x*y (prey), dy/dt = delta*x*y - gamma*y (predator); classic LV has inv_capacity = 0.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from data.lotka_volterra import lv_rhs, rk4

PARAM_NAMES = ("alpha", "beta", "gamma", "delta")
VARIANTS = ("classic", "logistic")
# RK4 steps between two observation times. The data's grid has 200/99 ~ 2 time units between samples and its
# rates are ~0.1-0.3: h ~ 1 keeps RK4's local error near (rate*h)^5/120 < 2e-5 of the values, far below any fit or
# forecast error (the simulated and the coursework test splits' LV-fit errors agree with h ~ 0.5 to 4 digits).
DEFAULT_SUBSTEPS = 2
# Start values of alpha and gamma (the prey's growth and the predator's death rate) tried by the restarts.
RESTART_RATES = (0.03, 0.1, 0.3, 1.0)
PATIENCE = 3  # Levenberg-Marquardt iterations without progress before the fit stops
# After PRUNE_AFTER iterations only the KEEP best restarts of each model and trajectory go on: the others are far
# behind by then and rarely win, and dropping them makes the remaining iterations several times cheaper.
PRUNE_AFTER, KEEP = 5, 3
# Step of the forward differences, in log space (a relative change of the value): float64 keeps the rounding
# error of a difference quotient near 1e-16 / 1e-6, far below what Levenberg-Marquardt needs.
JACOBIAN_STEP = 1e-6
# A forecast above this multiple of its species' largest context value is unstable (a fitted orbit that runs away
# rather than one the context supports) and falls back to persistence.
FALLBACK_FACTOR = 10.0


def single_threaded(function):
    """Run `function` with one torch thread. The LV fit is thousands of elementwise operations on tensors of a few
    thousand elements: splitting each across threads only adds synchronisation, which on a busy machine costs far
    more than the work (the fit of the coursework test split: 2.4 s on one thread, 155 s on two shared cores)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def persistence(context: np.ndarray, horizon: int) -> np.ndarray:
    """(T, V) context -> (horizon, V) copies of its last step."""
    return np.repeat(np.asarray(context, float)[-1:], horizon, axis=0)


def estimate_period(context: np.ndarray, min_period: int = 2) -> int | None:
    """The oscillation period of a (T, V) context in steps, or None when it shows none.

    The autocorrelation of the context (each variable centred and divided by its standard deviation, the
    variables' products summed; the biased estimator, so longer lags weigh less) is followed past its first
    negative value; the lag of its highest value after that, up to T - 2 (at least two steps seen twice), is the
    period. A context whose autocorrelation never turns negative (a trend, a constant, an oscillation longer than
    the context) has no period."""
    context = np.asarray(context, float)
    context = context[:, None] if context.ndim == 1 else context
    steps = len(context)
    spread = context.std(axis=0)
    if steps < 2 * min_period or not (spread > 0).any():
        return None
    centred = (context[:, spread > 0] - context[:, spread > 0].mean(axis=0)) / spread[spread > 0]
    acf = np.array([(centred[lag:] * centred[:steps - lag]).sum() / steps for lag in range(steps - 1)])
    negative = np.flatnonzero(acf < 0)
    if not len(negative):
        return None
    first = max(int(negative[0]), min_period)
    if first > steps - 2:
        return None
    period = first + int(np.argmax(acf[first:steps - 1]))
    return period if acf[period] > 0 else None


def seasonal_naive(context: np.ndarray, horizon: int, period: int | None = None) -> np.ndarray:
    """(T, V) context -> (horizon, V): its last `period` steps repeated (`period` None: `estimate_period`; no
    period found: persistence, i.e. a period of 1)."""
    context = np.asarray(context, float)
    period = estimate_period(context) if period is None else period
    period = period or 1
    if not 1 <= period <= len(context):
        raise ValueError(f"seasonal_naive: period {period} must be between 1 and the context's {len(context)} steps")
    return context[len(context) - period + np.arange(horizon) % period]


def lotka_volterra_path(params: torch.Tensor, state0: torch.Tensor, times, substeps: int = DEFAULT_SUBSTEPS,
                        bound: torch.Tensor | None = None) -> torch.Tensor:
    """params (B, 4) = alpha, beta, gamma, delta, or (B, 5) with inv_capacity last; state0 (B, 2) at times[0];
    times (T,) -> (B, T, 2). `bound` (B, 2): the derivatives are evaluated at the state clipped to [0, bound], so
    the integration cannot overflow. Differentiable (also under torch.func transforms)."""
    alpha, beta, gamma, delta = params[..., :4].unbind(-1)
    inv_capacity = params[..., 4] if params.shape[-1] == 5 else None
    times = [float(t) for t in times]  # plain floats: step sizes must not be numpy scalars multiplying tensors
    if bound is None:
        rhs = lambda s: lv_rhs(s, alpha, beta, gamma, delta, inv_capacity)
    else:
        rhs = lambda s: lv_rhs(s.clamp(min=0).minimum(bound), alpha, beta, gamma, delta, inv_capacity)
    return rk4(rhs, state0, times, substeps)


def gradient_matching_guess(contexts: np.ndarray, times: np.ndarray, logistic: bool = False) -> np.ndarray:
    """(N, 6) rough (alpha, beta, gamma, delta, x0, y0) per context — (N, 7) with inv_capacity last when
    `logistic` — by linear least squares on the log-derivatives: d(ln x)/dt = alpha - beta*y (logistic: minus
    alpha*inv_capacity*x) and d(ln y)/dt = delta*x - gamma, derivatives by finite differences at midpoints.
    Values that come out non-positive (noise, too short a context) are replaced by small positive ones."""
    contexts = np.maximum(np.asarray(contexts, float), 1e-9)
    dt = np.diff(np.asarray(times, float))
    dlog = np.diff(np.log(contexts), axis=1) / dt[None, :, None]  # (N, T-1, 2)
    mid = 0.5 * (contexts[:, 1:] + contexts[:, :-1])
    guesses = []
    for n in range(len(contexts)):
        ones = np.ones(len(dt))
        prey_features = [ones, mid[n, :, 1]] + ([mid[n, :, 0]] if logistic else [])
        prey, *_ = np.linalg.lstsq(np.stack(prey_features, 1), dlog[n, :, 0], rcond=None)
        (delta, minus_gamma), *_ = np.linalg.lstsq(np.stack([mid[n, :, 0], ones], 1), dlog[n, :, 1], rcond=None)
        alpha = max(prey[0], 1e-3)
        crowding = [-prey[2] / alpha] if logistic else []
        guesses.append([alpha, -prey[1], -minus_gamma, delta, *contexts[n, 0], *crowding])
    return np.maximum(np.array(guesses), 1e-3)


def initial_guesses(contexts: np.ndarray, times: np.ndarray, rates=RESTART_RATES) -> np.ndarray:
    """(N, R, 7) log starting points per context, classic and logistic alike: the gradient-matching guess, then a
    grid of (alpha, gamma) with beta and delta set so the equilibrium (gamma/delta, alpha/beta) is the context's mean
    (an LV orbit's time average is its equilibrium); the initial state is the first context value. The seventh
    value, inv_capacity, is used by the logistic rows only: its own gradient-matching guess, else a carrying
    capacity of three times the largest prey value (the coursework data's is 2-4 times)."""
    mean = contexts.mean(axis=1)
    n = len(contexts)
    crowding = 1.0 / (3.0 * np.maximum(contexts[:, :, 0].max(axis=1), 1e-9))
    logistic_guess = gradient_matching_guess(contexts, times, logistic=True)
    starts = [logistic_guess]
    for a, g in itertools.product(rates, rates):
        starts.append(np.stack([np.full(n, a), a / mean[:, 1], np.full(n, g), g / mean[:, 0],
                                contexts[:, 0, 0], contexts[:, 0, 1], crowding], axis=1))
    return np.log(np.maximum(np.stack(starts, axis=1), 1e-6))


@dataclass
class LVFit:
    params: np.ndarray  # (N, 4) alpha, beta, gamma, delta
    state0: np.ndarray  # (N, 2) prey, predator at the first context time
    inv_capacity: np.ndarray  # (N,) 1/K of the logistic model; 0 where the classic model won
    loss: np.ndarray  # (N,) mean squared error over the context, each species divided by its context maximum
    iterations: int  # Levenberg-Marquardt iterations run
    logistic: np.ndarray | None = None  # (N,) bool: the logistic model fitted the context better
    fallback: np.ndarray | None = None  # (N,) bool: the forecast was unstable and is persistence (set by forecast)

    @property
    def variant(self) -> list[str]:
        return [VARIANTS[int(flag)] for flag in self.logistic]


@single_threaded
def fit_lotka_volterra(contexts: np.ndarray, times: np.ndarray, *, substeps: int = DEFAULT_SUBSTEPS,
                       iterations: int = 40, variants=VARIANTS) -> LVFit:
    """Least-squares fit of each (T, 2) context observed at `times` (T,) by the classic and/or logistic LV model,
    from several starts each (see `initial_guesses`); the best row of each trajectory wins, whichever model it
    belongs to. Errors are divided by each species' largest context value so prey and predator count alike whatever
    their magnitudes."""
    contexts = np.asarray(contexts, float)
    times = np.asarray(times, float)
    if contexts.ndim != 3 or contexts.shape[2] != 2 or contexts.shape[1] != len(times) or len(times) < 2:
        raise ValueError(f"fit_lotka_volterra needs contexts (N, T, 2) with T = len(times) >= 2, got contexts "
                         f"{contexts.shape} and {len(times)} times")
    if not variants or any(v not in VARIANTS for v in variants):
        raise ValueError(f"fit_lotka_volterra: variants must be among {', '.join(VARIANTS)}, got {list(variants)}")
    n = len(contexts)
    starts = initial_guesses(contexts, times)
    starts = np.concatenate([starts] * len(variants), axis=1)  # classic rows, then logistic rows
    restarts = starts.shape[1]
    logistic = torch.tensor(np.repeat([[v == "logistic" for v in variants]], restarts // len(variants), axis=0)
                            .T.reshape(-1).tolist() * n, dtype=torch.float64)  # (B,) 1.0 on logistic rows
    target = torch.tensor(np.repeat(contexts, restarts, axis=0))  # row r*restarts + k: trajectory r, start k
    scale = target.abs().amax(dim=1, keepdim=True).clamp(min=1e-9)

    def residuals(log_theta, repeat=1):  # (repeat*B, 7) -> (repeat*B, 2T), row k*B + b against target b; an
        # integration that blew up becomes a large, finite residual
        values = log_theta.exp()
        params = torch.cat([values[:, :4], (values[:, 6] * logistic.repeat(repeat))[:, None]], dim=1)
        path = lotka_volterra_path(params, values[:, 4:6], times, substeps)
        r = ((path - target.repeat(repeat, 1, 1)) / scale.repeat(repeat, 1, 1)).flatten(1)
        return torch.nan_to_num(r, nan=1e3, posinf=1e3, neginf=-1e3).clamp(-1e3, 1e3)

    dims = starts.shape[2]
    nudges = torch.cat([torch.zeros(1, dims), JACOBIAN_STEP * torch.eye(dims)]).double()  # (1 + dims, dims)
    # Classic rows do not depend on inv_capacity: their seventh direction gets a unit diagonal (a zero step).
    unused = torch.diag_embed(torch.stack([torch.zeros_like(logistic)] * (dims - 1) + [1 - logistic], dim=1))

    def residuals_and_jacobian(log_theta):
        # Each row's residuals depend on its own values only: integrate every row and its copies nudged along each
        # coordinate in one batch (copies of the targets alongside), and difference them: the (B, 2T, 7) Jacobian.
        nudged = (log_theta[None] + nudges[:, None, :]).reshape(-1, dims)
        r_all = residuals(nudged, repeat=len(nudges)).view(len(nudges), len(log_theta), -1)
        return r_all[0], ((r_all[1:] - r_all[0]) / JACOBIAN_STEP).permute(1, 2, 0)

    log_theta = torch.tensor(starts.reshape(n * restarts, dims))
    damping = torch.full((len(log_theta),), 1e-2, dtype=torch.float64)
    r, jacobian = residuals_and_jacobian(log_theta)
    loss = (r ** 2).sum(1)
    best_losses = [loss.view(n, restarts).min(dim=1).values]
    iteration = 0
    for iteration in range(1, iterations + 1):
        jtj = jacobian.transpose(1, 2) @ jacobian
        jtr = (jacobian.transpose(1, 2) @ r[..., None]).squeeze(-1)
        # Marquardt's scaling: damp each direction in proportion to its curvature (the values differ in scale).
        system = jtj + damping[:, None, None] * torch.diag_embed(jtj.diagonal(dim1=1, dim2=2) + 1e-12) + unused
        step = torch.linalg.solve(system, -jtr).nan_to_num(0.0).clamp(-2, 2)  # at most a factor e^2 per step
        r_new, jacobian_new = residuals_and_jacobian(log_theta + step)
        loss_new = (r_new ** 2).sum(1)
        better = loss_new < loss
        log_theta = torch.where(better[:, None], log_theta + step, log_theta)
        r = torch.where(better[:, None], r_new, r)
        jacobian = torch.where(better[:, None, None], jacobian_new, jacobian)
        loss = torch.where(better, loss_new, loss)
        damping = torch.where(better, damping / 3, damping * 4).clamp(1e-12, 1e12)
        per_model = restarts // len(variants)
        if iteration == PRUNE_AFTER and per_model > KEEP:
            best_rows = loss.view(n, len(variants), per_model).topk(KEEP, dim=2, largest=False).indices
            keep = (torch.arange(n * len(variants)).view(n, len(variants), 1) * per_model + best_rows).reshape(-1)
            log_theta, r, jacobian, loss, damping, logistic, target, scale, unused = (
                t[keep] for t in (log_theta, r, jacobian, loss, damping, logistic, target, scale, unused))
            restarts = len(variants) * KEEP
        # Stop once no trajectory's best fit has improved by more than 1e-6 (relative) over the last PATIENCE
        # iterations: restarts that are still wandering far from it are not going to win.
        best_losses.append(loss.view(n, restarts).min(dim=1).values)
        if len(best_losses) > PATIENCE:
            then, now = best_losses[-1 - PATIENCE], best_losses[-1]
            if bool((then - now <= 1e-6 * then).all()):
                break
    best = loss.view(n, restarts).argmin(dim=1)
    rows = torch.arange(n) * restarts + best
    values = log_theta[rows].exp().numpy()
    chosen_logistic = logistic[rows].numpy() > 0
    return LVFit(params=values[:, :4], state0=values[:, 4:6], inv_capacity=np.where(chosen_logistic, values[:, 6], 0.0),
                 loss=(loss[rows] / r.shape[1]).numpy(), iterations=iteration, logistic=chosen_logistic)


@single_threaded
def lotka_volterra_forecast(contexts: np.ndarray, times: np.ndarray, horizon: int, *,
                            substeps: int = DEFAULT_SUBSTEPS, iterations: int = 40,
                            variants=VARIANTS) -> tuple[np.ndarray, LVFit]:
    """(N, T, 2) contexts observed at times[:T] -> ((N, horizon, 2) forecasts at times[T:T+horizon], the fit).

    The fitted model is integrated from the context's start through the horizon, bounded (see the module
    docstring). A forecast that leaves [0, FALLBACK_FACTOR x its species' largest context value] anyway — the
    fitted orbit runs away, which data from another model (e.g. a saturating predator) can cause — is replaced by
    persistence; `fit.fallback` marks those trajectories. Every forecast is therefore finite."""
    contexts = np.asarray(contexts, float)
    n_context = contexts.shape[1]
    times = np.asarray(times, float)
    if len(times) < n_context + horizon:
        raise ValueError(f"the time grid has {len(times)} points; a context of {n_context} and a horizon of "
                         f"{horizon} need {n_context + horizon}")
    fit = fit_lotka_volterra(contexts, times[:n_context], substeps=substeps, iterations=iterations,
                             variants=variants)
    limit = FALLBACK_FACTOR * contexts.max(axis=1)  # (N, 2)
    with torch.no_grad():
        params = torch.tensor(np.concatenate([fit.params, fit.inv_capacity[:, None]], axis=1))
        path = lotka_volterra_path(params, torch.tensor(fit.state0), times[:n_context + horizon], substeps,
                                   bound=torch.tensor(limit))
    forecasts = path[:, n_context:].numpy()
    unstable = ~(np.isfinite(forecasts) & (forecasts >= 0) & (forecasts <= limit[:, None, :])).all(axis=(1, 2))
    fit.fallback = unstable
    fallback = np.stack([persistence(context, horizon) for context in contexts])
    return np.where(unstable[:, None, None], fallback, forecasts), fit
