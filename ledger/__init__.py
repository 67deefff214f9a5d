"""The FLOP ledger of a runs directory: what every job spent (training, validation, forecasting), reservations of
running jobs under one file lock, and the cap (1e17 FLOPs). Counting itself is `qwen_mini.flops`."""
from .ledger import (LOCK_NAME, BudgetExceeded, Ledger, MixedConventions, OutsideRunsDir, Recorder, Totals, is_inside,
                     recorded_runs_dir, totals)
from .records import (DEFAULT_BUDGET, KINDS, RECORD_NAME, LedgerError, Record, read_record, read_records,
                      record_present)
from .table import format_ledger, record_label, summary

__all__ = ["DEFAULT_BUDGET", "KINDS", "LOCK_NAME", "RECORD_NAME", "BudgetExceeded", "Ledger", "LedgerError",
           "MixedConventions", "OutsideRunsDir", "Record", "Recorder", "Totals", "format_ledger", "is_inside",
           "read_record", "read_records", "record_label", "record_present", "recorded_runs_dir", "summary", "totals"]
