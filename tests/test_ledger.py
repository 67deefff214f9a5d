"""The FLOP ledger (ledger/): records by kind, reservations under the lock, the cap, conventions, settling."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ledger import (
    BudgetExceeded,
    Ledger,
    LedgerError,
    MixedConventions,
    OutsideRunsDir,
    format_ledger,
    read_record,
    read_records,
    summary,
)

ROOT = Path(__file__).resolve().parents[1]


def book(runs, name, gqa=None, **by_kind):
    recorder = Ledger(runs).recorder(runs / name, run_name=Path(name).name, gqa=gqa)
    for kind, flops in by_kind.items():
        recorder.add(kind, flops)
    return recorder


def test_records_are_found_recursively_and_summed_by_kind(tmp_path):
    runs = tmp_path / "runs"
    book(runs, "grid/a", train=5 * 10**16, eval=3)
    book(runs, "b", train=3 * 10**16 + 1, forecast=12_345)
    records = read_records(runs)
    assert [r.run_name for r in records] == ["a", "b"]
    totals = summary(records, 10**17)
    assert totals["by_kind"] == {"train": 8 * 10**16 + 1, "eval": 3, "forecast": 12_345}
    assert totals["total"] == 80_000_000_000_012_349 and totals["remaining"] == 10**17 - totals["total"]
    assert not list(runs.rglob("*.tmp"))  # atomic writes leave nothing behind


def test_version_1_records_are_training_counted_with_real_gqa(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "flops.json").write_text(json.dumps(
        {"version": 1, "run_name": "old", "flops_used": 700, "per_step_flops": 100, "steps_done": 7}))
    (record,) = read_records(tmp_path)
    assert record.by_kind == {"train": 700, "eval": 0, "forecast": 0} and record.gqa == "real"
    assert record.steps_done == 7 and record.per_step_flops == 100
    with pytest.raises(MixedConventions, match="counts attention with --gqa real"):
        Ledger(tmp_path).convention("mha")


def test_reservation_counts_until_settled_and_the_cap_is_exact(tmp_path):
    ledger = Ledger(tmp_path, max_flops=1000)
    book(tmp_path, "done", train=300)
    job = ledger.reserve(tmp_path / "job", 500, kind="train", run_name="job")
    assert ledger.totals().committed == 800 and ledger.totals().spent == 300
    with pytest.raises(BudgetExceeded) as refused:
        ledger.reserve(tmp_path / "other", 201, kind="train", run_name="other", per_step_flops=50)
    assert "planned 201 FLOPs + 800 already spent or reserved" in str(refused.value)
    assert "200 FLOPs left, enough for 4 steps of 50 FLOPs" in str(refused.value)
    assert not (tmp_path / "other" / "flops.json").exists()  # a refused job writes no record
    job.add("train", 120, steps=1, step=1, per_step_flops=120)
    job.add("eval", 30, passes=1, windows=4)
    assert ledger.totals().committed == 800  # spending comes out of the reservation
    record = read_record(tmp_path / "job" / "flops.json")
    assert record.reservations[0]["spent"] == 150 and record.data["eval"] == {"passes": 1, "windows": 4}
    job.settle()
    assert ledger.totals().committed == 450  # only what it spent counts now
    assert ledger.reserve(tmp_path / "other", 550, kind="train", run_name="other").spent == 0  # exactly fits


def test_forecast_batches_add_up_in_one_entry(tmp_path):
    job = Ledger(tmp_path).reserve(tmp_path / "run", 100, kind="forecast", run_name="run")
    for tokens in (10, 20):
        job.add("forecast", tokens, entry="e1", label="model", calls=1, prefill_tokens=tokens, decode_tokens=1)
    job.add("forecast", 5, entry="e2", label="untrained", calls=1, prefill_tokens=5, decode_tokens=0)
    job.settle()
    (first, second) = read_record(tmp_path / "run" / "flops.json").forecasts
    assert (first["label"], first["calls"], first["prefill_tokens"], first["flops"]) == ("model", 2, 30, 30)
    assert (second["label"], second["flops"]) == ("untrained", 5)


def test_conventions_cannot_mix(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.convention(None) == "real"  # an empty ledger: real unless asked
    book(tmp_path, "a", gqa="mha", train=1)
    assert ledger.convention(None) == "mha"
    with pytest.raises(MixedConventions) as refused:
        ledger.reserve(tmp_path / "b", 1, kind="train", run_name="b", gqa="real")
    assert "counts attention with --gqa mha" in str(refused.value)
    assert "Pass --gqa mha" in str(refused.value) and "another --runs-dir" in str(refused.value)


def test_jobs_outside_the_runs_directory_are_refused(tmp_path):
    with pytest.raises(OutsideRunsDir, match="outside the runs directory"):
        Ledger(tmp_path / "runs").reserve(tmp_path / "elsewhere", 1, kind="train", run_name="x")
    # --no-budget: booked in its own record, in no ledger
    Ledger(tmp_path / "runs").recorder(tmp_path / "elsewhere", run_name="x").add("train", 7)
    assert read_records(tmp_path / "runs") == [] and read_record(tmp_path / "elsewhere" / "flops.json").flops_used == 7


def test_unreadable_record_is_an_error_not_a_skip(tmp_path):
    book(tmp_path, "good", train=10)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "flops.json").write_text("{not json")
    with pytest.raises(LedgerError, match=r"bad/flops.json: unreadable run record"):
        Ledger(tmp_path).totals()
    (tmp_path / "bad" / "flops.json").write_text(json.dumps({"version": 2, "run_name": "bad",
                                                             "by_kind": {"train": -5}}))
    with pytest.raises(LedgerError, match="must be >= 0"):
        read_records(tmp_path)


def test_ledger_table(tmp_path):
    book(tmp_path, "a", train=3 * 10**16, eval=10**14)
    job = Ledger(tmp_path).reserve(tmp_path / "b", 2 * 10**16, kind="train", run_name="b")
    text = format_ledger(read_records(tmp_path), 10**17)
    line_a = next(line for line in text.splitlines() if line.startswith("a "))
    assert "3.0e16" in line_a and "1.0e14" in line_a and "3.01e16" in line_a
    assert "reserved     2.0e16  by running jobs" in text and "remaining   4.99e16" in text
    job.settle()
    assert "OVER BUDGET by" in format_ledger(read_records(tmp_path), 10**16)


RESERVE_AND_DIE = """
import os, sys, time
from ledger import Ledger
job = Ledger(sys.argv[1]).reserve(sys.argv[2], int(sys.argv[3]), kind="train",
                                  run_name=os.path.basename(sys.argv[2]), what="test")
