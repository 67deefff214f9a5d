"""Ledger records: one `flops.json` per job directory (a training run, or the home of plain-model forecasts).

A record holds what its job spent, by kind, and the reservations of the processes working for it:

    {"version": 2, "run_name": "...", "gqa": "real", "runs_dir": "/abs/runs",
     "flops_used": 123, "by_kind": {"train": 100, "eval": 20, "forecast": 3},
     "train": {"steps": 10, "per_step_flops": 10, "step": 10},       # steps run (a resumed run's redone steps too)
     "eval": {"passes": 2, "windows": 16},
     "forecasts": [{"label": "model", "out": "/abs/out", "trajectories": 5, "prefill_tokens": ..., "flops": 3}],
     "reservations": [{"id": "...", "kind": "train", "flops": 130, "spent": 123, "lock": "/abs/run.lock", ...}],
     "planned_flops": 130, "config": {...}, "updated": "...",
     "started": "2026-01-01T12:00:00+00:00", "finished": "2026-01-01T12:05:00+00:00"}  # training runs, UTC

`started` is when the latest training process of the run began (written with its reservation), `finished` when a
training process ended with every step done (absent while it trains, or when it stopped early). Records written
before these existed have neither.

A reservation is FLOPs promised to a process that is still working: it counts against the budget until the process
settles it (then only what it spent counts). Version-1 records (training FLOPs only, counted with real GQA) are read
as such.
"""
from __future__ import annotations

import json
import math
import operator
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.fileio import write_json_atomic
from qwen_mini.flop_report import log10

RECORD_NAME = "flops.json"
RECORD_VERSION = 2
KINDS = ("train", "eval", "forecast")
# Counts of a forecast entry that add up over its batches (booked one generate call at a time, under one "entry" id).
FORECAST_COUNTS = ("calls", "prefill_tokens", "decode_tokens", "prefill_flops", "decode_flops")
DEFAULT_BUDGET = 10**17


class LedgerError(ValueError):
    """A run record that cannot be read: the ledger refuses to guess what that run spent."""


def log10_text(flops: int) -> str:
    return f"{log10(flops):.2f}" if flops > 0 else "-"


