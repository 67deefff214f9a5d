"""Probabilistic scores of forecasts, as the forecasting literature reports them, and the samples file they are
computed from (`samples.npz`, so any score can be recomputed from it alone).

Every score is per species, on original units, over the trajectories scored (metrics.py keeps the point metrics):
- CRPS: the plain energy-form ensemble estimator, per point mean_i |X_i - y| - 1/2 mean_ij |X_i - X_j| over the m
  complete samples of the forecast (all m^2 pairs, i = j included), the same as properscoring's `crps_ensemble`;
  averaged over trajectories and horizon. Not the "fair" estimator (which divides the pair sum by m(m - 1) and
  scores lower, 7-9 % at 20 samples), nor LLMTIME's CRPS (a pinball loss over 20 quantile levels divided by the sum
  of |y|). A point forecast is one sample: its CRPS is its absolute error.
- WQL (Chronos, GIFT-Eval): for each level q in 0.1..0.9, 2 * sum of the pinball loss of the samples' q-quantile /
  sum of |y| over all points; averaged over the nine levels. A point forecast is its every quantile, which makes
  its WQL sum |error| / sum |y|.
- coverage_80: the share of targets inside the samples' 10-90 % quantiles (inclusive). A point forecast (or one
  sample) has no interval: the key is left out and the method's "probabilistic" line says so. coverage_50 and
  coverage_95 likewise, inside the 25-75 % and 2.5-97.5 % quantiles. A forecast calibrated on the validation split
  (forecast.py --calibrate, forecasting.calibration) reports its calibrated quantiles' WQL and coverage, and its
  samples' own beside them (<score>_uncalibrated); its CRPS stays the samples'.
- MASE: each trajectory's MAE of the point forecast / its context's one-step naive MAE (mean |c_t - c_t-1|), per
  species, averaged over trajectories (a constant context has no scale: left out, and counted).
- Relative to seasonal naive (`<score>_gmean_relative`): the geometric mean over trajectories of each trajectory's
  WQL (MASE) divided by seasonal naive's on the same trajectory; seasonal naive scores 1 by construction. (Not
  Chronos's aggregate, which is the geometric mean over data sets of each data set's pooled score ratio.)
Quantiles are numpy's (linear interpolation between order statistics), as Forecast.band draws the 10-90 % band.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.fileio import atomic_write

from .metrics import forecast_metrics, variable_names

QUANTILE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The central bands whose coverage is reported (coverage_50, coverage_80, coverage_95): each from the quantiles at
# 0.5 -/+ band / 2 (the samples', or the calibrated ones of a forecast calibrated on the validation split).
COVERAGE_BANDS = (0.5, 0.8, 0.95)
UNCALIBRATED = "_uncalibrated"  # suffix of a calibrated forecast's scores of its samples' own quantiles
REFERENCE = "seasonal_naive"  # the method the relative scores divide by
SAMPLES_FILE = "samples.npz"
RELATIVE = ("wql", "mase")  # the scores reported relative to REFERENCE, as <score>_gmean_relative


def complete_samples_only(samples: np.ndarray) -> np.ndarray:
    """(N, K, H, V) samples with every sample that did not parse to the full horizon set to NaN throughout: the
    scores use the complete samples of each trajectory, as its median point forecast does."""
    samples = np.array(samples, float)
    samples[~np.isfinite(samples).all(axis=(2, 3))] = np.nan
    return samples


def crps(samples: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per point CRPS (N, H, V) of (N, K, H, V) samples (NaN ones left out) against (N, H, V) targets, the energy
    form E|X - y| - 0.5 E|X - X'|. E|X - X'| over the k valid samples sorted x_(1) <= ... <= x_(k) is
    2/k^2 * sum_i (2i - k - 1) x_(i): each pair's difference counted once from each side, without the K x K array."""
    ordered = np.sort(samples, axis=1)  # NaN last
    valid = np.isfinite(ordered)
    k = valid.sum(axis=1)  # (N, H, V)
    rank = np.arange(1, ordered.shape[1] + 1)[None, :, None, None]
    weights = np.where(valid, 2 * rank - k[:, None] - 1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):  # a trajectory without a complete sample: NaN
        spread = 2 * (weights * np.where(valid, ordered, 0.0)).sum(axis=1) / k ** 2
        absolute = np.where(valid, np.abs(ordered - targets[:, None]), 0.0).sum(axis=1) / k
    return absolute - 0.5 * spread


