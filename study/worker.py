"""One local job of `train.py --plan P --jobs N`: `python -m study.worker SPEC.json` trains (or resumes) the run its
spec names with `study.jobs.train_job`, and exits as train.py would (0 done, 3 refused by the FLOP budget, 4
diverged, 130/143 stopped by a signal with a checkpoint, 1 any other failure)."""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from common.exit_codes import EXIT_FAILED, EXIT_OK
from training.cli import failure_status

from .jobs import train_job


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m study.worker SPEC.json (started by train.py --plan --jobs N)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    try:
        train_job(spec)
    except BaseException as e:  # noqa: BLE001 (train.py's one line and exit status; a bug's traceback to the log)
        status = failure_status(e, f"train.py: {spec['run']}", "the same train.py --plan command")
        if isinstance(e, SystemExit):
            raise
        if status is None:
            traceback.print_exc()
            return EXIT_FAILED
        return status
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
