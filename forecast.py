"""Forecast Lotka-Volterra trajectories with a trained run (or a plain model) and compare with baselines:
`python forecast.py --help`.

The command line is `forecasting.cli`; its settings and their defaults `forecasting.config.ForecastConfig`; the
evaluation `forecasting.evaluate`, under the FLOP ledger `forecasting.budget`.
"""
import sys

import forecasting.cli


def main(argv: list[str] | None = None) -> int:
    return forecasting.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
