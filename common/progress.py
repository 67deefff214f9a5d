"""Progress of a long loop (training steps, forecast steps inside a generate call): a tqdm bar on a terminal; in a
log (a file, a pipe, CI) one plain line every tenth of the work or every 30 seconds, whichever comes first, with the
rate and the time left, instead of carriage-return updates that a log shows as one endless line."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LINE_EVERY_FRACTION = 0.1
LINE_EVERY_SECONDS = 30.0


class LineProgress:
    """The part of tqdm's interface the project uses (iterate, update, set_postfix, close, n), written as lines."""

    def __init__(self, iterable=None, *, total=None, initial=0, desc="", unit="it", stream=None, clock=time.monotonic):
        self.iterable, self.total = iterable, total if total is not None else _length(iterable)
        self.n, self.desc, self.unit, self.stream, self.clock = initial, desc, unit, stream or sys.stderr, clock
        self.initial = initial
        self.postfix: dict = {}
        self.started = self.last_time = clock()
        self.last_n = initial
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        step = max(int(self.total * LINE_EVERY_FRACTION), 1) if self.total else None
        due = (step is not None and self.n // step > self.last_n // step) or \
            self.clock() - self.last_time >= LINE_EVERY_SECONDS or (self.total is not None and self.n >= self.total)
        if due:
            self._line()

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._line()
        self.closed = True

    def _line(self) -> None:
        now = self.clock()
        elapsed = now - self.started
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        rate = (self.n - self.initial) / elapsed if elapsed > 0 and self.n > self.initial else None
        speed = f", {rate:.3g} {self.unit}/s" if rate else ""
        eta = f", ETA {max(self.total - self.n, 0) / rate:.0f} s" if rate and self.total is not None else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}{share}, "
              f"{elapsed:.0f} s{speed}{eta}{extra}", file=self.stream, flush=True)
        self.last_time, self.last_n = now, self.n


def _length(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None


def progress_bar(iterable=None, *, total=None, initial=0, desc="", unit="it", disable=False, stream=None):
    """A tqdm bar on a terminal, a LineProgress in a log; `disable` gives a silent tqdm."""
    stream = stream or sys.stderr
    if disable or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=disable,
                    dynamic_ncols=True, file=stream)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, stream=stream)