job.add("train", 40)
print("reserved", flush=True)
if sys.argv[4] == "die":
    os._exit(0)  # no settle: as after kill -9
time.sleep(60)
"""


def spawn(*args):
    return subprocess.Popen([sys.executable, "-c", RESERVE_AND_DIE, *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_settle_releases_only_the_reservations_of_gone_processes(tmp_path):
    dead = spawn(tmp_path, tmp_path / "dead", 100, "die")
    alive = spawn(tmp_path, tmp_path / "alive", 200, "live")
    try:
        assert dead.stdout.readline().strip() == "reserved" and alive.stdout.readline().strip() == "reserved"
        dead.wait(timeout=30)
        ledger = Ledger(tmp_path)
        assert ledger.totals().committed == 300
        released = ledger.settle_dead()
        assert [(record.run_name, r["flops"], r["spent"]) for record, r in released] == [("dead", 100, 40)]
        assert ledger.totals().committed == 40 + 200  # the dead job's spending stays; the live one keeps its share
        assert ledger.settle_dead() == []
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait()
    assert [r.run_name for r, _ in Ledger(tmp_path).settle_dead()] == ["alive"]
    assert Ledger(tmp_path).totals().committed == 80


RACE = """
import sys, time
from ledger import BudgetExceeded, Ledger
start = float(sys.argv[3])
time.sleep(max(start - time.time(), 0))
try:
    job = Ledger(sys.argv[1], max_flops=150).reserve(sys.argv[2], 100, kind="train", run_name=sys.argv[2])
except BudgetExceeded:
    print("refused", flush=True)
    sys.exit(3)
