"""The one file lock (common.fileio.FileLock) that guards run directories and the FLOP ledger."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from common.fileio import FileLock, LockHeld


def test_second_holder_is_refused_naming_the_first(tmp_path):
    path = tmp_path / "run.lock"
    with FileLock(path, what="train.py runs/a"):
        with pytest.raises(LockHeld) as refused:
            FileLock(path)
        assert "train.py runs/a" in str(refused.value) and "pid" in str(refused.value)
        script = f"from common.fileio import FileLock\nFileLock({str(path)!r})"
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert other.returncode != 0 and "LockHeld" in other.stderr
    with FileLock(path) as again:  # released: free again, and nobody is named as a dead holder
        assert not again.took_over


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from common.fileio import FileLock
        lock = FileLock({str(path)!r}, what="doomed")
        print("held", flush=True)
        time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld):
        FileLock(path)
    holder.kill()
    holder.wait()
    with FileLock(path) as lock:
        assert lock.took_over and lock.previous["pid"] == holder.pid and lock.previous["what"] == "doomed"


def test_wait_gives_up_after_the_timeout(tmp_path):
    path = tmp_path / "ledger.lock"
    with FileLock(path):
        with pytest.raises(LockHeld):
            FileLock(path, wait=0.2)


def test_a_lock_file_removed_while_waiting_for_it_is_not_taken_as_the_lock(tmp_path, monkeypatch):
    # The race a cleaned-up lock file opens: B has the old file open and waits; A releases and removes it, C creates
    # and locks a new one. B's flock on the old, unlinked file succeeds, but it guards nothing: B must see that and
    # queue behind C instead of holding "the lock" beside it.
    import common.fileio as fileio

    path = tmp_path / "run.lock"
    first, others = FileLock(path, what="A"), {}

    def sleep(seconds):
        if "C" not in others:
            first.release()
            path.unlink()
            others["C"] = FileLock(path, what="C")
    monkeypatch.setattr(fileio.time, "sleep", sleep)
    with pytest.raises(LockHeld, match=r"\(C\)"):
        FileLock(path, what="B", wait=0.5)
    others["C"].release()
