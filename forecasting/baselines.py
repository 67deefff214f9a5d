"""Baselines under the same protocol as the model: they see the context only.

- persistence: the last context value, repeated over the horizon.
- Lotka-Volterra fit: alpha, beta, gamma, delta and the initial state fitted to the context by least squares
  (autograd through an RK4 integrator, batched over trajectories, several restarts), then integrated on.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from data.lotka_volterra import lv_rhs, rk4


def persistence(context: np.ndarray, horizon: int) -> np.ndarray:
    """(T, V) context -> (horizon, V) copies of its last step."""
    return np.repeat(np.asarray(context, float)[-1:], horizon, axis=0)


def rk4_torch(params: torch.Tensor, state: torch.Tensor, times: torch.Tensor, substeps: int) -> torch.Tensor:
    """params (B, 4) = alpha, beta, gamma, delta; state (B, 2); times (T,) -> (B, T, 2), differentiable."""
    alpha, beta, gamma, delta = params.unbind(-1)
    return rk4(lambda s: lv_rhs(s, alpha, beta, gamma, delta), state, times, substeps)


def initial_guesses(contexts: np.ndarray, rates=(0.04, 0.1, 0.25, 0.6, 1.5)) -> np.ndarray:
    """(N, R, 6) log-parameter starts: alpha, gamma over a grid, beta and delta set so the equilibrium is the
    context mean (the time average of an LV orbit is its equilibrium), state = first context value."""
    mean = contexts.mean(axis=1)
    starts = []
    for a, g in itertools.product(rates, rates):
        p = np.stack([np.full(len(contexts), a), a / mean[:, 1], np.full(len(contexts), g), g / mean[:, 0],
                      contexts[:, 0, 0], contexts[:, 0, 1]], axis=1)
        starts.append(np.log(np.maximum(p, 1e-6)))
    return np.stack(starts, axis=1)


def fit_lotka_volterra(contexts: np.ndarray, times: np.ndarray, *, substeps: int = 4, iterations: int = 40
                       ) -> dict[str, np.ndarray]:
    """Least-squares LV fit of each (T, 2) context observed at `times` (T,): Levenberg-Marquardt on the log of
    (alpha, beta, gamma, delta, x0, y0), every restart of every trajectory as one batch row. Errors are divided by
    each context's largest value so prey and predator count alike. Returns parameters (N, 4), initial state (N, 2)
    and the final mean squared scaled error (N,)."""
    contexts = np.asarray(contexts, float)
    n = len(contexts)
    starts = initial_guesses(contexts)
    restarts = starts.shape[1]
    t = torch.tensor(np.asarray(times, float))
    target = torch.tensor(np.repeat(contexts, restarts, axis=0))
    scale = target.abs().amax(dim=1, keepdim=True).clamp(min=1e-6)

    def residuals(theta):  # (B, T*2); a diverged integration becomes a huge, finite residual
        path = rk4_torch(theta[:, :4].exp(), theta[:, 4:].exp(), t, substeps)
        return torch.nan_to_num(((path - target) / scale).flatten(1), nan=1e3, posinf=1e3, neginf=-1e3)

    theta = torch.tensor(starts.reshape(n * restarts, 6))
    damping = torch.full((len(theta),), 1e-2, dtype=theta.dtype)
    with torch.no_grad():
        r = residuals(theta)
        loss = (r ** 2).sum(1)
        for _ in range(iterations):
            eps = 1e-6  # central differences in float64: Jacobian accurate to ~1e-9
            jac = torch.stack([(residuals(theta + eps * e) - residuals(theta - eps * e)) / (2 * eps)
                               for e in torch.eye(6, dtype=theta.dtype)], dim=-1)  # (B, M, 6)
            jtj, jtr = jac.transpose(1, 2) @ jac, (jac.transpose(1, 2) @ r[..., None]).squeeze(-1)
            system = jtj + damping[:, None, None] * torch.diag_embed(jtj.diagonal(dim1=1, dim2=2) + 1e-9)
            step = torch.linalg.solve(system, -jtr)
            candidate = theta + step.clamp(-2, 2)
            r_new = residuals(candidate)
            loss_new = (r_new ** 2).sum(1)
            better = loss_new < loss
            theta = torch.where(better[:, None], candidate, theta)
            r = torch.where(better[:, None], r_new, r)
            loss = torch.where(better, loss_new, loss)
            damping = torch.where(better, damping / 3, damping * 4).clamp(1e-9, 1e9)
    best = loss.view(n, restarts).argmin(dim=1)
    theta = theta.view(n, restarts, 6)[torch.arange(n), best].exp().numpy()
    mse = (loss.view(n, restarts)[torch.arange(n), best] / r.shape[1]).numpy()
    return {"params": theta[:, :4], "state0": theta[:, 4:], "loss": mse}


def lotka_volterra_forecast(contexts: np.ndarray, times: np.ndarray, horizon: int, **fit_kwargs) -> tuple:
    """(N, T, 2) contexts seen at times[:T] -> ((N, horizon, 2) forecasts at times[T:T+horizon], fit)."""
    contexts = np.asarray(contexts, float)
    n_context = contexts.shape[1]
    times = np.asarray(times, float)
    if len(times) < n_context + horizon:
        raise ValueError(f"the time grid has {len(times)} points; the context and horizon need {n_context + horizon}")
    fit = fit_lotka_volterra(contexts, times[:n_context], **fit_kwargs)
    substeps = fit_kwargs.get("substeps", 4)
    with torch.no_grad():
        path = rk4_torch(torch.tensor(fit["params"]), torch.tensor(fit["state0"]),
                         torch.tensor(times[:n_context + horizon]), substeps)
    return path[:, n_context:].numpy(), fit