job.add("train", 100)
job.settle()
print("ran", flush=True)
"""


def test_simultaneous_reservations_under_a_one_job_cap(tmp_path):
    start = time.time() + 1.5  # both processes reserve at this moment, after their imports
    processes = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(tmp_path / name), str(start)],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}) for name in ("a", "b")]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in processes)
    assert outcomes == ["ran", "refused"]
    assert Ledger(tmp_path).totals().spent == 100 <= 150


def test_a_second_booking_of_the_same_kind_adds_to_the_first(tmp_path):
    """Two validation passes, two training bookings and two forecasts of one job: each kind's FLOPs, its counts and
    the reservation's spending are the sums, never the last booking (issue 26)."""
    job = Ledger(tmp_path, max_flops=10_000).reserve(tmp_path / "run", 5_000, kind="train", run_name="run")
    job.add("eval", 30, passes=1, windows=4)
    job.add("eval", 70, passes=1, windows=6)
    job.add("train", 1_000, steps=2, step=2, per_step_flops=500)
    job.add("train", 1_500, steps=3, step=5, per_step_flops=500)
    job.add("forecast", 11, entry="a", label="model", calls=1, prefill_tokens=3, decode_tokens=1)
    job.add("forecast", 13, entry="b", label="untrained", calls=1, prefill_tokens=4, decode_tokens=1)
    record = read_record(tmp_path / "run" / "flops.json")
    assert record.by_kind == {"train": 2_500, "eval": 100, "forecast": 24} and record.flops_used == 2_624
    assert record.data["eval"] == {"passes": 2, "windows": 10}
    assert (record.data["train"]["steps"], record.data["train"]["step"]) == (5, 5)  # steps add up, step is the last
    assert record.reservations[0]["spent"] == 2_624
    assert (record.outstanding, record.committed) == (5_000 - 2_624, 5_000)  # spent + what is left reserved
    assert Ledger(tmp_path).totals().committed == 5_000  # spending comes out of the reservation, not on top
    job.settle()
    assert Ledger(tmp_path).totals().spent == Ledger(tmp_path).totals().committed == 2_624


def test_a_job_that_spends_more_than_it_reserved_counts_all_it_spent(tmp_path):
    """Reserved 100, booked 60 + 90 = 150: the 50 over the reservation are spent like the rest, so the ledger commits
    150 (the reservation has nothing left, never -50 that would hide part of the spending; issue 26)."""
    job = Ledger(tmp_path, max_flops=1_000).reserve(tmp_path / "run", 100, kind="train", run_name="run")
    job.add("train", 60, steps=1, step=1, per_step_flops=60)
    job.add("train", 90, steps=1, step=2, per_step_flops=90)
    record = read_record(tmp_path / "run" / "flops.json")
    assert (record.flops_used, record.outstanding, record.committed) == (150, 0, 150)
    assert Ledger(tmp_path, max_flops=1_000).totals().committed == 150
    with pytest.raises(BudgetExceeded, match="planned 851 FLOPs \\+ 150 already spent or reserved"):
        Ledger(tmp_path, max_flops=1_000).check(851)


def test_a_job_reserving_in_a_record_that_already_spent_counts_that_spending(tmp_path):
    """A record that spent 600 of a 1000 cap (a run being resumed, say) cannot reserve 500 more: 600 + 500 > 1000;
    400 exactly fits (issue 26: the job's own record belongs in the cap check)."""
    book(tmp_path, "run", train=600)
    ledger = Ledger(tmp_path, max_flops=1_000)
    with pytest.raises(BudgetExceeded, match="planned 500 FLOPs \\+ 600 already spent or reserved"):
        ledger.reserve(tmp_path / "run", 500, kind="train", run_name="run")
    ledger.reserve(tmp_path / "run", 400, kind="train", run_name="run")
    assert ledger.totals().committed == 1_000


def test_a_reservation_whose_process_is_gone_is_taken_over_by_the_next_reserve(tmp_path):
    """A job reserved 700, spent 100 and died (its lock is free, nothing settled it). The next reservation of the
    record drops the dead one: its 100 spent stay, its 600 unspent go, so 800 more fit a 1000 cap (100 + 800)."""
    from common.fileio import FileLock
    ledger = Ledger(tmp_path, max_flops=1_000)
    (tmp_path / "run").mkdir()
    dead_lock = FileLock(tmp_path / "run" / "dead.lock")
    ledger.reserve(tmp_path / "run", 700, kind="train", run_name="run", holder_lock=dead_lock.path).add("train", 100)
    dead_lock.release()  # the process is gone
    assert ledger.totals().committed == 700
    live_lock = FileLock(tmp_path / "run" / "live.lock")
    try:
        ledger.reserve(tmp_path / "run", 800, kind="train", run_name="run", holder_lock=live_lock.path)
        (reservation,) = read_record(tmp_path / "run" / "flops.json").reservations
        assert (reservation["flops"], reservation["spent"]) == (800, 0)
        assert ledger.totals().committed == 100 + 800
    finally:
        live_lock.release()
