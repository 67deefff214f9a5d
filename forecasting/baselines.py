"""Baselines under the model's protocol: they see the context only, and are scored on the same horizon.

- persistence: the last context value, repeated over the horizon.
- Lotka-Volterra fit: alpha, beta, gamma, delta and the initial state (x0, y0) fitted to the context by least
  squares, then integrated over the horizon on the data's time grid. Levenberg-Marquardt on the logs of the six
  values (so they stay positive), with the Jacobian from forward-mode autograd through the RK4 integrator, every
  restart of every trajectory one row of a single batch.
  (The untrained-model baseline is the model forecaster run with the base model: see evaluate.py.)

Equations (as in data.lotka_volterra): dx/dt = alpha*x - beta*x*y (prey), dy/dt = delta*x*y - gamma*y (predator).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from data.lotka_volterra import lv_rhs, rk4

PARAM_NAMES = ("alpha", "beta", "gamma", "delta")
# RK4 steps between two observation times. The data's grid has 200/99 ~ 2 time units between samples and its
# rates are ~0.1: h ~ 0.5 keeps RK4's error below 1e-5 of the values, far below any fit or forecast error.
DEFAULT_SUBSTEPS = 4
# Start values of alpha and gamma (the prey's growth and the predator's death rate) tried by the restarts.
RESTART_RATES = (0.03, 0.1, 0.3, 1.0)
PATIENCE = 3  # Levenberg-Marquardt iterations without progress before the fit stops


def persistence(context: np.ndarray, horizon: int) -> np.ndarray:
    """(T, V) context -> (horizon, V) copies of its last step."""
    return np.repeat(np.asarray(context, float)[-1:], horizon, axis=0)


def lotka_volterra_path(params: torch.Tensor, state0: torch.Tensor, times, substeps: int = DEFAULT_SUBSTEPS
                        ) -> torch.Tensor:
    """params (B, 4) = alpha, beta, gamma, delta; state0 (B, 2) at times[0]; times (T,) -> (B, T, 2).
    Differentiable (also under torch.func transforms)."""
    alpha, beta, gamma, delta = params.unbind(-1)
    times = [float(t) for t in times]  # plain floats: step sizes must not be numpy scalars multiplying tensors
    return rk4(lambda s: lv_rhs(s, alpha, beta, gamma, delta), state0, times, substeps)


def gradient_matching_guess(contexts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """(N, 6) rough (alpha, beta, gamma, delta, x0, y0) per context, by linear least squares on the log-derivatives:
    d(ln x)/dt = alpha - beta*y and d(ln y)/dt = delta*x - gamma, derivatives by finite differences at midpoints.
    Rates that come out non-positive (noise, too short a context) are replaced by small positive ones."""
    contexts = np.maximum(np.asarray(contexts, float), 1e-9)
    dt = np.diff(np.asarray(times, float))
    dlog = np.diff(np.log(contexts), axis=1) / dt[None, :, None]  # (N, T-1, 2)
    mid = 0.5 * (contexts[:, 1:] + contexts[:, :-1])
    guesses = []
    for n in range(len(contexts)):
        ones = np.ones(len(dt))
        (alpha, minus_beta), *_ = np.linalg.lstsq(np.stack([ones, mid[n, :, 1]], 1), dlog[n, :, 0], rcond=None)
        (delta, minus_gamma), *_ = np.linalg.lstsq(np.stack([mid[n, :, 0], ones], 1), dlog[n, :, 1], rcond=None)
        guesses.append([alpha, -minus_beta, -minus_gamma, delta, *contexts[n, 0]])
    return np.maximum(np.array(guesses), 1e-3)


def initial_guesses(contexts: np.ndarray, times: np.ndarray, rates=RESTART_RATES) -> np.ndarray:
    """(N, R, 6) log starting points per context: the gradient-matching guess, then a grid of (alpha, gamma) with
    beta and delta set so the equilibrium (gamma/delta, alpha/beta) is the context's mean (an LV orbit's time
    average is its equilibrium); the initial state is the first context value."""
    mean = contexts.mean(axis=1)
    n = len(contexts)
    starts = [gradient_matching_guess(contexts, times)]
    for a, g in itertools.product(rates, rates):
        starts.append(np.stack([np.full(n, a), a / mean[:, 1], np.full(n, g), g / mean[:, 0],
                                contexts[:, 0, 0], contexts[:, 0, 1]], axis=1))
    return np.log(np.maximum(np.stack(starts, axis=1), 1e-6))


@dataclass
class LVFit:
    params: np.ndarray  # (N, 4) alpha, beta, gamma, delta
    state0: np.ndarray  # (N, 2) prey, predator at the first context time
    loss: np.ndarray  # (N,) mean squared error over the context, each species divided by its context maximum
    iterations: int  # Levenberg-Marquardt iterations run


def fit_lotka_volterra(contexts: np.ndarray, times: np.ndarray, *, substeps: int = DEFAULT_SUBSTEPS,
                       iterations: int = 40) -> LVFit:
    """Least-squares LV fit of each (T, 2) context observed at `times` (T,), from several starts (see
    `initial_guesses`); the best start of each trajectory wins. Errors are divided by each species' largest context
    value so prey and predator count alike whatever their magnitudes."""
    contexts = np.asarray(contexts, float)
    times = np.asarray(times, float)
    if contexts.ndim != 3 or contexts.shape[2] != 2 or contexts.shape[1] != len(times) or len(times) < 2:
        raise ValueError(f"fit_lotka_volterra needs contexts (N, T, 2) with T = len(times) >= 2, got contexts "
                         f"{contexts.shape} and {len(times)} times")
    n = len(contexts)
    starts = initial_guesses(contexts, times)
    restarts = starts.shape[1]
    target = torch.tensor(np.repeat(contexts, restarts, axis=0))  # row r*restarts + k: trajectory r, start k
    scale = target.abs().amax(dim=1, keepdim=True).clamp(min=1e-9)

    def residuals(log_theta):  # (B, 6) -> (B, 2T); an integration that blew up becomes a large, finite residual
        path = lotka_volterra_path(log_theta[:, :4].exp(), log_theta[:, 4:].exp(), times, substeps)
        r = ((path - target) / scale).flatten(1)
        return torch.nan_to_num(r, nan=1e3, posinf=1e3, neginf=-1e3).clamp(-1e3, 1e3)

    basis = torch.eye(6, dtype=torch.float64)[:, None, :].expand(6, len(target), 6)

    def residuals_and_jacobian(log_theta):
        # Each row's residuals depend on its own six values only, so the (B, 2T, 6) Jacobian is the batch's
        # forward-mode derivative along each of the six coordinates: one jvp, vmapped over the six directions.
        r, tangents = torch.func.vmap(lambda v: torch.func.jvp(residuals, (log_theta,), (v,)))(basis)
        return r[0], tangents.permute(1, 2, 0)

    log_theta = torch.tensor(starts.reshape(n * restarts, 6))
    damping = torch.full((len(log_theta),), 1e-2, dtype=torch.float64)
    r, jacobian = residuals_and_jacobian(log_theta)
    loss = (r ** 2).sum(1)
    best_losses = [loss.view(n, restarts).min(dim=1).values]
    iteration = 0
    for iteration in range(1, iterations + 1):
        jtj = jacobian.transpose(1, 2) @ jacobian
        jtr = (jacobian.transpose(1, 2) @ r[..., None]).squeeze(-1)
        # Marquardt's scaling: damp each direction in proportion to its curvature (the six values differ in scale).
        system = jtj + damping[:, None, None] * torch.diag_embed(jtj.diagonal(dim1=1, dim2=2) + 1e-12)
        step = torch.linalg.solve(system, -jtr).nan_to_num(0.0).clamp(-2, 2)  # at most a factor e^2 per step
        r_new, jacobian_new = residuals_and_jacobian(log_theta + step)
        loss_new = (r_new ** 2).sum(1)
        better = loss_new < loss
        log_theta = torch.where(better[:, None], log_theta + step, log_theta)
        r = torch.where(better[:, None], r_new, r)
        jacobian = torch.where(better[:, None, None], jacobian_new, jacobian)
        loss = torch.where(better, loss_new, loss)
        damping = torch.where(better, damping / 3, damping * 4).clamp(1e-12, 1e12)
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
    return LVFit(params=values[:, :4], state0=values[:, 4:], loss=(loss[rows] / r.shape[1]).numpy(),
                 iterations=iteration)


def lotka_volterra_forecast(contexts: np.ndarray, times: np.ndarray, horizon: int, *,
                            substeps: int = DEFAULT_SUBSTEPS, iterations: int = 40) -> tuple[np.ndarray, LVFit]:
    """(N, T, 2) contexts observed at times[:T] -> ((N, horizon, 2) forecasts at times[T:T+horizon], the fit).

    Classic LV is what the fit assumes; data from another model (e.g. prey with a carrying capacity) can make the
    best fit's orbit grow without bound over the horizon. Values that overflow are returned as +inf, so such a
    forecast scores as the failure it is instead of vanishing from the comparison."""
    contexts = np.asarray(contexts, float)
    n_context = contexts.shape[1]
    times = np.asarray(times, float)
    if len(times) < n_context + horizon:
        raise ValueError(f"the time grid has {len(times)} points; a context of {n_context} and a horizon of "
                         f"{horizon} need {n_context + horizon}")
    fit = fit_lotka_volterra(contexts, times[:n_context], substeps=substeps, iterations=iterations)
    with torch.no_grad():
        path = lotka_volterra_path(torch.tensor(fit.params), torch.tensor(fit.state0), times[:n_context + horizon],
                                   substeps)
    forecasts = path[:, n_context:].numpy()
    return np.where(np.isfinite(forecasts), forecasts, np.inf), fit
