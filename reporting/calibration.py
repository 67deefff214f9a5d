"""The report's calibration of each sampled forecast: how often the model's central 50, 80 and 95 % bands hold the
test values, its samples' own bands and (forecast.py --calibrate) the bands calibrated on the validation split, each
with a 95 % bootstrap interval over the trajectories; a reliability figure (nominal band against the share of values
inside it, for every band calibrated); the temperature the validation split chose (--temperature auto), with every
candidate's score; and the Findings line: are the bands too narrow or too wide beyond sampling noise?

Everything is recomputed from the forecast's samples.npz (its samples, and its calibrated quantiles when it was
calibrated) over the trajectories it scored, and from metrics.json's "validation". A band is "too narrow" when the
whole bootstrap interval of its coverage lies below its nominal level, "too wide" when it lies above, else "within
the noise". The interval resamples trajectories, not values: a forecast's values along one trajectory are
correlated, so a binomial interval over all N x H values would be far too narrow.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from forecasting.calibration import CALIBRATION_BANDS
from forecasting.metrics import SPECIES
from forecasting.scores import COVERAGE_BANDS, SAMPLES_FILE, band_coverage, read_samples

from . import format as fmt
from .figures import save, slug
from .results import StageResult
from .uncertainty import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, LEVEL, bootstrap_mean

MODEL = "model"  # samples.npz's subject method


def percent(value) -> str:
    """A coverage: "68.4 %" ("-" for none); the tables and the Findings write it with this alone."""
    return f"{100 * value:.1f} %" if fmt.finite(value) else "-"


def interval_text(interval) -> str:
    return "-" if interval is None else f"[{percent(interval[0])}, {percent(interval[1])}]"


def verdict(band: float, interval) -> str:
    """"too narrow (too wide) beyond the noise" when the whole interval lies below (above) the nominal `band`, else
    "within the noise"; "-" without an interval."""
    if interval is None:
        return "-"
    if interval[1] < band:
        return "too narrow beyond the noise"
    if interval[0] > band:
        return "too wide beyond the noise"
    return "within the noise"


@dataclass(frozen=True)
class Coverage:
    """One band's coverage of one species: the share of the scored test values inside it, with its interval."""
    species: str
    band: float
    calibrated: bool
    value: float
    interval: tuple[float, float] | None
    trajectories: int

    @property
    def verdict(self) -> str:
        return verdict(self.band, self.interval)


@dataclass
class BandCheck:
    """A sampled forecast's band coverages, uncalibrated and (when it was calibrated) calibrated, per species and
    band, and the reliability curve of every band calibrated."""
    coverages: list[Coverage]
    curve: dict[tuple[str, bool], list[tuple[float, float]]]  # (species, calibrated) -> [(band, coverage)]
    calibrated: bool

    def find(self, species: str, band: float, calibrated: bool) -> Coverage | None:
        return next((c for c in self.coverages if c.species == species and c.band == band
                     and c.calibrated == calibrated), None)


def band_check(samples_path: Path) -> BandCheck | None:
    """The BandCheck of the model of a forecast's samples.npz; None when it has no samples of more than one draw or
    scored no trajectory (ValueError for a file that is not a samples file)."""
    saved = read_samples(samples_path)
    forecast = saved.forecasts.get(MODEL)
    scored = np.asarray(saved.scored, bool)
    if forecast is None or forecast.samples is None or forecast.samples.shape[1] < 2 or not scored.any():
        return None
    forecast, targets = forecast.with_rows(scored), np.asarray(saved.targets, float)[scored]
    versions = [False] + ([True] if forecast.calibrated is not None else [])
    coverages, curve = [], {}
    for calibrated in versions:
        for band in sorted(set(CALIBRATION_BANDS) | set(COVERAGE_BANDS)):
            per_trajectory = band_coverage(forecast, targets, band, calibrated)  # (N, V)
            for v, species in enumerate(SPECIES):
                curve.setdefault((species, calibrated), []).append((band, float(per_trajectory[:, v].mean())))
                if band in COVERAGE_BANDS:
                    coverages.append(Coverage(species, band, calibrated, float(per_trajectory[:, v].mean()),
                                              bootstrap_mean(per_trajectory[:, v]), len(per_trajectory)))
    return BandCheck(coverages, curve, forecast.calibrated is not None)


def read_band_check(result: StageResult, unreadable: list[str]) -> BandCheck | None:
    path = result.out / SAMPLES_FILE
    if not path.is_file():
        return None
    try:
        return band_check(path)
    except (OSError, ValueError) as e:
        unreadable.append(f"forecast samples {e}: left out of the calibration section")
        return None


def coverage_table(check: BandCheck) -> list[str]:
    header = ["species", "band", "uncalibrated", f"{LEVEL} % interval", "verdict"]
    if check.calibrated:
        header += ["calibrated", f"{LEVEL} % interval", "verdict"]
    header.append("trajectories")
    rows = []
    for species in SPECIES:
        for band in COVERAGE_BANDS:
            raw = check.find(species, band, False)
            row = [species, f"{round(100 * band)} %", percent(raw.value), interval_text(raw.interval), raw.verdict]
            if check.calibrated:
                cal = check.find(species, band, True)
                row += [percent(cal.value), interval_text(cal.interval), cal.verdict]
            rows.append(row + [str(raw.trajectories)])
    return fmt.table(header, rows)


