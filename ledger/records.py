"""Ledger records: one `flops.json` per job directory (a training run, or the home of plain-model forecasts).

A record holds what its job spent, by kind, and the reservations of the processes working for it:

    {"version": 2, "run_name": "...", "gqa": "real", "runs_dir": "/abs/runs",
     "flops_used": 123, "by_kind": {"train": 100, "eval": 20, "forecast": 3},
     "train": {"steps": 10, "per_step_flops": 10, "step": 10},       # steps run (a resumed run's redone steps too)
     "eval": {"passes": 2, "windows": 16},
     "forecasts": [{"label": "model", "out": "/abs/out", "trajectories": 5, "prefill_tokens": ..., "flops": 3}],
     "reservations": [{"id": "...", "kind": "train", "flops": 130, "spent": 123, "lock": "/abs/run.lock", ...}],
     "planned_flops": 130, "config": {...}, "updated": "..."}

A reservation is FLOPs promised to a process that is still working: it counts against the budget until the process
settles it (then only what it spent counts). Version-1 records (training FLOPs only, counted with real GQA) are read
as such.
"""
from __future__ import annotations

import json
import math
import operator
import time
from dataclasses import dataclass
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


def read_record(path: Path) -> Record:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LedgerError(f"{path}: unreadable run record ({e}); fix or remove it, the ledger cannot skip a run's "
                          "spending") from None
    if not isinstance(raw, dict):
        raise LedgerError(f"{path}: a run record must be a JSON object, got {type(raw).__name__}")
    try:
        return Record(path, _normalise(raw))
    except (KeyError, TypeError, ValueError) as e:
        raise LedgerError(f"{path}: {e}") from None


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
    data["run_name"] = str(data["run_name"])
    by_kind = data.get("by_kind") or {}
    data["by_kind"] = {kind: count(f"by_kind.{kind}", by_kind.get(kind, 0)) for kind in KINDS}
    data.setdefault("train", {})
    data.setdefault("eval", {})
    data["forecasts"] = list(data.get("forecasts") or [])
    data["reservations"] = [dict(r, flops=count("reservation flops", r["flops"]),
                                 spent=count("reservation spent", r.get("spent", 0)))
                            for r in data.get("reservations") or []]
    if data.get("gqa", "real") not in ("real", "mha"):
        raise ValueError(f"gqa must be real or mha, got {data['gqa']!r}")
    if not isinstance(data.get("config"), dict):
        data["config"] = {}
    return data


def read_records(runs_dir) -> list[Record]:
    """Every `flops.json` under `runs_dir` (any depth), sorted by run name then path. No directory: no runs yet."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        return []
    if not runs_dir.is_dir():
        raise LedgerError(f"{runs_dir}: not a directory (expected the directory that holds the training runs)")
    records = [read_record(path) for path in runs_dir.rglob(RECORD_NAME) if path.is_file()]
    return sorted(records, key=lambda record: (record.run_name, str(record.path)))
