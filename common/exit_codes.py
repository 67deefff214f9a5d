"""The exit statuses of the project's command lines (train.py, forecast.py, flops.py, report.py), by name.

A signal's stop exits with the shell's 128 + the signal number (`training.stopping.Interrupted.exit_status`: 130 for
Ctrl-C, 143 for SIGTERM); EXIT_INTERRUPTED is Ctrl-C's, for a KeyboardInterrupt that carries no signal."""

EXIT_OK = 0
EXIT_FAILED = 1  # the job failed: data, model, checkpoint, a failed write (a full disk), non-finite logits
EXIT_USAGE = 2  # bad arguments, as argparse's own exit status for them
EXIT_OVER_BUDGET = 3  # refused by the FLOP budget or by the ledger's gqa convention
EXIT_DIVERGED = 4  # training diverged (non-finite numbers)
EXIT_INTERRUPTED = 130  # Ctrl-C
