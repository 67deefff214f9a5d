"""The report's section of each forecast: one table per species of the fine-tuned model, the zero-shot model and
every baseline — MSE, MAE, R², median trajectory MSE and, where the forecast scored them, CRPS, WQL, 80 % coverage,
MASE and their geometric means relative to seasonal naive (a column that repeats another in every row, e.g. CRPS =
MAE with one sample, is shown once; a table wider than 10 columns is split in two) — with the changes against
zero-shot and the best baseline ("x88.7" past +100 %); the paired bootstrap intervals of the differences; for a
validation forecast of both models, the choice it makes; the fine-tuned run's loss curve; error against horizon;
the distribution of per-trajectory errors; the trajectory plots of the named samples and of the best, median and
worst trajectory by MSE, each with the zero-shot line.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from forecasting.evaluate import NAMED_SAMPLES, ranked_trajectories
from forecasting.metrics import SPECIES
from forecasting.plots import plot_error_distribution, plot_trajectory
from forecasting.scores import SAMPLES_FILE, read_samples
from study.selection import forecast_score

from . import format as fmt
from .calibration import calibration_section
from .figures import plot_horizon, slug
from .results import FINE_TUNED, ZERO_SHOT, StageResult
from .uncertainty import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, LEVEL, differences, differences_table

POINT = (("mse", "MSE"), ("mae", "MAE"), ("r2", "R²"), ("median_trajectory_mse", "medMSE"))
PROBABILISTIC = (("crps", "CRPS"), ("wql", "WQL"), ("coverage_80", "cover 80 %"), ("mase", "MASE"),
                 ("wql_gmean_relative", "WQL rel. SN"), ("mase_gmean_relative", "MASE rel. SN"))
HIGHER_IS_BETTER = ("r2",)
NOT_RANKED = ("coverage_80",)  # nearer 80 % is better, not lower: no "worse than" on it
MIN_HISTOGRAM = 5  # scored trajectories below which a histogram shows nothing


def cell(value, key: str) -> str:
    if value is None or not fmt.finite(value):
        return "-"
    return f"{100 * value:.0f} %" if key == "coverage_80" else fmt.number(value)


def change(new, old, key: str) -> str:
    """The subject's value against a reference: relative change of an error score, difference of R² / coverage."""
    if not (fmt.finite(new) and fmt.finite(old)):
        return "-"
    if key == "coverage_80":  # percentage points; a difference that rounds to 0 keeps its sign and a digit
        points = 100 * (new - old)
        return "0 pts" if points == 0 else f"{points:+.0f} pts" if abs(points) >= 0.5 else f"{points:+.1g} pts"
    return fmt.delta(new - old) if key in HIGHER_IS_BETTER else fmt.relative(new, old)


def best_baseline(result: StageResult, species: str) -> str | None:
    scored = [(m[species]["mse"], name) for name in result.baselines
              if (m := result.methods[name]) and fmt.finite((m.get(species) or {}).get("mse"))]
    return min(scored)[1] if scored else None


