"""A forecast's settings (`ForecastConfig`): the one place their defaults are written. forecast.py's flags, the
evaluation protocol (`forecasting.evaluate.Protocol`) and a study plan's [forecast] table all read them."""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.args import MAX_SEED
from common.devices import DTYPES
from common.fields import SettingsError, check_field_types
from data.dataset import DEFAULT_CONTEXT, DEFAULT_HORIZON
from data.llmtime import ScalerNameError, scaling_rule

BASELINES = ("persistence", "seasonal_naive", "untrained", "lv_fit")
# Context steps a baseline needs (others: 1). lv_fit fits a trajectory through its context: one point is no fit.
BASELINE_MIN_CONTEXT = {"lv_fit": 2}
SPLITS = ("train", "val", "test")
DEFAULT_DECIMALS = 2  # LLMTIME decimals of a plain model (a run forecasts with the decimals it trained with)
DEFAULT_MEMORY_GB = 4.0  # what a forecast's generate calls may hold (KV cache, logits): safe on a 24 GiB CPU box
DEFAULT_RUNS_DIR = "runs"  # the ledger a forecast books into when neither --runs-dir nor the run's record names one
# Upper limits past which a value is a typo, refused before anything is counted or loaded (a plan's count of 1e9
# samples would run for hours; a seed past int64 fails in torch after the reservation; 1e300 GB overflows floats):
MAX_SAMPLES = 10_000  # samples per trajectory (LLMTIME draws 20)
MAX_DIGITS = 15  # decimals and integer digits: float64 holds 15-17 significant digits, the rest would be noise
MAX_MEMORY_GB = 2.0 ** 20  # a pebibyte
AUTO = "auto"  # temperature = "auto": chosen on the validation split (forecasting.tuning)
# The temperatures --temperature auto tries by default: LLMTIME's and the seed reports' range (LLMTIME samples at
# 0.7-1.0; the demo's hand pick was 0.5; below 0.3 twenty samples barely differ).
DEFAULT_TEMPERATURE_GRID = (0.3, 0.5, 0.7, 1.0)
MAX_GRID = 20  # temperatures one --temperature auto may try (each is a forecast of the validation split)


class ForecastConfigError(SettingsError):
    """Settings that cannot make a forecast."""


@dataclass(frozen=True)
class ForecastConfig:
    # which trajectories
    split: str = "test"
    limit: int | None = None  # only the first `limit` trajectories of the split
    # the protocol
    context: int = DEFAULT_CONTEXT  # steps in the prompt
    horizon: int = DEFAULT_HORIZON  # steps forecast and scored
    decimals: int | None = None  # None: the run's, else DEFAULT_DECIMALS
    constrained: bool = True  # the number grammar (else only a per-row step counter, and failures are counted)
    int_digits: int = 3  # integer digits the grammar allows per number (scaled values below 1000)
    allow_negative: bool = False  # populations are non-negative
    num_samples: int = 1
    temperature: float | str = 0.0  # 0: greedy; "auto": the grid's best by CRPS on the validation split
    temperature_grid: tuple[float, ...] = DEFAULT_TEMPERATURE_GRID  # what "auto" tries
    calibrate: bool = False  # conformal calibration of the bands on the validation split (forecasting.calibration)
    val_limit: int | None = None  # validation trajectories for auto / calibrate: None = `limit` (None: all)
    scaler: str | None = None  # the LLMTIME scaling rule (data.llmtime.scaling_rule); None: the run's, else p95
    top_p: float | None = None
    seed: int = 0
    baselines: tuple[str, ...] = BASELINES
    # how
    batch: int | None = None  # rows (trajectories x samples) generated together; None: as many as memory_gb holds
    memory_gb: float = DEFAULT_MEMORY_GB  # what one generate call may hold when batch is None
    device: str = "auto"
    dtype: str = "auto"
    jump_forward: bool = False
    compile: bool = False

    def __post_init__(self):
        check_field_types(self, ForecastConfigError)
        object.__setattr__(self, "baselines", tuple(self.baselines))  # a plan's TOML list, kept hashable
        object.__setattr__(self, "temperature_grid", tuple(self.temperature_grid))
        self.validate()

    def validate(self) -> None:
        """The values' rules (their types are checked first): what forecast.py's flags and a plan's [forecast] obey."""
        def at_least(name, low):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ForecastConfigError(f"{name} must be >= {low}, got {value!r}", key=name)

        def at_most(name, high, what=None):
            value = getattr(self, name)
            if value is not None and value > high:
                raise ForecastConfigError(f"{name} must be at most {what or high}, got {value!r}", key=name)

        for name in ("limit", "context", "horizon", "int_digits", "num_samples", "batch", "val_limit"):
            at_least(name, 1)
        for name in ("decimals", "seed"):
            at_least(name, 0)
        at_most("num_samples", MAX_SAMPLES)
        at_most("decimals", MAX_DIGITS)
        at_most("int_digits", MAX_DIGITS)
        at_most("seed", MAX_SEED, "2**63 - 1")
        number = not isinstance(self.temperature, str)
        if not number and self.temperature != AUTO or number and not (math.isfinite(self.temperature)
                                                                       and self.temperature >= 0):
            raise ForecastConfigError(f"temperature must be a finite number >= 0 or \"{AUTO}\", got "
                                      f"{self.temperature!r}", key="temperature")
        grid = self.temperature_grid
        if not grid or len(grid) > MAX_GRID or not all(math.isfinite(t) and t > 0 for t in grid) \
                or len(set(grid)) != len(grid):
            raise ForecastConfigError(f"temperature_grid must be 1 to {MAX_GRID} different finite numbers > 0, got "
                                      f"{list(grid)!r}", key="temperature_grid")
        if self.scaler is not None:
            try:
                object.__setattr__(self, "scaler", scaling_rule(self.scaler).name)  # canonical
            except ScalerNameError as e:
                raise ForecastConfigError(str(e), key="scaler") from None
        if self.split == "val" and (self.auto_temperature or self.calibrate):
            what = "temperature \"auto\"" if self.auto_temperature else "calibrate"
            raise ForecastConfigError(f"{what} is fitted on the validation split, so it cannot forecast the validation "
                                      "split itself: forecast the test split", key="split")
        if not (math.isfinite(self.memory_gb) and 0 < self.memory_gb <= MAX_MEMORY_GB):
            raise ForecastConfigError(f"memory_gb must be a number > 0 and at most {MAX_MEMORY_GB:.0f} (GiB), got "
                                      f"{self.memory_gb!r}", key="memory_gb")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ForecastConfigError(f"top_p must be in (0, 1], got {self.top_p!r}", key="top_p")
        for name, allowed in (("split", SPLITS), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ForecastConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}",
                                          key=name)
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ForecastConfigError(f"baselines: unknown {', '.join(map(repr, unknown))}; choose from "
                                      f"{', '.join(BASELINES)}", key="baselines")
        too_short = [b for b in self.baselines if self.context < BASELINE_MIN_CONTEXT.get(b, 1)]
        if too_short:  # checked before any FLOPs are reserved, not found after the model's forecasts
            needs = max(BASELINE_MIN_CONTEXT[b] for b in too_short)
            raise ForecastConfigError(f"context {self.context} is too short for the baseline {', '.join(too_short)}, "
                                      f"which needs at least {needs} steps: give a longer context or leave "
                                      f"{', '.join(too_short)} out of the baselines", key="context")

    @property
    def auto_temperature(self) -> bool:
        return self.temperature == AUTO
