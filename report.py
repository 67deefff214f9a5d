"""One Markdown report of a runs directory: `python report.py RUNS_DIR`.

Writes report.md (and report_figures/*.png) into RUNS_DIR, or --out. Its first line names the model and the data;
every number of its Findings and Conclusions is printed, the same way, in one of its tables. The Findings: each
stage's winner, by which criterion and margin, against the noise measured on that criterion (seed replicates), the
margin split into what step 0 held and what training added where the stage changes the untouched model (the
context length); fine-tuned vs zero-shot vs every baseline it loses to, with paired bootstrap intervals. The
Conclusions: what fine-tuning bought, which settings mattered, what each stage's FLOPs bought, what to try next.
Then the model's architecture and an LLMTIME example, per stage (in the study's order) its runs with their step-0 and
best validation loss on whole windows and on the same last-N positions, loss curves, heat maps, loss against context;
per forecast (a study's, or a plain forecast.py --run / --model one) the fine-tuned model, the zero-shot model and
the baselines per species, the intervals, error against horizon, the error distribution, trajectories; the FLOP
ledger against the budget and a FLOP section as the coursework reports have it. A run or file it cannot read is
named in the report and on stderr, and the rest reported. See reporting/report.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from common.fileio import os_error_text
from ledger import LedgerError
from ledger.flags import add_budget_arguments
from reporting.report import REPORT_NAME, ReportError, write_report
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