def sample_quantiles(samples: np.ndarray, levels=QUANTILE_LEVELS) -> np.ndarray:
    """(L, N, H, V): each level's quantile over the valid samples of (N, K, H, V), numpy's default (linear)
    definition: the order statistic at position level * (k - 1), interpolated; NaN without a valid sample. (One
    sort for all levels: np.nanquantile loops over the points and is ~100 times slower.)"""
    ordered = np.sort(samples, axis=1)[None]  # (1, N, K, H, V), NaN last
    k = np.isfinite(ordered).sum(axis=2, keepdims=True)  # (1, N, 1, H, V)
    position = np.asarray(levels, float).reshape(-1, 1, 1, 1, 1) * np.maximum(k - 1, 0)  # (L, N, 1, H, V)
    below = np.floor(position).astype(int)
    low = np.take_along_axis(ordered, below, axis=2)
    high = np.take_along_axis(ordered, np.ceil(position).astype(int), axis=2)
    return (low + (position - below) * (high - low))[:, :, 0]


def pinball_loss(quantile: np.ndarray, targets: np.ndarray, level: float) -> np.ndarray:
    """The quantile (pinball) loss of a level-`level` quantile forecast, per point: level * (y - q) when the target
    is above it, (1 - level) * (q - y) when below."""
    error = targets - quantile
    return np.maximum(level * error, (level - 1) * error)


def weighted_quantile_loss(quantiles: np.ndarray, targets: np.ndarray, levels=QUANTILE_LEVELS, axis=None):
    """2 * sum of the pinball loss / sum of |y| over `axis` of (N, H) arrays, averaged over the levels;
    `quantiles` (L, N, H). NaN where the targets sum to 0."""
    losses = np.stack([pinball_loss(q, targets, level) for q, level in zip(quantiles, levels)])
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = tuple(range(1, losses.ndim)) if axis is None else axis + 1  # the levels stay apart
        per_level = 2 * losses.sum(axis=pooled) / np.abs(targets).sum(axis=axis)
    return per_level.mean(axis=0)


def naive_scale(contexts: np.ndarray) -> np.ndarray:
    """(N, V): the mean absolute one-step change of each (N, T, V) context, the MAE a naive one-step forecast makes
    inside it (MASE's denominator); NaN for a one-step context, which has no change to measure."""
    contexts = np.asarray(contexts, float)
    if contexts.shape[1] < 2:
        return np.full((contexts.shape[0], contexts.shape[2]), np.nan)
    return np.abs(np.diff(contexts, axis=1)).mean(axis=1)


def band_levels(band: float) -> tuple[float, float]:
    """The quantile levels (0.5 - band / 2, 0.5 + band / 2) of a central band, rounded so that 0.8's are 0.1 and 0.9
    exactly (the levels a calibration stores its quantiles at are found by equality)."""
    return round(0.5 - band / 2, 6), round(0.5 + band / 2, 6)


def coverage_key(band: float) -> str:
    return f"coverage_{round(100 * band):d}"


