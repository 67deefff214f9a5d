"""One Markdown report of a runs directory: `python report.py RUNS_DIR`.

Writes report.md (and report_figures/*.png) into RUNS_DIR, or --out: the Findings (each stage's winner and by what
criterion and margin, fine-tuned vs zero-shot vs the best baseline, what did not change beyond the noise), the FLOP
ledger against the budget (log axis), a FLOP section as the coursework reports have it (counting rules, FLOPs per
step per component, per stage and per run with % of the budget, the reconciliation with the seed reports), every
run with its step-0 / best / final validation loss, loss curves, heat maps of the change from step 0, validation
loss against context length on the same positions, and per forecast stage the fine-tuned model, the zero-shot model
and the baselines in one table per species with the loss curve, error against horizon and trajectory plots. A run
or file it cannot read is named in the report and on stderr. See study/report.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from common.fileio import os_error_text
from ledger import LedgerError
from ledger.flags import add_budget_arguments
from study.report import REPORT_NAME, ReportError, write_report
from training.stopping import Interrupted, StopSignals

__all__ = ["REPORT_NAME", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 written, 1 the report could not be written (a read-only or full "
                                       "--out), 2 bad arguments or a runs directory without runs (or with an "
                                       "unreadable FLOP record), 130 / 143 stopped by Ctrl-C / SIGTERM (no "
                                       "temporary file left).")
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
        with StopSignals():  # SIGTERM ends it as Ctrl-C does: each file's temporary copy is removed on the way out
            path = write_report(args.runs_dir, args.out, args.max_flops)
    except (ReportError, LedgerError) as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a read-only or full --out: the files written before stay whole, none is half written
        print(f"report.py: error: {os_error_text(e)}: the report was not written", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as e:
        print(f"report.py: stopped by {e.name}; report.md was not written", file=sys.stderr)
        return e.exit_status
    print(f"report: {path} (figures in {path.parent / 'report_figures'}/)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
