"""Forecasting Lotka-Volterra series with a (fine-tuned) Qwen: grammar-constrained batched generation, metrics on
original units, baselines (persistence, the untrained model, a Lotka-Volterra fit) and plots, with their settings in
one dataclass (`ForecastConfig`). forecast.py is the command line over these (`forecasting.cli`)."""
from .baselines import LVFit, fit_lotka_volterra, lotka_volterra_forecast, lotka_volterra_path, persistence
from .config import BASELINES, ForecastConfig
from .evaluate import Evaluation, Protocol, Selection, evaluate, format_table, select_trajectories, write_outputs
from .forecast import Forecast, GenerationStats, forecast_examples
from .grammar import NumberGrammar, StepCounter, max_forecast_tokens, single_token_ids
from .metrics import forecast_metrics, per_trajectory_errors
from .scores import read_samples, scores_from_samples
from .source import ForecastSource, from_model, from_run

__all__ = ["BASELINES", "Evaluation", "Forecast", "ForecastConfig", "ForecastSource", "GenerationStats", "LVFit",
           "NumberGrammar", "Protocol", "Selection", "StepCounter", "evaluate", "fit_lotka_volterra",
           "forecast_examples", "forecast_metrics", "format_table", "from_model", "from_run", "lotka_volterra_forecast",
           "lotka_volterra_path", "max_forecast_tokens", "per_trajectory_errors", "persistence", "read_samples",
           "scores_from_samples", "select_trajectories", "single_token_ids", "write_outputs"]
