"""The FLOP ledger of a runs directory: every record under it, the cap, reservations under one file lock.

All compute of a study — training steps, validation passes, forecasts (prefill and every decode step, the untrained
baseline's too) — may use `max_flops` (1e17) in all. What counts is every record's spending plus what running
processes have reserved and not yet spent (`Record.committed`).

A job reserves before it starts: under the ledger's lock (`<runs_dir>/.ledger.lock`, held for milliseconds) it sums
the committed FLOPs of every record, refuses with `BudgetExceeded` if its plan does not fit, and otherwise writes its
reservation into its own record before the lock is released, so a second job that starts at the same moment sees
it. While it works it books what it spends (`Recorder.add`, which also lowers what is left of its reservation); at
the end it settles the reservation, and only what it spent keeps counting.

A reservation names the lock its process holds for its whole life (a training run: its run directory's lock; a
forecast: a lock the ledger takes for it). A free lock means a dead process: `settle_dead` (flops.py --runs DIR
--settle) releases such reservations, and a run resumed with --resume takes its own over. A record's paths are data:
a lock is only ever a `*.lock` file beside its record (`records.reservation_lock`), never a symlink, and a record
naming anything else is refused, so a corrupted record cannot make the ledger empty another file by "locking" it.

A runs directory inside another one's ledger (a parent holding `.ledger.lock`) is refused for reservations: the
outer ledger counts its records, and only a reservation made there can keep the outer cap.

Every record of a ledger counts attention the same way (`gqa`: real grouped-query attention, or "mha", the
coursework's multi-head simplification); a job that would mix them is refused with `MixedConventions`. Likewise a
runs directory has one cap (`ledger.cap`: recorded by the first job that reserves with a cap of its own); a job asking
for another is refused with `CapConflict` unless it asks to change it.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from common.fileio import FileLock, LockHeld, os_error_text
from qwen_mini.flop_report import format_flops
from qwen_mini.flops import GQA_MODES

from .cap import CHANGE_FLAG, Cap, read_cap, record_cap
from .records import (
    DEFAULT_BUDGET,
    KINDS,
    RECORD_NAME,
    LedgerError,
    Record,
    count,
    log10_text,
    new_record,
    now,
    read_record,
    read_records,
    record_paths,
    record_present,
    reservation_lock,
    utc_now,
)

LOCK_NAME = ".ledger.lock"
LOCK_WAIT = 60.0  # seconds a job waits for the ledger lock (others hold it for milliseconds)


class BudgetExceeded(RuntimeError):
    """A planned job that does not fit in what is left of the FLOP budget."""


class MixedConventions(RuntimeError):
    """A job whose attention-counting convention differs from the ledger's."""


class CapConflict(MixedConventions):
    """A job whose FLOP cap differs from the one its runs directory recorded (one cap per runs directory, as one gqa
    convention): refused like a mixed convention."""


class OutsideRunsDir(ValueError):
    """A job directory outside the runs directory whose ledger would have to count it."""


def is_inside(path, runs_dir) -> bool:
    return Path(path).resolve().is_relative_to(Path(runs_dir).resolve())


def enclosing_runs_dir(runs_dir) -> Path | None:
    """The nearest directory above `runs_dir` that holds a ledger of its own (its `.ledger.lock`), or None. Every
    record under that one counts in its ledger, so a job that reserves in `runs_dir` alone could overrun its cap."""
    for parent in Path(runs_dir).resolve().parents:
        if (parent / LOCK_NAME).exists() or (parent / LOCK_NAME).is_symlink():
            return parent
    return None