def count(name: str, value) -> int:
    """A non-negative whole number of FLOPs or steps (ints, numpy ints, or integral floats such as 3e16)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def utc_now() -> str:
    """Wall-clock time in ISO 8601, UTC, to the second: a record's `started` and `finished`."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Record:
    """One `flops.json`, as a JSON dict plus the properties the ledger sums."""
    path: Path
    data: dict

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def run_name(self) -> str:
        return self.data["run_name"]

    @property
    def gqa(self) -> str:
        return self.data.get("gqa", "real")

    @property
    def by_kind(self) -> dict[str, int]:
        return {kind: self.data["by_kind"].get(kind, 0) for kind in KINDS}

    @property
    def flops_used(self) -> int:
        return sum(self.by_kind.values())

    @property
    def reservations(self) -> list[dict]:
        return self.data.setdefault("reservations", [])

    @property
    def outstanding(self) -> int:
        """FLOPs reserved and not yet spent by the processes still working for this record."""
        return sum(max(r["flops"] - r["spent"], 0) for r in self.reservations)

    @property
    def committed(self) -> int:
        """What counts against the budget: spent + still reserved."""
        return self.flops_used + self.outstanding

    @property
    def steps_done(self) -> int:
        return self.data["train"].get("step", 0)

    @property
    def per_step_flops(self) -> int:
        return self.data["train"].get("per_step_flops", 0)

    @property
    def planned_flops(self) -> int:
        return self.data.get("planned_flops", 0)

    @property
    def config(self) -> dict:
        return self.data.get("config") or {}

    @property
    def forecasts(self) -> list[dict]:
        return self.data.setdefault("forecasts", [])

    def add(self, kind: str, flops: int, reservation: str | None = None, **details) -> None:
        """Book `flops` of `kind`. train: details steps (run this time), step (the run's step), per_step_flops;
        eval: passes, windows; forecast: the forecast's entry (label, out, trajectories, tokens...); a later add with
        the same `entry` id adds its FORECAST_COUNTS and FLOPs to that entry."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        flops = count("flops", flops)
        self.data["by_kind"][kind] = self.data["by_kind"].get(kind, 0) + flops
        if kind == "forecast":
            entry = next((e for e in self.forecasts if "entry" in details and e.get("entry") == details["entry"]),
                         None)
            if entry is None:
                self.forecasts.append({**details, "flops": flops, "time": now()})
            else:  # one more batch of the same forecast: its counts add up
                for key, value in details.items():
                    entry[key] = entry.get(key, 0) + value if key in FORECAST_COUNTS else value
                entry["flops"] += flops
                entry["time"] = now()
        else:
            section = self.data[kind]
            for key, value in details.items():
                if key in ("step", "per_step_flops"):
                    section[key] = value
                else:
                    section[key] = section.get(key, 0) + value
        if reservation is not None:
            self.reservation(reservation)["spent"] += flops

    def reservation(self, reservation_id: str) -> dict:
        for r in self.reservations:
            if r["id"] == reservation_id:
                return r
        raise LedgerError(f"{self.path}: reservation {reservation_id} is gone (settled by `flops.py --settle` while "
                          "its process was still running?)")

    def write(self) -> Path:
        self.data["version"] = RECORD_VERSION
        self.data["flops_used"] = self.flops_used
        self.data["log10_flops_used"] = round(log10(self.flops_used), 4) if self.flops_used else None
        self.data["updated"] = now()
        return write_json_atomic(self.path, self.data)


def new_record(run_dir, run_name: str, gqa: str, runs_dir, config: dict | None = None) -> Record:
    if not isinstance(run_name, str) or not run_name:
        raise ValueError(f"run_name must be a non-empty string, got {run_name!r}")
    data = {"version": RECORD_VERSION, "run_name": run_name, "gqa": gqa,
            "runs_dir": str(Path(runs_dir).resolve()) if runs_dir is not None else None,
            "flops_used": 0, "by_kind": {kind: 0 for kind in KINDS}, "train": {"steps": 0, "step": 0},
            "eval": {"passes": 0, "windows": 0}, "forecasts": [], "reservations": [], "planned_flops": 0,
            "config": config or {}}
    return Record(Path(run_dir) / RECORD_NAME, data)


def record_present(path) -> bool:
    """Whether something is at a record's path: a file, but also a directory or a dangling symlink, which the ledger
    must refuse (read_record) rather than count as no spending."""
    path = Path(path)
    return path.exists() or path.is_symlink()


def read_record(path: Path, untrusted: list | None = None) -> Record:
    """The record at `path`, or LedgerError naming it and its fault. A reservation whose lock path is not trusted
    (`reservation_lock`) is such a fault, unless `untrusted` is a list: then the reservation is left out of the
    record and put there (what `flops.py --settle --drop-untrusted` drops; the record's spending stays)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise LedgerError(f"{path}: unreadable run record ({what}); fix or remove it, the ledger cannot skip a run's "
                          "spending") from None
    if not isinstance(raw, dict):
        raise LedgerError(f"{path}: a run record must be a JSON object, got {type(raw).__name__}")
    try:
        data = _normalise(raw)
        kept = []
        for i, reservation in enumerate(data["reservations"]):
            try:
                reservation_lock(path.parent, reservation, f"reservations[{i}]")
                kept.append(reservation)
            except ValueError:
                if untrusted is None:
                    raise
                untrusted.append(reservation)
        data["reservations"] = kept
    except (KeyError, TypeError, ValueError) as e:
        raise LedgerError(f"{path}: {e}") from None
    return Record(path, data)


def reservation_lock(record_dir: Path, reservation: dict, where: str = "reservation") -> Path:
    """The lock file of a reservation: a `*.lock` file in the record's own directory. The path a record names is data
    (a hand-edited or corrupted record may name any file, and taking a lock empties its file), so anything else is
    refused (ValueError) and never opened."""
    named = reservation["lock"]
    lock = Path(named)
    if (not lock.is_absolute() or not lock.name.endswith(".lock") or lock.name.startswith("..")
            or os.path.normpath(lock) != str(lock) or lock.parent.resolve() != Path(record_dir).resolve()):
        raise ValueError(f"{where}.lock {named!r} is not a lock file of this record (a *.lock file in "
                         f"{Path(record_dir).resolve()}); a record's paths are not trusted: `flops.py --runs RUNS_DIR "
                         "--settle --drop-untrusted` drops that reservation (what it spent stays booked)")
    return Path(record_dir).resolve() / lock.name


def _mapping(name: str, value, default: dict) -> dict:
    if value is None:
        return dict(default)
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__} {_short(value)}")
    return dict(value)


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _counts(name: str, section: dict, keys) -> dict:
    return {**section, **{key: count(f"{name}.{key}", section[key]) for key in keys if key in section}}