def shown_columns(result: StageResult, species: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The score columns of a species' table, and a note per column left out because it repeats an earlier one in
    every row ("CRPS = MAE")."""
    keys = [(k, label) for k, label in (*POINT, *PROBABILISTIC)
            if any(k in ((m or {}).get(species) or {}) for m in result.methods.values())]
    kept, notes = [], []
    for key, label in keys:
        cells = [cell(((m or {}).get(species) or {}).get(key), key) for m in result.methods.values()]
        twin = next((lab for k, lab, c in kept if c == cells and set(cells) != {"-"}), None)
        if twin is not None:
            notes.append(f"{label} = {twin}")
        else:
            kept.append((key, label, cells))
    return [(k, label) for k, label, _ in kept], notes


def references(result: StageResult, species: str) -> list[tuple[str, str]]:
    """(row, label) of what the subject's change is shown against: zero-shot, then the best baseline by MSE."""
    refs = [(ZERO_SHOT, "vs zero-shot")] if result.subject == FINE_TUNED and result.methods.get(ZERO_SHOT) else []
    best = best_baseline(result, species)
    return refs + ([(best, f"vs best baseline ({best})")] if best is not None else [])


def results_tables(result: StageResult) -> list[str]:
    """Per species: every method's scores, then the subject's change against zero-shot and against the best
    baseline (lowest MSE); split in two tables (point, probabilistic) where one would pass 10 columns."""
    lines = []
    for species in SPECIES:
        keys, notes = shown_columns(result, species)
        if not keys:
            continue
        parts = [keys] if len(keys) <= 9 else [[k for k in keys if k in POINT], [k for k in keys if k not in POINT]]
        lines += [f"**{species}**", ""]
        subject = (result.methods.get(result.subject) or {}).get(species) or {}
        for part in parts:
            rows = [[name] + [cell(((m or {}).get(species) or {}).get(k), k) for k, _ in part]
                    for name, m in result.methods.items()]
            for ref, label in references(result, species):
                values = (result.methods[ref] or {}).get(species) or {}
                rows.append([f"*{result.subject} {label}*"] + [change(subject.get(k), values.get(k), k)
                                                               for k, _ in part])
            lines += fmt.table(["method"] + [label for _, label in part], rows) + [""]
        if notes:
            lines += [f"Shown once: {', '.join(notes)} in every row.", ""]
    return lines


def result_differences(result: StageResult) -> dict[str, list]:
    """Per species: the subject's MSE, MAE and medMSE against every other row, with bootstrap intervals."""
    return {species: differences(result.subject, result.methods, result.sources, species) for species in SPECIES}


def differences_section(result: StageResult) -> list[str]:
    diffs = result_differences(result)
    if not any(diffs.values()):
        return []
    lines = [f"The {result.subject} model against every other row, with {LEVEL} % paired bootstrap intervals over "
             f"the trajectories ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}; an interval that holds 0 % "
             "is not distinguishable):", ""]
    for species, rows in diffs.items():
        if rows:
            lines += [f"**{species}**", ""] + differences_table(rows, result.subject) + [""]
    return lines


def validation_choice(result: StageResult) -> tuple[str, float, float] | None:
    """For a validation-split forecast of both models: (the winner, fine-tuned score, zero-shot score) by the
    geometric mean over the species of the MSE (study.selection.forecast_score, as demo.py chooses); else None."""
    if result.splits != ["val"] or not (result.methods.get(FINE_TUNED) and result.methods.get(ZERO_SHOT)):
        return None
    fine, zero = forecast_score(result.methods[FINE_TUNED]), forecast_score(result.methods[ZERO_SHOT])
    if fine is None or zero is None:
        return None
    return (FINE_TUNED if fine <= zero else ZERO_SHOT), fine, zero


def choice_lines(result: StageResult) -> list[str]:
    choice = validation_choice(result)
    if choice is None:
        return []
    winner, fine, zero = choice
    return ["What this validation forecast chooses (the lower geometric mean over the species of the MSE, as "
            "demo.py chooses):", ""] + fmt.table(
        ["model", "geometric mean of the species' MSE", "chosen"],
        [[FINE_TUNED, fmt.number(fine), "yes" if winner == FINE_TUNED else ""],
         [ZERO_SHOT, fmt.number(zero), "yes" if winner == ZERO_SHOT else ""]]) + [""]


def link(target: Path, out: Path, alt: str) -> str | None:
    """A Markdown image relative to the report's directory, or None if the file is not there (no dead link)."""
    if not target.is_file():
        return None
    return f"![{alt}]({Path(os.path.relpath(target.resolve(), out.resolve())).as_posix()})"


def trajectory_choices(result: StageResult) -> dict[str, int]:
    """{caption: trajectory index}: the named samples forecast, then the best, median and worst by the subject's
    MSE (from per_trajectory.csv, ranked as the forecast ranked them to plot them)."""
    indices = result.summary.get("trajectories") or []
    choices = {f"sample {i} (named)": i for i in NAMED_SAMPLES if i in indices}
    if result.subject in result.sources:
        errors, prefix = result.sources[result.subject]
        rows = sorted(errors.rows)
        columns = {f"{s}_mse": [errors.rows[i].get(f"{prefix}_{s}_mse", np.nan) for i in rows] for s in SPECIES}
        ranked = ranked_trajectories(rows, columns, [True] * len(rows))
        choices.update({f"{what} by MSE (trajectory {i})": i for what, i in ranked.items()})
    return choices


def trajectory_figures(result: StageResult, figures: Path, out: Path, unreadable: list[str]) -> list[tuple]:
    """(caption, link) per chosen trajectory: drawn from samples.npz with the zero-shot line (from the zero-shot
    forecast's own samples.npz when it was a forecast apart), else the forecast's own plot."""
    saved = zero = None
    try:
        saved = read_samples(result.out / SAMPLES_FILE) if (result.out / SAMPLES_FILE).is_file() else None
        if result.zero_shot_out is not None and (result.zero_shot_out / SAMPLES_FILE).is_file():
            zero = read_samples(result.zero_shot_out / SAMPLES_FILE)
    except (OSError, ValueError) as e:
        unreadable.append(f"forecast samples: {e}: the forecast's own trajectory plots are shown instead")
        saved = None
    images = []
    for caption, index in trajectory_choices(result).items():
        path = None
        if saved is not None and index in saved.indices.tolist():
            path = _draw_trajectory(result, saved, zero, index, figures / f"trajectory_{slug(result.key)}_{index}.png")
        target = path or result.out / f"trajectory_{index}.png"
        images.append((f"Trajectory: {caption}", link(target, out, caption)))
    return images


def _draw_trajectory(result: StageResult, saved, zero, index: int, path: Path) -> Path:
    row = saved.indices.tolist().index(index)
    names = {m: (result.subject if m == "model" else ZERO_SHOT if m == "untrained" else m) for m in saved.forecasts}
    subject = saved.forecasts["model"]
    others = {names[m]: f.point[row] for m, f in saved.forecasts.items() if m != "model"}
    if zero is not None and index in zero.indices.tolist() and "model" in zero.forecasts:
        others = {ZERO_SHOT: zero.forecasts["model"].point[zero.indices.tolist().index(index)], **others}
    band = None
    if subject.calibrated is not None:  # the bands the forecast reports: calibrated on the validation split
        band = tuple(subject.quantiles((0.1, 0.9))[:, row])
    elif subject.samples is not None and subject.samples.shape[1] > 1:
        with np.errstate(invalid="ignore"):
            band = tuple(np.nanpercentile(subject.samples[row], q, axis=0) for q in (10, 90))
    context, target = saved.contexts[row], saved.targets[row]
    return plot_trajectory(path, np.arange(len(context) + len(target)), context, target, subject.point[row], band,
                           others, f"{result.name}: trajectory {index}, context {len(context)} steps, forecast "
                                   f"{len(target)}", model_label=result.subject, xlabel="step")


def distribution_figure(result: StageResult, figures: Path, out: Path) -> str | None:
    """Per-trajectory MSE of every row with per-trajectory errors (the zero-shot one too), else the forecast's own
    error_distribution.png."""
    common = set.intersection(*(set(e.rows) for e, _ in result.sources.values())) if result.sources else set()
    if len(common) >= MIN_HISTOGRAM:
        rows = sorted(common)
        errors = {name: {f"{s}_mse": np.array([e.rows[i].get(f"{p}_{s}_mse", np.nan) for i in rows]) for s in SPECIES}
                  for name in result.methods if name in result.sources for e, p in [result.sources[name]]}
        path = plot_error_distribution(figures / f"error_distribution_{slug(result.key)}.png", errors,
                                       model_label=result.subject)
        return link(path, out, "distribution of per-trajectory MSE")
    return link(result.out / "error_distribution.png", out, "distribution of per-trajectory MSE")


def results_section(result: StageResult, out: Path, figures: Path, loss_curve: Path | None,
                    unreadable: list[str]) -> list[str]:
    s = result.summary
    if result.run_dir is None:
        what = f"{result.model}, zero-shot"
    else:
        what = "fine-tuned" + ("" if result.run_dir.name == result.out.name else f" run `{result.run_dir.name}`")
    lines = [f"### {result.name}: `{result.out.name}` ({what})", "",
             f"{s.get('selection', '')}; scored {s.get('n_scored')} of {s.get('n_trajectories')}; "
             f"{s.get('protocol', '')}.", ""]
    if result.methods.get(ZERO_SHOT) is None:
        lines += ["No zero-shot row: the study has no `forecast = \"base\"` stage over the same trajectories and "
                  "protocol, and this forecast had no \"untrained\" baseline.", ""]
    else:
        lines += [f"Zero-shot row: {result.zero_shot_from}.", ""]
    notes: dict[str, list[str]] = {}  # the forecast's note on each method's probabilistic scores, methods by note
    for name, m in result.methods.items():
        if isinstance(m, dict) and isinstance(m.get("probabilistic"), str):
            notes.setdefault(m["probabilistic"], []).append(name)
    lines += results_tables(result)
    for note, names in notes.items():
        lines += [f"Probabilistic scores of {', '.join(names)}: {note}.", ""]
    lines += differences_section(result) + choice_lines(result)
    lines += calibration_section(result, figures, out, unreadable)
    images = []
    if loss_curve is not None:
        images.append((f"The fine-tuned run's loss curve ({loss_curve.parent.name})",
                       link(loss_curve, out, f"loss curve of {loss_curve.parent.name}")))
    horizon = {name: m for name, m in result.methods.items() if m}
    if horizon:
        path = plot_horizon(figures / f"horizon_{slug(result.key)}.png",
                            f"{result.name} ({result.out.name}): error against horizon", horizon)
        images.append(("MAE against horizon step, " + ", ".join(horizon), link(path, out, "MAE against horizon")))
    images.append(("Distribution of the per-trajectory MSE", distribution_figure(result, figures, out)))
    images += trajectory_figures(result, figures, out, unreadable)
    for caption, image in images:
        if image is not None:
            lines += [f"*{caption}*", "", image, ""]
    return lines
