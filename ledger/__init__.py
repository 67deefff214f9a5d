"""The FLOP ledger of a runs directory: what every job spent (training, validation, forecasting), reservations of
running jobs under one file lock, and the cap (one per runs directory: 1e17 FLOPs unless a job records another).
Counting itself is `qwen_mini.flops`."""
from .cap import CAP_NAME, Cap, read_cap
from .ledger import (
                     LOCK_NAME,
                     BudgetExceeded,
                     CapConflict,
                     Ledger,
                     MixedConventions,
                     OutsideRunsDir,
                     Recorder,
                     Totals,
                     is_inside,
                     recorded_runs_dir,
                     totals,
)
from .records import DEFAULT_BUDGET, KINDS, RECORD_NAME, LedgerError, Record, read_record, read_records, record_present
from .table import format_ledger, record_label, summary

__all__ = ["CAP_NAME", "DEFAULT_BUDGET", "KINDS", "LOCK_NAME", "RECORD_NAME", "BudgetExceeded", "Cap", "CapConflict",
           "Ledger", "LedgerError", "MixedConventions", "OutsideRunsDir", "Record", "Recorder", "Totals",
           "format_ledger", "is_inside", "read_cap", "read_record", "read_records", "record_label", "record_present",
           "recorded_runs_dir", "summary", "totals"]