def _reservation(i: int, r) -> dict:
    where = f"reservations[{i}]"
    if not isinstance(r, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(r).__name__} {_short(r)}")
    for key in ("id", "lock"):
        if not isinstance(r.get(key), str) or not r[key]:
            raise ValueError(f"{where}.{key} must be a non-empty string, got {_short(r.get(key))}")
    if "flops" not in r:
        raise ValueError(f"{where} has no flops")
    return dict(r, flops=count(f"{where}.flops", r["flops"]), spent=count(f"{where}.spent", r.get("spent", 0)))


def _normalise(raw: dict) -> dict:
    """A version-2 dict with every count checked; a version-1 record (training only, real GQA) converted."""
    if "run_name" not in raw:
        raise ValueError("run record without run_name")
    if raw.get("version", 1) < 2:
        if "flops_used" not in raw:
            raise ValueError("run record without flops_used")
        used = count("flops_used", raw["flops_used"])
        return {**raw, "version": RECORD_VERSION, "gqa": "real", "by_kind": {"train": used, "eval": 0, "forecast": 0},
                "train": {"steps": count("steps_done", raw.get("steps_done", 0)),
                          "step": count("steps_done", raw.get("steps_done", 0)),
                          "per_step_flops": count("per_step_flops", raw.get("per_step_flops", 0))},
                "eval": {"passes": 0, "windows": 0}, "forecasts": [], "reservations": [],
                "planned_flops": count("planned_flops", raw.get("planned_flops", 0)),
                "config": raw.get("config") if isinstance(raw.get("config"), dict) else {}}
    data = dict(raw)
    if not isinstance(data["run_name"], str) or not data["run_name"]:
        raise ValueError(f"run_name must be a non-empty string, got {_short(data['run_name'])}")
    by_kind = _mapping("by_kind", data.get("by_kind"), {})
    data["by_kind"] = {kind: count(f"by_kind.{kind}", by_kind.get(kind, 0)) for kind in KINDS}
    data["train"] = _counts("train", _mapping("train", data.get("train"), {}), ("steps", "step", "per_step_flops"))
    data["eval"] = _counts("eval", _mapping("eval", data.get("eval"), {}), ("passes", "windows"))
    forecasts = data.get("forecasts") or []
    if not isinstance(forecasts, list) or not all(isinstance(f, dict) for f in forecasts):
        raise ValueError(f"forecasts must be a list of JSON objects, got {_short(forecasts)}")
    data["forecasts"] = list(forecasts)
    reservations = data.get("reservations") or []
    if not isinstance(reservations, list):
        raise ValueError(f"reservations must be a list, got {type(reservations).__name__} {_short(reservations)}")
    data["reservations"] = [_reservation(i, r) for i, r in enumerate(reservations)]
    if data.get("runs_dir") is not None and not isinstance(data["runs_dir"], str):
        raise ValueError(f"runs_dir must be a path (a string), got {_short(data['runs_dir'])}")
    if "planned_flops" in data:
        data["planned_flops"] = count("planned_flops", data["planned_flops"] or 0)
    if data.get("gqa", "real") not in ("real", "mha"):
        raise ValueError(f"gqa must be real or mha, got {_short(data['gqa'])}")
    if not isinstance(data.get("config"), dict):
        data["config"] = {}
    return data


def read_records(runs_dir, unreadable: list | None = None) -> list[Record]:
    """Every `flops.json` under `runs_dir` (any depth), sorted by run name then path. No directory: no runs yet.
    A record that cannot be read is a LedgerError (the budget cannot skip a run's spending), unless `unreadable` is a
    list (a report, which names what it leaves out): then its message goes there and the other records are read."""
    records = []
    for path in record_paths(runs_dir):
        try:
            records.append(read_record(path))
        except LedgerError as e:
            if unreadable is None:
                raise
            unreadable.append(str(e))
    return sorted(records, key=lambda record: (record.run_name, str(record.path)))


def record_paths(runs_dir) -> list[Path]:
    """Every entry named flops.json under `runs_dir` (none if it does not exist yet): files, but also directories and
    dangling symlinks (which read_record refuses); a directory that cannot be listed is a LedgerError, not a run
    skipped."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        return []
    if not runs_dir.is_dir():
        raise LedgerError(f"{runs_dir}: not a directory (expected the directory that holds the training runs)")

    def unreadable(e: OSError):
        raise LedgerError(f"{e.filename}: cannot list it ({e.strerror}); the ledger cannot skip the runs in it")
    return [Path(top) / RECORD_NAME for top, dirs, files in os.walk(runs_dir, onerror=unreadable)
            if RECORD_NAME in files or RECORD_NAME in dirs]