def plot_reliability(path: Path, check: BandCheck, title: str, values: str = "test values") -> Path:
    """Nominal central band against the share of `values` inside it, one panel per species: the samples' bands
    (dashed) and the calibrated ones (solid), the diagonal a perfectly calibrated forecast lies on, and the 50, 80 and
    95 % bands' bootstrap intervals as error bars."""
    fig, axes = plt.subplots(1, len(SPECIES), figsize=(10, 4.4), sharey=True)
    for ax, species in zip(axes, SPECIES):
        ax.plot([0, 1], [0, 1], color="gray", lw=1, ls=":", label="nominal (perfectly calibrated)")
        for calibrated, style, label in ((False, "--", "samples' bands"), (True, "-", "calibrated on validation")):
            points = check.curve.get((species, calibrated))
            if not points:
                continue
            color = "tab:blue" if calibrated else "tab:red"
            bands, shares = zip(*points)
            ax.plot(bands, shares, style, marker="o", color=color, label=label)
            bars = [check.find(species, b, calibrated) for b in COVERAGE_BANDS]
            bars = [c for c in bars if c is not None and c.interval is not None]
            ax.errorbar([c.band for c in bars], [c.value for c in bars],
                        yerr=[[c.value - c.interval[0] for c in bars], [c.interval[1] - c.value for c in bars]],
                        fmt="none", ecolor=color, capsize=4, lw=1.2)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("nominal central band")
        ax.set_title(species)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"share of {values} inside the band")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{title}\nerror bars: {LEVEL} % bootstrap intervals over trajectories (50, 80, 95 % bands)",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def temperature_lines(validation) -> list[str]:
    """The validation forecasts' temperature choice (or the one temperature calibrated at), every candidate's
    CRPS per species and its criterion."""
    if not isinstance(validation, dict) or not isinstance(validation.get("candidates"), list):
        return []
    chosen = validation.get("temperature")
    rows = []
    for c in validation["candidates"]:
        if not isinstance(c, dict):
            continue
        crps = c.get("crps") if isinstance(c.get("crps"), dict) else {}
        rows.append([fmt.setting(c.get("temperature")), *(fmt.number(crps.get(s)) for s in SPECIES),
                     fmt.number(c.get("score")), str(c.get("n_scored", "-")),
                     "yes" if c.get("temperature") == chosen else ""])
    what = ("chosen on the validation split by " if validation.get("temperature_chosen") else
            "the one temperature of the validation forecast, scored by ")
    return [f"Temperature {what}{validation.get('criterion', 'CRPS')} ({validation.get('selection', '')}; "
            "booked in the ledger like every forecast):", ""] + fmt.table(
        ["temperature", *(f"{s} CRPS" for s in SPECIES), "criterion", "trajectories", "chosen"], rows) + [""]


SPLIT_WORDS = {"test": "test", "val": "validation", "train": "training"}


def scored_values(result: StageResult) -> str:
    """What a forecast's coverages are shares of: "test values", "validation values" (a forecast of the val split,
    e.g. the demo's model choice), or "values" where its trajectories come from several splits."""
    splits = result.splits
    return f"{SPLIT_WORDS.get(splits[0], splits[0])} values" if len(splits) == 1 else "values"


def calibration_section(result: StageResult, figures: Path, out: Path, unreadable: list[str]) -> list[str]:
    """The section's Markdown of one forecast: the temperature choice, the coverage table and the reliability
    figure (nothing for a forecast without samples)."""
    lines = temperature_lines(result.summary.get("validation"))
    check = read_band_check(result, unreadable)
    if check is None:
        return lines
    calibration = (result.summary.get("validation") or {}).get("calibration")
    how = (f" Calibrated bands: {calibration.get('method')}, on {calibration.get('n_trajectories')} validation "
           "trajectories, none of them a test one." if isinstance(calibration, dict) else "")
    lines += [f"Calibration of the {result.subject} model's bands: the share of the scored {scored_values(result)} "
              "inside each "
              f"central band, with {LEVEL} % bootstrap intervals over the trajectories ({BOOTSTRAP_RESAMPLES} "
              f"resamples, seed {BOOTSTRAP_SEED}); too narrow / too wide: the whole interval below / above the "
              f"nominal share.{how}", ""]
    lines += coverage_table(check) + [""]
    path = plot_reliability(figures / f"reliability_{slug(result.key)}.png", check,
                            f"{result.name} ({result.out.name}): reliability of the {result.subject} model's bands",
                            scored_values(result))
    link = Path(os.path.relpath(Path(path).resolve(), out.resolve())).as_posix()
    return lines + [f"*Reliability: nominal central band against the share of {scored_values(result)} inside it*", "",
                    f"![reliability of the bands]({link})", ""]


def calibration_findings(result: StageResult, check: BandCheck | None) -> list[str]:
    """The Findings line of a sampled forecast: the 80 % band's coverage of each species, uncalibrated and
    calibrated, each with its interval and verdict (every number as the coverage table prints it)."""
    if check is None:
        return []
    parts = []
    for calibrated in ([False, True] if check.calibrated else [False]):
        found = [check.find(s, 0.8, calibrated) for s in SPECIES]
        verdicts = {c.verdict for c in found}
        judged = (f"{found[0].verdict} for both species" if len(verdicts) == 1 else
                  "; ".join(f"{c.species} {c.verdict}" for c in found))
        cover = " and ".join(f"{percent(c.value)} {interval_text(c.interval)} of the {c.species}" for c in found)
        what = "calibrated on the validation split, it covers" if calibrated else "the 80 % band covers"
        parts.append(f"{what} {cover} {scored_values(result)}: {judged}")
    n = check.coverages[0].trajectories
    return [f"- **{result.name}**{result.where}, bands of the {result.subject} model: " + "; ".join(parts)
            + f" ({LEVEL} % bootstrap intervals over {n} trajectories; table of the calibration in Results)."]