def recorded_runs_dir(record: Record) -> Path | None:
    """The runs directory a record says it was booked under (None: it names none). That path is data: it is used
    only if it holds the record and has a ledger (its `.ledger.lock`); otherwise LedgerError, so a corrupted
    record (`"runs_dir": "/"`) can neither move the job to another ledger nor make it walk the whole file system."""
    named = record.data.get("runs_dir")
    if not named:
        return None
    runs_dir = Path(named)
    if not (runs_dir.is_absolute() and record.run_dir.resolve().is_relative_to(runs_dir.resolve())
            and (runs_dir / LOCK_NAME).is_file()):
        raise LedgerError(f"{record.path}: runs_dir {named!r} is not the runs directory of this record (one that holds "
                          f"it and has a ledger, {LOCK_NAME}); pass --runs-dir")
    return runs_dir


def take_lock(path: Path, what: str, wait: float) -> FileLock:
    """FileLock on `path`, its failures as LedgerError naming the file: held too long, or not a lock file that can be
    opened (a directory, a symlink, no permission)."""
    try:
        return FileLock(path, what=what, wait=wait)
    except LockHeld as e:
        raise LedgerError(f"the {what} stayed locked for {wait:g} s: {e}") from None
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise LedgerError(f"cannot take the {what}'s lock: {os_error_text(e)} (a lock must be a plain file)") from None


@dataclass(frozen=True)
class Totals:
    by_kind: dict[str, int]
    outstanding: int  # reserved by running jobs, not yet spent

    @property
    def spent(self) -> int:
        return sum(self.by_kind.values())

    @property
    def committed(self) -> int:
        return self.spent + self.outstanding


def totals(records: list[Record]) -> Totals:
    by_kind = {kind: sum(r.by_kind[kind] for r in records) for kind in KINDS}
    return Totals(by_kind, sum(r.outstanding for r in records))


