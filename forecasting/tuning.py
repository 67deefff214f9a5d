"""The validation forecasts a test forecast may begin with: `--temperature auto` forecasts the validation split at
each temperature of its grid and keeps the one of lowest CRPS; `--calibrate` fits the conformal calibration of the
bands (forecasting.calibration) on the validation forecast at the temperature used. The validation trajectories are
the val split's (its first `val_limit`), never a forecast one: a forecast of the validation split itself is refused
(ForecastConfig), and so is a --sample of a validation trajectory (`check_apart`).

The criterion: the geometric mean over the species of each one's CRPS (mean over trajectories and steps), the same
scale-free combination demo.py's model choice uses for the MSE (forecasting.metrics.species_geometric_mean serves
both): prey and predator are on different scales, and the geometric mean weighs a relative change in either alike.
A tie keeps the temperature listed first. Every validation forecast is booked like any forecast (its ledger entry
labelled "validation T=<t>"), counted before it runs (`validation_temperatures`: forecasting.budget's reservation and
study.estimate's plan count both read it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from data.lotka_volterra import Split

from .calibration import Calibration, fit_calibration
from .evaluate import MODEL, Evaluation, Protocol, Selection, contexts_of, evaluate, select_trajectories
from .metrics import SPECIES, species_geometric_mean

CRITERION = "the geometric mean over the species of the CRPS"


def validation_temperatures(settings) -> list[float]:
    """The temperatures the validation split is forecast at before the test forecast (a Protocol or a
    ForecastConfig): the grid for temperature "auto", the one temperature for calibrate alone, else none."""
    if settings.temperature == "auto":
        return list(settings.temperature_grid)
    return [float(settings.temperature)] if settings.calibrate else []


def validation_selection(split: Split, limit: int | None) -> Selection:
    """The validation trajectories: the val split's first `limit` (None: all); ValueError for an empty val split."""
    try:
        return select_trajectories(split, "val", None, limit)
    except ValueError as e:
        raise ValueError(f"{e}: --temperature auto and --calibrate need validation trajectories") from None


def check_apart(validation: Selection, forecast: Selection) -> None:
    """ValueError naming the first trajectory that is both a validation and a forecast one (a --sample from the val
    split): the temperature or the bands would be fitted on what they are scored on."""
    both = sorted(set(validation.indices) & set(forecast.indices))
    if both:
        raise ValueError(f"trajectory {both[0]} is in the validation split, which --temperature auto / --calibrate "
                         "fit on: forecast test trajectories (a --sample from the test split, or --split test)")


def geometric_crps(metrics: dict | None) -> float | None:
    """The criterion of a validation forecast's model metrics (None: nothing scored, or a CRPS that is not a
    finite positive number)."""
    return species_geometric_mean(metrics, "crps")


@dataclass
class Candidate:
    temperature: float
    crps: dict[str, float | None]  # per species
    score: float | None  # the criterion (None: not usable)
    n_scored: int


@dataclass
class ValidationResult:
    selection: Selection
    candidates: list[Candidate]
    chosen: float  # the temperature the test forecast uses
    tuned: bool  # chosen from the grid (temperature "auto"), else the one given
    calibration: Calibration | None
    calibration_trajectories: list[int]
    generation: dict = field(default_factory=dict)  # "validation T=<t>" -> its GenerationStats (FLOPs, tokens)

    def summary(self) -> dict:
        """metrics.json's "validation"."""
        return {"split": "val", "selection": self.selection.label, "trajectories": self.selection.indices,
                "criterion": CRITERION, "temperature_chosen": self.tuned, "temperature": self.chosen,
                "candidates": [{"temperature": c.temperature, "crps": c.crps, "score": c.score,
                                "n_scored": c.n_scored} for c in self.candidates],
                "calibration": None if self.calibration is None
                else self.calibration.summary(self.calibration_trajectories)}


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The candidate of lowest score (the first of equals); None when none has one."""
    usable = [c for c in candidates if c.score is not None]
    return min(usable, key=lambda c: c.score) if usable else None


def run_validation(model, tokenizer, data, split: Split, selection: Selection, protocol: Protocol, *,
                   on_flops=None, **generation) -> ValidationResult:
    """Forecast `selection` (validation trajectories) with the model only at each of `validation_temperatures`,
    choose, and fit the calibration on the chosen temperature's forecast when `protocol.calibrate`. `on_flops(label,
    flops)` gets each call's FLOPs, labelled "validation T=<t>"; `generation`: evaluate's other arguments (batch,
    memory_gb, progress, gqa, jump_forward, compile). ValueError when no temperature gave a usable forecast."""
    candidates, spent, best, best_evaluation = [], {}, None, None
    for temperature in validation_temperatures(protocol):
        label = f"validation T={temperature:g}"
        report = (lambda method, flops, label=label: on_flops(label, flops)) if on_flops is not None else None
        evaluation = evaluate(model, tokenizer, data, split, selection,
                              replace(protocol, temperature=temperature, calibrate=False), baselines=(),
                              on_flops=report, label=f"{label} ", **generation)
        metrics = evaluation.metrics.get(MODEL)
        candidates.append(Candidate(temperature, {s: ((metrics or {}).get(s) or {}).get("crps") for s in SPECIES},
                                    geometric_crps(metrics), int(evaluation.scored.sum())))
        spent[label] = evaluation.generation[MODEL]
        if choose(candidates) is candidates[-1]:  # the best so far: kept for the calibration, the others let go
            best, best_evaluation = candidates[-1], evaluation
    if best is None:
        raise ValueError(f"no validation forecast ({', '.join(f'T={c.temperature:g}' for c in candidates)}) could be "
                         "scored: every one has a trajectory whose samples failed to parse")
    calibration, used = None, []
    if protocol.calibrate:
        calibration, used = calibrate_on(best_evaluation)
    return ValidationResult(selection, candidates, best.temperature, protocol.auto_temperature, calibration, used,
                            spent)


def calibrate_on(evaluation: Evaluation) -> tuple[Calibration, list[int]]:
    """The calibration fitted on a validation forecast's scored trajectories (those whose samples parsed), and their
    indices."""
    rows = np.flatnonzero(evaluation.scored)
    samples = np.stack([evaluation.forecasts[MODEL][r].samples for r in rows])
    calibration = fit_calibration(samples, evaluation.targets[rows], contexts_of(evaluation.examples)[rows])
    return calibration, [evaluation.examples[r].index for r in rows]
