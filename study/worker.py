"""One local job of `train.py --plan P --jobs N`: `python -m study.worker SPEC.json` trains (or resumes) the run its
spec names with `study.jobs.train_job`, and exits as train.py would (0 done, 3 refused by the FLOP budget, 4
diverged, 130/143 stopped by a signal with a checkpoint, 1 any other failure).

A job does not outlive its driver: a watchdog thread looks every second whether the driver (the parent named in
$QWEN_MINI_DRIVER_PID) is still its parent, and when it is gone — killed with kill -9, say, which leaves it no
chance to stop its jobs — sends the job itself a SIGTERM, which stops its run after the step, with a checkpoint."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from common.exit_codes import EXIT_FAILED, EXIT_OK
from training.cli import failure_status

from .jobs import DRIVER_PID, train_job

WATCH_SECONDS = 1.0


def watch_driver(driver_pid: int) -> threading.Thread:
    """Start the watchdog: once this process's parent is no longer `driver_pid` (the driver died and the job was
    handed to another parent), SIGTERM this process, once."""
    def watch():
        while os.getppid() == driver_pid:
            time.sleep(WATCH_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="driver-watchdog", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m study.worker SPEC.json (started by train.py --plan --jobs N)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if os.environ.get(DRIVER_PID, "").isdigit():
        watch_driver(int(os.environ[DRIVER_PID]))
    try:
        train_job(spec)
    except BaseException as e:
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
