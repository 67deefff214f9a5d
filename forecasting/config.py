"""A forecast's settings (`ForecastConfig`): the one place their defaults are written. forecast.py's flags, the
evaluation protocol (`forecasting.evaluate.Protocol`) and a study plan's [forecast] table all read them."""
from __future__ import annotations

from dataclasses import dataclass

from data.dataset import DEFAULT_CONTEXT, DEFAULT_HORIZON

BASELINES = ("persistence", "seasonal_naive", "untrained", "lv_fit")
DEFAULT_DECIMALS = 2  # LLMTIME decimals of a plain model (a run forecasts with the decimals it trained with)
DEFAULT_RUNS_DIR = "runs"  # the ledger a forecast books into when neither --runs-dir nor the run's record names one


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
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int = 0
    baselines: tuple[str, ...] = BASELINES
    # how
    batch: int = 32  # rows (trajectories x samples) generated together
    device: str = "auto"
    dtype: str = "auto"
    jump_forward: bool = False
    compile: bool = False

    def __post_init__(self):
        object.__setattr__(self, "baselines", tuple(self.baselines))  # a plan's TOML list, kept hashable
