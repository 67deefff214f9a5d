"""Which run of a stage is best, and by what criterion (`choose_best`): what `from = "<stage>"` and
`which = "best"` start from, and what the report says chose each winner.

Runs at one context length are compared by their lowest validation loss. Runs at different context lengths are
not: a window's mean loss falls with its length even for an untrained model, so they are compared by their lowest
loss over the last N targets of each validation window (`val_loss_last` in metrics.jsonl, training.validation), N the
largest count every run recorded. A NaN or infinite loss never wins; a run without a finite score is not chosen.
A search's rung scores each run by its loss at the rung's step instead (`score_runs(at_step=)`), under the same rule.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from forecasting.metrics import species_geometric_mean
from training.run import CONFIG_NAME, METRICS_NAME, read_metrics


@dataclass(frozen=True)
class Choice:
    index: int  # of the winner in the list given
    criterion: str  # what chose it, for study.json and the report
    scores: list[float | None]  # every run's score under that criterion (None: no finite score)

    @property
    def score(self) -> float:
        return self.scores[self.index]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, drop_torn_tail=True) if (Path(run_dir) / METRICS_NAME).is_file() else []


def best_finite(values) -> float | None:
    """The lowest finite value (None if there is none): NaN and infinities never count."""
    return min((v for v in values if _finite(v)), default=None)


def best_val_loss(metrics: list[dict]) -> float | None:
    return best_finite(m.get("val_loss") for m in metrics)


def best_last_loss(metrics: list[dict], n: int) -> float | None:
    return best_finite((m.get("val_loss_last") or {}).get(str(n)) for m in metrics
                       if isinstance(m.get("val_loss_last"), dict))


def common_last_count(histories: list[list[dict]]) -> int | None:
    """The largest N of `val_loss_last` that every run recorded (None if some run recorded none)."""
    common = None
    for metrics in histories:
        counts = {int(k) for m in metrics if isinstance(m.get("val_loss_last"), dict)
                  for k in m["val_loss_last"] if str(k).isdigit()}
        common = counts if common is None else common & counts
    return max(common) if common else None


def context_length(run_dir: Path):
    """The run's context length from its config.json (None if unreadable: such a run has no finite score anyway)."""
    try:
        config = json.loads((Path(run_dir) / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config.get("ctx") if isinstance(config, dict) else None


def choose_best(run_dirs: list[Path]) -> Choice | None:
    """The best of `run_dirs` (the first of equals), or None if no run has a finite score."""
    return lowest(*score_runs(run_dirs))


def score_runs(run_dirs: list[Path], at_step: int | None = None, histories: list[list[dict]] | None = None
               ) -> tuple[list[float | None], str]:
    """Every run's score (None: no finite one) and the criterion: the lowest validation loss, over the last N targets
    of each window when the context lengths differ (see the module docstring). `at_step` (a search's rung): the
    validation loss at that step only, the weights that go on (never an earlier one, nor the untrained step 0's).
    `histories`: the runs' metrics already read (default: read from their directories)."""
    histories = [run_metrics(d) for d in run_dirs] if histories is None else histories
    what = "lowest validation loss"
    if at_step is not None:
        histories = [[m for m in metrics if m.get("step") == at_step and at_step > 0] for metrics in histories]
        what = f"validation loss at step {at_step}"
    contexts = {context_length(d) for d in run_dirs}
    n = common_last_count(histories) if len(contexts) > 1 else None
    if len(contexts) <= 1:
        return [best_val_loss(m) for m in histories], what
    if n is not None:
        return [best_last_loss(m, n) for m in histories], \
            (f"{what} over the last {n} targets of each window (the same positions at every context "
             f"length: ctx {', '.join(str(c) for c in sorted(contexts, key=str))})")
    return [best_val_loss(m) for m in histories], \
        (f"{what} over whole windows (the context lengths differ and the runs recorded no last-N "
         "losses: not compared on the same positions)")


def lowest(scores: list[float | None], criterion: str) -> Choice | None:
    """The Choice of the lowest score (the first of equals; None scores never win), or None if every one is None."""
    ranked = [(s, i) for i, s in enumerate(scores) if s is not None]
    return Choice(min(ranked)[1], criterion, scores) if ranked else None


def forecast_score(method_metrics: dict | None) -> float | None:
    """One method's validation-split forecast score from a forecast's metrics.json entry: the geometric mean over
    the variables of the point forecast's MSE (forecasting.metrics.species_geometric_mean: each species weighs the
    same whatever its scale). None when a variable has no finite, positive MSE."""
    return species_geometric_mean(method_metrics, "mse")


def choose_by_forecast(metrics: dict, methods: list[str], what: str) -> Choice | None:
    """The best of `methods` (keys of a forecast's metrics.json "metrics": "model", "untrained", ...) by
    `forecast_score`, the first of equals; None if none has a finite score. `what` describes the forecast (split,
    trajectories, samples) for the criterion."""
    return lowest([forecast_score(metrics.get(m)) for m in methods],
                  f"lowest geometric mean over the species of the forecast MSE on {what}")