class Ledger:
    """The ledger of `runs_dir`. `max_flops`: the cap this job asks for (None: the directory's recorded cap, else
    DEFAULT_BUDGET); one that differs from the recorded cap is refused (CapConflict) when the ledger is drawn on,
    unless `change_max_flops`: then it becomes the directory's cap with the job's reservation."""

    def __init__(self, runs_dir, max_flops=None, lock_wait: float = LOCK_WAIT, *, change_max_flops: bool = False):
        self.runs_dir = Path(runs_dir)
        self.requested = count("max_flops", max_flops) if max_flops is not None else None
        if self.requested == 0:
            raise ValueError("max_flops must be > 0, got 0")
        self.change_max_flops = change_max_flops
        self.lock_wait = lock_wait

    # ---- the cap ----------------------------------------------------------------------------------------------------
    def recorded_cap(self) -> Cap | None:
        """The cap recorded for the runs directory (`ledger.cap`), None when no job has set one."""
        return read_cap(self.runs_dir)

    @property
    def max_flops(self) -> int:
        return self.cap()

    def cap(self) -> int:
        """The cap this job draws on (`max_flops`): the one it asked for, else the recorded one, else DEFAULT_BUDGET.
        CapConflict when it asked for another than the recorded one without `change_max_flops`."""
        recorded = self.recorded_cap()
        if self.requested is None:
            return recorded.max_flops if recorded is not None else DEFAULT_BUDGET
        if recorded is not None and recorded.max_flops != self.requested and not self.change_max_flops:
            raise CapConflict(
                f"{self.runs_dir} has a FLOP cap of {format_flops(recorded.max_flops)} ({recorded.describe()}); this "
                f"job asks for {format_flops(self.requested)} (--max-flops, or a plan's max_flops). A runs directory "
                f"has one cap: leave --max-flops out to follow it, give --max-flops {recorded.max_flops}, or add "
                f"{CHANGE_FLAG} to make {format_flops(self.requested)} the cap (`flops.py --runs {self.runs_dir} "
                f"--max-flops {self.requested} {CHANGE_FLAG}` changes it for every tool)")
        return self.requested

    def cap_source(self) -> str:
        """Where the cap comes from, for a table: recorded (by whom, when), given now, or the default."""
        recorded = self.recorded_cap()
        if recorded is not None and recorded.max_flops == self.max_flops:
            return recorded.describe()
        return "given by --max-flops, not recorded yet" if self.requested is not None else \
            "by default: no job has recorded one for this runs directory"

    def set_cap(self, set_by: str) -> Cap:
        """Record the cap this job asked for as the directory's (flops.py --max-flops N --change-max-flops): refused
        (BudgetExceeded) below what is already spent or reserved, CapConflict without `change_max_flops` when another
        is recorded."""
        if self.requested is None:
            raise ValueError("setting the cap needs --max-flops")
        with self.lock():
            cap, committed, recorded = self.max_flops, self.totals().committed, self.recorded_cap()
            if committed > cap:
                raise BudgetExceeded(f"a cap of {format_flops(cap)} FLOPs is below the {format_flops(committed)} "
                                     f"already spent or reserved in {self.runs_dir}: the cap stays "
                                     f"{format_flops(recorded.max_flops) if recorded else 'unset'}")
            return record_cap(self.runs_dir, cap, set_by)

    def _record_cap(self, set_by: str) -> None:
        """With a reservation (the ledger's lock held): the cap this job asked for becomes the directory's when none
        is recorded, or when it asked to change it."""
        if self.requested is not None and (self.change_max_flops or self.recorded_cap() is None):
            record_cap(self.runs_dir, self.requested, set_by)

    # ---- reading ----------------------------------------------------------------------------------------------------
    def records(self) -> list[Record]:
        return read_records(self.runs_dir)

    def totals(self) -> Totals:
        return totals(self.records())

    def contains(self, path) -> bool:
        return is_inside(path, self.runs_dir)

    def convention(self, requested: str | None = None, records: list[Record] | None = None) -> str:
        """The ledger's gqa convention; `requested` None follows it (real for an empty ledger). Raises
        MixedConventions when `requested` differs from the records' (or the records already disagree)."""
        if requested is not None and requested not in GQA_MODES:
            raise ValueError(f"gqa must be one of {', '.join(GQA_MODES)}, got {requested!r}")
        records = self.records() if records is None else records
        used = sorted({r.gqa for r in records})
        if len(used) > 1:
            by = {mode: [r.run_name for r in records if r.gqa == mode] for mode in used}
            raise MixedConventions(f"the ledger of {self.runs_dir} already mixes gqa conventions ("
                                   + "; ".join(f"{mode}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                                               for mode, names in by.items())
                                   + "); move the runs of one convention to another runs directory")
        if not used:
            return requested or "real"
        if requested is not None and requested != used[0]:
            raise MixedConventions(
                f"the ledger of {self.runs_dir} counts attention with --gqa {used[0]} ({len(records)} record(s)); "
                f"this job asks for --gqa {requested}, and one ledger cannot mix the two. Pass --gqa {used[0]} "
                f"(or leave --gqa out to follow the ledger), or use another --runs-dir for --gqa {requested}")
        return used[0]

    def check(self, planned, records: list[Record] | None = None, per_step_flops=None, what: str = "planned") -> int:
        """Raise BudgetExceeded unless `planned` + everything committed fits `max_flops`; returns what is left after
        it. With `per_step_flops` the message says how many such steps would still fit."""
        planned = count("planned FLOPs", planned)
        cap = self.max_flops
        committed = totals(self.records() if records is None else records).committed
        total = planned + committed
        if total > cap:
            left = max(cap - committed, 0)
            message = (f"{what} {format_flops(planned)} FLOPs + {format_flops(committed)} already spent or reserved "
                       f"in {self.runs_dir} = {format_flops(total)} > budget {format_flops(cap)} "
                       f"(log10: {log10_text(planned)} + {log10_text(committed)} = {log10_text(total)} > "
                       f"{log10_text(cap)}); {format_flops(left)} FLOPs left")
            if per_step_flops:
                per_step = count("per_step_flops", per_step_flops)
                message += f", enough for {left // per_step:,} steps of {format_flops(per_step)} FLOPs"
            raise BudgetExceeded(message)
        return cap - total

    # ---- writing ----------------------------------------------------------------------------------------------------
    def lock(self) -> FileLock:
        return take_lock(self.runs_dir / LOCK_NAME, "FLOP ledger", self.lock_wait)

    def check_not_nested(self) -> None:
        """Refuse (OutsideRunsDir) a runs directory inside another ledger's: that ledger counts every record here,
        and only a reservation made in it can keep its cap."""
        outer = enclosing_runs_dir(self.runs_dir)
        if outer is not None:
            raise OutsideRunsDir(f"--runs-dir {self.runs_dir} lies inside the runs directory {outer}, whose FLOP "
                                 "ledger "
                                 f"({outer / LOCK_NAME}) counts everything under it: pass --runs-dir {outer}, or use a "
                                 "runs directory outside it")

    def recorder(self, record_dir, *, run_name: str, gqa: str | None = None, config: dict | None = None,
                 started: str | None = None) -> Recorder:
        """Book into `record_dir/flops.json` without a reservation (--no-budget). Inside the runs directory the
        record still joins the ledger (and its convention); outside it, nothing here counts it."""
        record_dir = Path(record_dir)
        if self.contains(record_dir):
            with self.lock():
                gqa = self.convention(gqa)
                _started(_load_or_create(record_dir, run_name, gqa, self.runs_dir, config), started).write()
            return Recorder(record_dir, self.runs_dir / LOCK_NAME, None, self.lock_wait)
        gqa = gqa or "real"
        with take_lock(record_dir / LOCK_NAME, "FLOP record", self.lock_wait):
            _started(_load_or_create(record_dir, run_name, gqa, None, config), started).write()
        return Recorder(record_dir, record_dir / LOCK_NAME, None, self.lock_wait)

    def reserve(self, record_dir, flops, *, kind: str, run_name: str, gqa: str | None = None, what: str = "",
                holder_lock=None, config: dict | None = None, planned_flops=None, per_step_flops=None,
                started: str | None = None) -> Recorder:
        """Reserve `flops` for a job booking into `record_dir/flops.json` (inside the runs directory), or raise
        BudgetExceeded / MixedConventions / OutsideRunsDir before anything is written.

        `holder_lock`: a lock file the calling process holds for the job's whole life (a run directory's lock);
        None: the ledger takes one for the reservation (released when it is settled). A reservation of this record
        that names the same lock, or whose lock is free, belongs to a process that is gone: it is taken over (its
        spending stays booked). `planned_flops` (default `flops`) is what the record shows as the job's plan.
        `started` (a training run's start, `records.utc_now()`): written as the record's `started`, and its
        `finished` cleared, with the reservation."""
        record_dir = Path(record_dir)
        if not self.contains(record_dir):
            raise OutsideRunsDir(f"{record_dir} lies outside the runs directory {self.runs_dir}, whose ledger would "
                                 "not "
                                 "count it")
        if record_dir.resolve() == self.runs_dir.resolve():  # its flops.json would sit among the records it totals
            raise OutsideRunsDir(f"{record_dir} is the runs directory itself: a run or a forecast needs a directory "
                                 f"of its own inside it (such as {self.runs_dir / 'name'})")
        flops = count("reserved FLOPs", flops)
        self.check_not_nested()
        self.cap()  # CapConflict before anything is written (and again under the lock, in `check`)
        reservation_id = uuid.uuid4().hex[:12]
        own_lock = None
        if holder_lock is None:
            own_lock = take_lock(record_dir / f".reservation-{reservation_id}.lock", what or f"{kind} job", 0)
            holder_lock = own_lock.path
        holder_lock = Path(holder_lock).resolve()
        if holder_lock.parent != record_dir.resolve():
            raise ValueError(f"the lock of a reservation lives beside its record in {record_dir}, not at {holder_lock}")
        try:
            with self.lock():
                records = self.records()
                gqa = self.convention(gqa, records)
                record = _load_or_create(record_dir, run_name, gqa, self.runs_dir, config)
                record.data["reservations"] = [r for r in record.reservations
                                               if reservation_lock(record.run_dir, r) != holder_lock
                                               and not _holder_gone(record, r)]
                others = [r for r in records if r.path.resolve() != record.path.resolve()]
                self.check(flops, others + [record], per_step_flops=per_step_flops)
                self._record_cap(what or f"a {kind} job in {record_dir}")
                record.reservations.append({"id": reservation_id, "kind": kind, "flops": flops, "spent": 0,
                                            "lock": str(holder_lock), "what": what, "pid": os.getpid(),
                                            "host": socket.gethostname(), "since": now()})
                if planned_flops is not None:
                    record.data["planned_flops"] = count("planned_flops", planned_flops)
                if config is not None:
                    record.data["config"] = config
                _started(record, started)
                record.write()
        except BaseException:
            if own_lock is not None:
                own_lock.release()
                own_lock.path.unlink(missing_ok=True)
            raise
        return Recorder(record_dir, self.runs_dir / LOCK_NAME, reservation_id, self.lock_wait, own_lock)

    def settle_dead(self, drop_untrusted: bool = False) -> list[tuple[Record, dict]]:
        """Release the reservations whose process is gone (their lock is free); what they spent stays booked.
        A reservation whose lock cannot be trusted (a path that is not a `*.lock` file beside its record, or a lock
        there that is not a plain file: a hand-edited, corrupted or moved record) is a LedgerError naming it, unless
        `drop_untrusted` (flops.py --settle --drop-untrusted): then it is dropped too, its lock never opened (no live
        job of this ledger names such a lock). Returns (record, reservation) for each one released; a dropped one
        is marked `"untrusted": True`."""
        released = []
        with self.lock():
            for path in record_paths(self.runs_dir):
                untrusted = [] if drop_untrusted else None
                record = read_record(path, untrusted)
                untrusted, dead = list(untrusted or []), []
                for r in record.reservations:
                    try:
                        if _holder_gone(record, r):
                            dead.append(r)
                    except LedgerError:
                        if not drop_untrusted:
                            raise
                        untrusted.append(r)
                if dead or untrusted:
                    record.data["reservations"] = [r for r in record.reservations if r not in dead + untrusted]
                    _write(record)
                    released += [(record, r) for r in dead] + [(record, {**r, "untrusted": True}) for r in untrusted]
        return released

    def rebuild(self, record_dir, *, run_name: str, gqa: str, by_kind: dict[str, int], step: int, per_step: int,
                evaluations: int, proof: str) -> Record:
        """Write the record of a run whose flops.json is gone, from what the run itself proves it spent (`proof`
        says what): the ledger never forgets spending. Refuses (LedgerError) when a record is there. Outside the
        runs directory (--no-budget) the record is rebuilt all the same, under its own lock, counted in no ledger."""
        record_dir = Path(record_dir)
        inside = self.contains(record_dir)
        with self.lock() if inside else take_lock(record_dir / LOCK_NAME, "FLOP record", self.lock_wait):
            if record_present(record_dir / RECORD_NAME):
                raise LedgerError(f"{record_dir / RECORD_NAME} exists: it is read, not rebuilt")
            record = new_record(record_dir, run_name, gqa, self.runs_dir if inside else None)
            record.add("train", by_kind["train"], steps=step, step=step, per_step_flops=per_step)
            record.add("eval", by_kind["eval"], passes=evaluations)
            record.data["rebuilt"] = {"from": proof, "time": now()}
            _write(record)
        return record


def _load_or_create(record_dir: Path, run_name: str, gqa: str, runs_dir, config) -> Record:
    path = record_dir / RECORD_NAME
    if record_present(path):  # a directory or a dangling symlink there is refused by read_record, not replaced
        record = read_record(path)
        if record.gqa != gqa:
            raise MixedConventions(f"{path} was counted with --gqa {record.gqa}; this job asks for --gqa {gqa}. Pass "
                                   f"--gqa {record.gqa}, or book into another directory")
        return record
    return new_record(record_dir, run_name, gqa, runs_dir, config)


def _started(record: Record, started: str | None) -> Record:
    """A training process starts on the record: its `started` time; `finished` waits for its end."""
    if started is not None:
        record.data["started"] = started
        record.data.pop("finished", None)
    return record


def _holder_gone(record: Record, reservation: dict) -> bool:
    """Whether the process that made `reservation` is gone: the lock it holds for its life can be taken. Only a lock
    file beside the record is ever opened (`reservation_lock`); one that cannot be opened is a LedgerError."""
    path = reservation_lock(record.run_dir, reservation)
    if not path.exists() and not path.is_symlink():
        return True
    try:
        FileLock(path, wait=0).release()
    except LockHeld:
        return False
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise LedgerError(f"{record.path}: the lock of reservation {reservation['id']}: {os_error_text(e)} (a lock "
                          "must be a plain file; `flops.py --runs RUNS_DIR --settle --drop-untrusted` drops that "
                          "reservation)") from None
    if path.name.startswith(".reservation-"):
        path.unlink(missing_ok=True)
    return True


def _write(record: Record) -> None:
    try:
        record.write()
    except OSError as e:
        raise LedgerError(f"cannot write the run record: {os_error_text(e)}") from None


class Recorder:
    """Books one job's FLOPs into its record (under the ledger lock: a reader never sees half a record and two
    writers never lose each other's entries), lowering what is left of its reservation; `settle()` at the end."""

    def __init__(self, record_dir: Path, lock_path: Path, reservation_id: str | None, lock_wait: float,
                 own_lock: FileLock | None = None):
        self.record_dir, self.lock_path, self.reservation_id = Path(record_dir), Path(lock_path), reservation_id
        self.lock_wait, self._own_lock = lock_wait, own_lock
        self.spent = 0

    @property
    def path(self) -> Path:
        return self.record_dir / RECORD_NAME

    def _locked(self) -> FileLock:
        return take_lock(self.lock_path, "FLOP ledger", self.lock_wait)

    def add(self, kind: str, flops, **details) -> None:
        """Book `flops` of `kind` (see `Record.add` for the details each kind takes)."""
        with self._locked():
            record = read_record(self.path)
            record.add(kind, flops, self.reservation_id, **details)
            record.write()
        self.spent += flops

    def settle(self, finished: bool = False) -> None:
        """End the reservation: from now on only what the job spent counts. Safe to call twice. `finished`: the job
        did all its work; the record's `finished` gets the time (UTC, ISO 8601)."""
        if self.reservation_id is not None or finished:
            with self._locked():
                record = read_record(self.path)
                record.data["reservations"] = [r for r in record.reservations if r["id"] != self.reservation_id]
                if finished:
                    record.data["finished"] = utc_now()
                record.write()
            self.reservation_id = None
        if self._own_lock is not None:
            self._own_lock.release()
            self._own_lock.path.unlink(missing_ok=True)
            self._own_lock = None

    def discard(self) -> None:
        """End a job that failed before it did any work (its model or data would not load): its reservation goes, and
        so does its record when it holds nothing else (no spending, no other job's reservation), so a failed start
        leaves no trace that could block a rerun or fix the ledger's gqa convention. Otherwise: `settle`."""
        if self.reservation_id is not None and self.spent == 0:
            with self._locked():
                record = read_record(self.path)
                others = [r for r in record.reservations if r["id"] != self.reservation_id]
                if not others and record.flops_used == 0 and not record.forecasts and not record.steps_done:
                    self.path.unlink()
                    self.reservation_id = None
        self.settle()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.settle()