@dataclass
class MethodForecast:
    """One method's forecast of N trajectories: its point forecast and, for a generated method, its samples; for a
    forecast calibrated on the validation split (forecasting.calibration), its calibrated quantiles, which its
    reported quantiles, WQL and coverage use (`quantiles`)."""
    point: np.ndarray  # (N, H, V)
    samples: np.ndarray | None = None  # (N, K, H, V), NaN where a sample did not parse; None: a point forecast
    calibrated: np.ndarray | None = None  # (L, N, H, V) quantiles at `levels`; None: not calibrated
    levels: tuple[float, ...] = ()  # the calibrated quantiles' levels, ascending

    def quantiles(self, levels, calibrated: bool = True) -> np.ndarray:
        """(len(levels), N, H, V): the reported quantiles at `levels`: the calibrated ones when there are (and
        `calibrated`), else the samples' (`sample_quantiles`; a point forecast is its every quantile)."""
        if calibrated and self.calibrated is not None:
            stored = [round(float(level), 6) for level in self.levels]
            missing = [level for level in levels if round(float(level), 6) not in stored]
            if missing:
                raise ValueError(f"no calibrated quantile at level(s) {missing}; calibrated at {list(self.levels)}")
            return self.calibrated[[stored.index(round(float(level), 6)) for level in levels]]
        return sample_quantiles(self.ensemble, levels)

    def with_rows(self, rows) -> MethodForecast:
        """The forecast of the trajectories `rows` (a mask or indices) only."""
        return MethodForecast(self.point[rows], None if self.samples is None else self.samples[rows],
                              None if self.calibrated is None else self.calibrated[:, rows], self.levels)

    @property
    def ensemble(self) -> np.ndarray:
        """(N, K, H, V) complete samples; a point forecast is one sample."""
        return self.point[:, None] if self.samples is None else complete_samples_only(self.samples)

    def describe(self) -> str:
        """metrics.json's "probabilistic" line: what the scores of this method mean."""
        if self.samples is None:
            return ("point forecast: CRPS = MAE; WQL takes the point as every quantile (= sum |error| / sum |y|); "
                    "no interval, so no coverage_80; against seasonal naive (itself a point) WQL and MASE give the "
                    "same ratio of absolute errors")
        if self.samples.shape[1] == 1:
            return ("one sample: CRPS = MAE; WQL takes the sample as every quantile (= sum |error| / sum |y|); "
                    "no interval, so no coverage_80; against seasonal naive (itself a point) WQL and MASE give the "
                    "same ratio of absolute errors")
        return (f"{self.samples.shape[1]} samples: CRPS, the WQL quantiles and coverage_80 from each trajectory's "
                f"complete samples; MASE of their median")


def trajectory_scores(forecast: MethodForecast, targets: np.ndarray, contexts: np.ndarray) -> dict[str, np.ndarray]:
    """Each trajectory's CRPS, WQL and MASE over its horizon, per variable: {"prey_crps": (N,), "prey_wql": (N,),
    "prey_mase": (N,), ...}; NaN for a trajectory without a complete forecast (or, MASE, a constant context)."""
    targets = np.asarray(targets, float)
    ensemble = forecast.ensemble
    point_crps = crps(ensemble, targets).mean(axis=1)  # (N, V)
    quantiles = forecast.quantiles(QUANTILE_LEVELS)  # (L, N, H, V): the calibrated ones of a calibrated forecast
    with np.errstate(invalid="ignore", divide="ignore"):
        mase = np.abs(forecast.point - targets).mean(axis=1) / naive_scale(contexts)
    mase[~np.isfinite(mase)] = np.nan  # a zero scale: no MASE, not infinity
    out = {}
    for v, name in enumerate(variable_names(targets.shape[2])):
        out[f"{name}_crps"] = point_crps[:, v]
        out[f"{name}_wql"] = weighted_quantile_loss(quantiles[..., v], targets[..., v], axis=1)
        out[f"{name}_mase"] = mase[:, v]
    return out


def band_coverage(forecast: MethodForecast, targets: np.ndarray, band: float, calibrated: bool = True) -> np.ndarray:
    """(N, V): each trajectory's share of target values inside the forecast's central `band` (0.8: between its
    0.1 and 0.9 quantiles, inclusive), from its reported quantiles (`MethodForecast.quantiles`)."""
    targets = np.asarray(targets, float)
    low, high = forecast.quantiles(band_levels(band), calibrated)
    return ((low <= targets) & (targets <= high)).mean(axis=1)


