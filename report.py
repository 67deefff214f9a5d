"""One Markdown report of a runs directory: `python report.py RUNS_DIR`.

Writes report.md (and report_figures/*.png) into RUNS_DIR, or --out: the FLOP ledger as a bar against the budget, a
table of every run (settings, steps, best and final validation loss, FLOPs by kind), overlaid loss curves per grid
or study stage, a heat map of best validation loss over lr x rank, validation loss against context length where a
sweep exists, and every forecast's MSE / MAE / medMSE per species against its baselines. See study/report.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.exit_codes import EXIT_OK, EXIT_USAGE
from ledger import LedgerError
from ledger.flags import add_budget_arguments
from study.report import REPORT_NAME, ReportError, write_report

__all__ = ["REPORT_NAME", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 written, 2 bad arguments or a runs directory without runs "
                                       "(or with an unreadable FLOP record).")
    p.add_argument("runs_dir", metavar="RUNS_DIR", type=Path, help="the runs directory (train.py --runs-dir)")
    p.add_argument("--out", type=Path, help="where report.md and report_figures/ go (default: RUNS_DIR)")
    add_budget_arguments(p, max_flops="the budget the ledger is drawn against (default: the study plans', else 1e17)",
                         max_flops_default=None)
    p.add_argument("--seed", type=int, default=None,
                   help="accepted like the other tools' --seed; the report is deterministic and ignores it")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = write_report(args.runs_dir, args.out, args.max_flops)
    except (ReportError, LedgerError) as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report: {path} (figures in {path.parent / 'report_figures'}/)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
