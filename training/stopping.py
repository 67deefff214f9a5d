"""Why a run stops before its last step, other than a bug: a signal (Ctrl-C, or SIGTERM from a scheduler or
`timeout`), or numbers that stopped being numbers (NaN or infinity in the loss, the gradients or the weights)."""
from __future__ import annotations

import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """The run was stopped by signal `signum`. `checkpoint_step`: the step of the checkpoint written on the way out,
    at a step boundary (None: stopped outside the step loop, or by a second signal; the newest checkpoint is then
    whatever was written before); `run_finished`: the signal came during the run's last step or after it, so the
    run finished (weights saved) and the command stops after it. `exit_status` is the shell's convention, 128 + the
    signal number."""

    def __init__(self, signum: int, checkpoint_step: int | None = None, run_finished: bool = False):
        self.signum, self.checkpoint_step = signum, checkpoint_step
        self.run_finished = run_finished  # the signal came at the run's last step: it finished, weights saved
        self.run_dir = None  # the run it stopped, set by train_run: whether that run has a checkpoint at all
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or weight: training cannot go on from it, and nothing of it is saved."""


class StopSignals:
    """SIGINT and SIGTERM during a run, handled alike. Outside the step loop they stop the run at once (raising
    Interrupted, as Ctrl-C raises KeyboardInterrupt). While `deferring` (the step loop), the first one only records
    itself in `signum`: the loop finishes its step, writes a checkpoint and then raises Interrupted, so nothing is
    lost; a second one stops at once. Handlers are installed only in the main thread (the only one Python delivers
    signals to) and the previous ones come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if not self.deferring or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        if signum == signal.SIGINT:  # someone at a terminal: say that it was heard (a step may take a while)
            print("\ntrain.py: stopping after this step, with a checkpoint (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)