def probabilistic_scores(forecast: MethodForecast, targets: np.ndarray, contexts: np.ndarray) -> dict:
    """{variable: {"crps", "wql", "coverage_50", "coverage_80", "coverage_95" (samples only), "mase",
    "mase_undefined"}} pooled over the N trajectories, whose forecasts must be complete. A calibrated forecast's WQL
    and coverage are its calibrated quantiles'; its samples' own are beside them as "wql_uncalibrated",
    "coverage_80_uncalibrated", ... (CRPS is always the samples')."""
    targets = np.asarray(targets, float)
    ensemble = forecast.ensemble
    point_crps = crps(ensemble, targets)
    per_trajectory = trajectory_scores(forecast, targets, contexts)
    sampled = forecast.samples is not None and forecast.samples.shape[1] > 1  # the samples span a band
    calibrated_bands = forecast.calibrated is not None  # (a calibrated greedy forecast has bands too)
    versions = [(True, "", sampled or calibrated_bands)] + ([(False, UNCALIBRATED, sampled)] if calibrated_bands
                                                             else [])
    quantiles = {calibrated: forecast.quantiles(QUANTILE_LEVELS, calibrated) for calibrated, _, _ in versions}
    covered = {(calibrated, band): band_coverage(forecast, targets, band, calibrated)  # (N, V)
               for calibrated, _, interval in versions if interval for band in COVERAGE_BANDS}
    out = {}
    for v, name in enumerate(variable_names(targets.shape[2])):
        mase = per_trajectory[f"{name}_mase"]
        defined = ~np.isnan(mase)
        out[name] = {"crps": float(point_crps[..., v].mean())}
        for calibrated, suffix, interval in versions:
            out[name][f"wql{suffix}"] = float(weighted_quantile_loss(quantiles[calibrated][..., v], targets[..., v]))
            if interval:
                for band in COVERAGE_BANDS:
                    out[name][f"{coverage_key(band)}{suffix}"] = float(covered[calibrated, band][:, v].mean())
        out[name].update({"mase": float(mase[defined].mean()) if defined.any() else float("nan"),
                          "mase_undefined": int((~defined).sum())})
    return out


def relative_geometric_means(per_trajectory: dict[str, dict[str, np.ndarray]], reference: str = REFERENCE,
                             scores=RELATIVE) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {variable: {"<score>_gmean_relative": g}}}: the geometric mean over trajectories of the method's
    per-trajectory score / the reference's (trajectory_scores' arrays), on the trajectories where both are finite
    and positive (a ratio of 0 or infinity has no logarithm). Empty when the reference was not run."""
    if reference not in per_trajectory:
        return {}
    names = sorted({key.rsplit("_", 1)[0] for key in per_trajectory[reference]})
    out = {}
    for method, values in per_trajectory.items():
        out[method] = {name: {} for name in names}
        for name in names:
            for score in scores:
                ratio = values[f"{name}_{score}"] / per_trajectory[reference][f"{name}_{score}"]
                usable = np.isfinite(ratio) & (ratio > 0)
                if usable.any():
                    out[method][name][f"{score}_gmean_relative"] = float(np.exp(np.log(ratio[usable]).mean()))
    return out


def score_methods(forecasts: dict[str, MethodForecast], targets: np.ndarray, contexts: np.ndarray,
                  scored: np.ndarray) -> dict[str, dict | None]:
    """Every score of every method on the `scored` trajectories (None per method when none is): metrics.py's point
    metrics with the probabilistic scores merged in per variable, the relative geometric means, and the method's
    "probabilistic" line. evaluate() and scores_from_samples() both score with this."""
    targets, contexts, scored = np.asarray(targets, float), np.asarray(contexts, float), np.asarray(scored, bool)
    if not scored.any():
        return {name: None for name in forecasts}
    kept = {name: f.with_rows(scored) for name, f in forecasts.items()}
    relative = relative_geometric_means({name: trajectory_scores(f, targets[scored], contexts[scored])
                                         for name, f in kept.items()})
    out = {}
    for name, forecast in kept.items():
        metrics = forecast_metrics(forecast.point, targets[scored])
        for variable, scores in probabilistic_scores(forecast, targets[scored], contexts[scored]).items():
            metrics[variable].update(scores, **relative.get(name, {}).get(variable, {}))
        metrics["probabilistic"] = forecast.describe()
        out[name] = metrics
    return out


# ---- samples.npz ---------------------------------------------------------------------------------------------------

@dataclass
class SavedForecasts:
    """What samples.npz holds: every method's forecasts of the same trajectories, and what they are scored on."""
    indices: np.ndarray  # (N,) trajectory indices in the data file
    contexts: np.ndarray  # (N, T, V) original units
    targets: np.ndarray  # (N, H, V)
    scored: np.ndarray  # (N,) bool: the trajectories every method forecast in full
    forecasts: dict[str, MethodForecast]  # in table order


