"""The FLOP cap of a runs directory: one cap per directory, recorded in `<runs_dir>/ledger.json` by the first job
that reserves with a cap of its own (a plan's `max_flops`, or a command line's `--max-flops`).

A job that gives no cap follows the recorded one (else the default, 1e17); a job that gives the recorded one goes on;
a job that gives another is refused (`ledger.CapConflict`) unless it asks to change the cap explicitly
(`--change-max-flops`), so a plan's 4e10 cannot be overrun by a plain `forecast.py` that would otherwise draw on 1e17.
A change is recorded with the cap it replaced, so the file says how the cap came to be what it is.

    {"max_flops": 40000000000, "set_by": "train.py runs/s/grid/r", "time": "...",
     "changes": [{"max_flops": 100000000000000000, "set_by": "...", "time": "...", "replaced": "..."}]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.fileio import os_error_text, write_json_atomic

from .records import LedgerError, count, now

CAP_NAME = "ledger.json"
CHANGE_FLAG = "--change-max-flops"


@dataclass(frozen=True)
class Cap:
    """A runs directory's recorded cap: how many FLOPs, which job set it and when, the caps it replaced."""
    max_flops: int
    set_by: str
    time: str
    path: Path
    changes: list = field(default_factory=list)

    def describe(self) -> str:
        return f"recorded in {self.path} by {self.set_by or 'a job'} at {self.time or 'an unknown time'}"


def cap_path(runs_dir) -> Path:
    return Path(runs_dir) / CAP_NAME


def read_cap(runs_dir) -> Cap | None:
    """The cap recorded for `runs_dir`, None when none is. A file that cannot be read is a LedgerError naming it: the
    ledger does not guess a cap."""
    path = cap_path(runs_dir)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON object, not {type(raw).__name__}")
        changes = raw.get("changes", [])
        if not isinstance(changes, list):
            raise ValueError("changes must be a list")
        return Cap(count("max_flops", raw.get("max_flops")), str(raw.get("set_by", "")), str(raw.get("time", "")),
                   path, changes)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise LedgerError(f"{path}: unreadable FLOP cap of {path.parent} ({what}); fix it, or remove it and pass "
                          "--max-flops to record the cap again") from None


def record_cap(runs_dir, max_flops: int, set_by: str) -> Cap:
    """Write `max_flops` as the cap of `runs_dir` (under the ledger's lock: the caller holds it), keeping the one it
    replaces in `changes`. Returns the cap now recorded."""
    previous = read_cap(runs_dir)
    if previous is not None and previous.max_flops == max_flops:
        return previous
    changes = list(previous.changes) if previous is not None else []
    if previous is not None:
        changes.append({"max_flops": previous.max_flops, "set_by": previous.set_by, "time": previous.time,
                        "replaced": now()})
    path, time = cap_path(runs_dir), now()
    try:
        write_json_atomic(path, {"max_flops": max_flops, "set_by": set_by, "time": time, "changes": changes})
    except OSError as e:
        raise LedgerError(f"cannot record the FLOP cap: {os_error_text(e)}") from None
    return Cap(max_flops, set_by, time, path, changes)
