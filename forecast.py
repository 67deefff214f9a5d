"""Forecast Lotka-Volterra trajectories with a trained run (or a plain model) and compare with baselines:
`python forecast.py --help`.

The command line is `forecasting.cli`; its settings and their defaults `forecasting.config.ForecastConfig`; the
evaluation `forecasting.evaluate`, under the FLOP ledger `forecasting.budget`.
"""
import sys

try:  # importing torch takes seconds: a Ctrl-C then gets the line a Ctrl-C gets later, not a traceback
    import forecasting.cli
except KeyboardInterrupt:
    print("error: stopped by SIGINT while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def main(argv: list[str] | None = None) -> int:
    return forecasting.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