def write_samples(path: str | Path, saved: SavedForecasts) -> Path:
    """samples.npz (compressed, no pickled objects): `methods` (names in order), `indices`, `contexts`, `targets`,
    `scored`, `point_<method>` for every method and `samples_<method>` (N, K, H, V) for each generated one; for a
    calibrated method, `calibrated_<method>` (L, N, H, V) and its levels `levels_<method>` (L,)."""
    arrays = {"methods": np.array(list(saved.forecasts), dtype=str), "indices": np.asarray(saved.indices),
              "contexts": np.asarray(saved.contexts, float), "targets": np.asarray(saved.targets, float),
              "scored": np.asarray(saved.scored, bool)}
    for name, forecast in saved.forecasts.items():
        arrays[f"point_{name}"] = np.asarray(forecast.point, float)
        if forecast.samples is not None:
            arrays[f"samples_{name}"] = np.asarray(forecast.samples, float)
        if forecast.calibrated is not None:
            arrays[f"calibrated_{name}"] = np.asarray(forecast.calibrated, float)
            arrays[f"levels_{name}"] = np.asarray(forecast.levels, float)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


def read_samples(path: str | Path) -> SavedForecasts:
    """A samples.npz back; a file that is not one raises ValueError naming the file and what is missing."""
    try:
        opened = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile) as e:  # not a zip of arrays (an OSError already names the file)
        raise ValueError(f"{path}: not a samples file of a forecast ({e})") from None
    if not isinstance(opened, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a samples file of a forecast (one array, not an .npz archive)")
    with opened as f:
        missing = [key for key in ("methods", "indices", "contexts", "targets", "scored") if key not in f.files]
        methods = [str(m) for m in f["methods"]] if "methods" in f.files else []
        missing += [f"point_{m}" for m in methods if f"point_{m}" not in f.files]
        missing += [f"levels_{m}" for m in methods if f"calibrated_{m}" in f.files and f"levels_{m}" not in f.files]
        if missing:
            raise ValueError(f"{path}: not a samples file of a forecast: missing {', '.join(missing)}")
        forecasts = {m: MethodForecast(f[f"point_{m}"], f[f"samples_{m}"] if f"samples_{m}" in f.files else None,
                                       f[f"calibrated_{m}"] if f"calibrated_{m}" in f.files else None,
                                       tuple(f[f"levels_{m}"].tolist()) if f"levels_{m}" in f.files else ())
                     for m in methods}
        return SavedForecasts(f["indices"], f["contexts"], f["targets"], f["scored"], forecasts)


def scores_from_samples(path: str | Path) -> dict[str, dict | None]:
    """Every score of metrics.json's "metrics", recomputed from a samples.npz alone."""
    saved = read_samples(path)
    return score_methods(saved.forecasts, saved.targets, saved.contexts, saved.scored)

