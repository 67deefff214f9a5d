"""Atomic file writes (a reader, or a resumed run after a crash, never sees half a file) and the one file lock that
every exclusive thing (a run directory, the FLOP ledger) is guarded by."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---- locks ---------------------------------------------------------------------------------------------------------

class LockHeld(RuntimeError):
    """Another live process holds the lock; `holder` is what it wrote into the lock file (pid, host, since, what)."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = Path(path), holder
        super().__init__(f"{path} is locked by {describe_holder(holder)}")


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (it left no details)"
    what = f" ({holder['what']})" if holder.get("what") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}{what}"


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode("utf-8", "replace")
        holder = json.loads(raw) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class FileLock:
    """An exclusive lock on `path` (a small file beside what it protects), held by this process until `release()`.

    The kernel's `flock` does the locking, so a lock dies with its process: after kill -9 the next process gets it at
    once. The holder writes its pid, host and start time into the file, so a refused process can name who holds it,
    and a process that takes over a dead holder's file can say so (`previous`). `wait` seconds: how long to retry
    before raising LockHeld (0: refuse at once). Usable as a context manager."""

    def __init__(self, path: str | os.PathLike, *, what: str = "", wait: float = 0.0, poll: float = 0.05):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_umask())
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(self._fd)
                    os.close(self._fd)
                    self._fd = None
                    raise LockHeld(self.path, holder) from None
                time.sleep(poll)
            except OSError:
                os.close(self._fd)
                self._fd = None
                raise
        # A file left by a holder that died (its flock went with it) still names that holder: report the takeover.
        self.previous = _read_holder(self._fd)
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what}
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, (json.dumps(self.holder) + "\n").encode())

    @property
    def took_over(self) -> bool:
        """The file named another process as holder: one that ended without releasing it (a crash, kill -9)."""
        return bool(self.previous) and self.previous.get("pid") is not None

    def release(self) -> None:
        """Give the lock up: the file is emptied (nobody holds it) and unlocked. Safe to call twice."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
