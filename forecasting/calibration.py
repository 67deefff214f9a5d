"""Conformal calibration of a forecast's sample bands on the validation split (forecast.py --calibrate).

The method is conformalized quantile regression (CQR: Romano, Patterson and Candès, "Conformalized Quantile
Regression", NeurIPS 2019), applied per species, per horizon step and per central band, with each trajectory's
scores divided by its context's scale (the locally weighted scores of Lei, G'Sell, Rinaldo, Tibshirani and
Wasserman, "Distribution-Free Predictive Inference for Regression", JASA 2018, section 5.2), because the
trajectories' magnitudes differ tenfold: one additive correction in original units would widen the small ones' bands
far too much and the large ones' too little.

For a central band b (0.8: the samples' 0.1 and 0.9 quantiles lo and hi) and the n validation trajectories i, with
target y_i at step h of species v and context scale s_i (the 95th percentile of |context|, the p95 scaler's level):
    E_i = max(lo_i - y_i, y_i - hi_i) / s_i        (negative inside the band, positive outside it)
    Q   = the ceil((n + 1) b)-th smallest of the E_i
and the calibrated band of a test trajectory with context scale s is [lo - Q s, hi + Q s]: wider where the samples'
band covered too little on validation (Q > 0), narrower where it covered too much (Q < 0). When the validation and
test trajectories are exchangeable (drawn alike; the split puts different trajectories in each), a test value falls
inside it with probability at least b (and below b + 1 / (n + 1)), whatever the model. When (n + 1) b > n the exact Q
is infinite: the largest E_i is used instead, and `capped` names the band (its guarantee does not hold).

The calibrated quantiles are the bands' ends at levels 0.5 -/+ b / 2 (the median is left as the samples' median);
where a narrowed band crosses a neighbour, each point's quantiles are sorted (the rearrangement of Chernozhukov,
Fernández-Val and Galichon, Econometrica 2010, which never increases the pinball loss). CRPS stays the samples'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data.llmtime import Scaler

from .metrics import variable_names
from .scores import MethodForecast, band_levels

# The central bands calibrated: those of the reported quantiles 0.1..0.9 (WQL), the 50 % and 95 % bands of the
# coverage table, and enough between them for a reliability curve.
CALIBRATION_BANDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
METHOD = ("split-conformal CQR (Romano et al. 2019) per species, horizon step and central band, scores normalized by "
          "each trajectory's context scale (Lei et al. 2018), fitted on the validation split")


def calibration_levels(bands=CALIBRATION_BANDS) -> tuple[float, ...]:
    """The quantile levels the calibrated quantiles are stored at: both ends of every band, and the median."""
    return tuple(sorted({0.5, *(level for band in bands for level in band_levels(band))}))


def context_scales(contexts: np.ndarray) -> np.ndarray:
    """(N, V): each trajectory's context scale per species, the 95th percentile of |context| (the p95 scaler's
    divisor, whatever scaler the forecast used; 1.0 for a context of zeros)."""
    return np.stack([Scaler.fit(context).scale for context in np.asarray(contexts, float)])


@dataclass
class Calibration:
    """What a validation forecast says each band needs: `corrections[b, h, v]`, Q of band `bands[b]` at horizon step
    h of species v, in units of the context scale."""
    bands: tuple[float, ...]
    corrections: np.ndarray  # (B, H, V)
    n: int  # validation trajectories the corrections come from
    capped: tuple[float, ...] = ()  # bands whose exact Q is infinite at this n: the largest score is used

    @property
    def levels(self) -> tuple[float, ...]:
        return calibration_levels(self.bands)

    def apply(self, samples: np.ndarray, contexts: np.ndarray) -> np.ndarray:
        """(L, N, H, V): the calibrated quantiles at `levels` of forecasts with (N, K, H, V) `samples` (NaN where a
        sample did not parse: its trajectory's quantiles are the complete samples') and (N, C, V) contexts."""
        levels = self.levels
        quantiles = MethodForecast(np.zeros(np.shape(samples)[:1] + np.shape(samples)[2:]), samples).quantiles(levels)
        scales = context_scales(contexts)[:, None, :]  # (N, 1, V)
        for band, correction in zip(self.bands, self.corrections):
            low, high = (levels.index(level) for level in band_levels(band))
            quantiles[low] -= correction[None] * scales  # (N, H, V)
            quantiles[high] += correction[None] * scales
        return np.sort(quantiles, axis=0)  # the rearrangement; a trajectory without a complete sample stays NaN

    def summary(self, trajectories: list[int]) -> dict:
        """metrics.json's "calibration": the method, the validation trajectories, and per band and species the
        median over the horizon steps of Q (in context scales; > 0: the samples' band was widened)."""
        names = variable_names(self.corrections.shape[2])
        return {"method": METHOD, "split": "val", "n_trajectories": self.n, "trajectories": list(trajectories),
                "bands": list(self.bands), "capped_bands": list(self.capped),
                "median_correction": {f"{round(100 * band)}": {name: float(np.median(self.corrections[b, :, v]))
                                                               for v, name in enumerate(names)}
                                      for b, band in enumerate(self.bands)}}


def conformity_scores(samples: np.ndarray, targets: np.ndarray, contexts: np.ndarray, band: float) -> np.ndarray:
    """(n, H, V): CQR's E_i of each trajectory, step and species for `band` (the module docstring's formula)."""
    low, high = MethodForecast(np.asarray(targets, float), samples).quantiles(band_levels(band))
    targets = np.asarray(targets, float)
    return np.maximum(low - targets, targets - high) / context_scales(contexts)[:, None, :]


def conformal_rank(n: int, band: float) -> int:
    """ceil((n + 1) band): the rank (1-based) of the score that is the correction (rounded first, so that a product
    such as 151 x 0.8 = 120.80000000000001 is not pushed a rank up by its last bit)."""
    return math.ceil(round((n + 1) * band, 9))


def fit_calibration(samples: np.ndarray, targets: np.ndarray, contexts: np.ndarray,
                    bands=CALIBRATION_BANDS) -> Calibration:
    """The Calibration of `bands` from a validation forecast: (n, K, H, V) samples of n trajectories whose forecasts
    are complete (at least one sample parsed to the horizon), their (n, H, V) targets and (n, C, V) contexts."""
    samples, targets = np.asarray(samples, float), np.asarray(targets, float)
    n = len(targets)
    if n == 0:
        raise ValueError("calibration needs at least one validation trajectory with a complete forecast")
    corrections, capped = [], []
    for band in bands:
        scores = np.sort(conformity_scores(samples, targets, contexts, band), axis=0)
        rank = conformal_rank(n, band)
        if rank > n:
            capped.append(band)
        corrections.append(scores[min(rank, n) - 1])
    return Calibration(tuple(bands), np.stack(corrections), n, tuple(capped))
