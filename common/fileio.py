"""Atomic file writes (a reader, or a resumed run after a crash, never sees half a file), whole-line appends, and
the one file lock that every exclusive thing (a run directory, the FLOP ledger) is guarded by."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path


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
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        reported = _reported_os_error(e, path)
        if reported is not None and reported is not e:
            raise reported from None
        raise
    return path


# safetensors (Rust) reports a failed write as SafetensorError("... I/O error: ... (os error 28)").
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _reported_os_error(e: BaseException, path) -> OSError | None:
    """The OSError behind a failed write, naming `path` when the system did not: so a full disk or a read-only
    directory reads the same to callers, whichever library wrote the file."""
    if isinstance(e, OSError):
        if e.filename is None:
            e.filename = str(path)
        return e
    found = _RUST_OS_ERROR.search(str(e))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` and a newline to a log file, whole or not at all: when the write fails (a full disk), the part
    of it that reached the file is cut off again, so an error never leaves half a line. (A kill -9 in the middle of
    the write still can: readers of such logs drop a torn last line.)"""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:
            os.ftruncate(fd, size)
            raise _reported_os_error(e, path) from None
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create directory `path` if needed and check that a file can be written in it; raises OSError naming the path
    otherwise (an existing file of that name, a read-only mount, no permission), so a command can refuse an output
    location before doing any work for it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
    if path.is_symlink() and not path.exists():  # mkdir would say "file exists" of it
        raise FileNotFoundError(errno.ENOENT, f"a symbolic link to {os.readlink(path)}, which does not exist",
                                str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise _reported_os_error(e, path) from None
    return path


def os_error_text(e: OSError) -> str:
    """'<path>: <what the system said>' for a one-line message."""
    what = e.strerror or str(e)
    return f"{e.filename}: {what[0].lower() + what[1:]}" if e.filename else what


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class UnreadableFile(ValueError):
    """A file that is there but cannot be read as what it should be (torn, hand-edited, binary)."""


def read_json(path: str | os.PathLike):
    """The value of a JSON file. One that is not UTF-8 JSON raises UnreadableFile naming it and the place of the
    fault; a missing or unreadable file raises OSError as usual."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UnreadableFile(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise UnreadableFile(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class StagedFiles:
    """A set of files published into `out_dir` together: they are written into a hidden staging directory inside it
    (`self.dir`, same file system, so moving is a rename) and `publish` moves them in, the file `last` (what marks the
    set complete, such as a metrics.json) after all the others. Leaving the block without publishing (an error, a
    full disk, a signal) removes the staging directory, so `out_dir` keeps what it had and no temporary file stays."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.dir: Path | None = None

    def __enter__(self) -> StagedFiles:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(dir=self.out_dir, prefix=".staging-", suffix=".tmp"))
        return self

    def publish(self, last: str, stale: Iterable[str] = ()) -> list[Path]:
        """Move every staged file into `out_dir`, `last` at the end; first remove `last` there (the set it marked is
        being replaced) and the `stale` names of an earlier set that this one does not have. Returns the paths."""
        names = sorted(os.listdir(self.dir))
        if last not in names:
            raise FileNotFoundError(errno.ENOENT, "was not staged", str(self.dir / last))
        (self.out_dir / last).unlink(missing_ok=True)
        for name in set(stale) - set(names):
            if "/" not in name and not name.startswith("."):  # names of files in out_dir, nothing else
                (self.out_dir / name).unlink(missing_ok=True)
        ordered = [n for n in names if n != last] + [last]
        for name in ordered:
            os.replace(self.dir / name, self.out_dir / name)
        return [self.out_dir / name for name in ordered]

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


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
        self._fd = self._open()
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(self._fd)
                    os.close(self._fd)
                    self._fd = None
                    raise LockHeld(self.path, holder) from None
                time.sleep(poll)
                continue
            except OSError:
                os.close(self._fd)
                self._fd = None
                raise
            if self._is_at_path():
                break
            # The holder removed the file between our open and our flock (lock files may be cleaned up once
            # released): a lock on that orphan guards nothing, so lock the file now at the path instead.
            os.close(self._fd)
            self._fd = self._open()
        # A file left by a holder that died (its flock went with it) still names that holder: report the takeover.
        self.previous = _read_holder(self._fd)
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what}
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, (json.dumps(self.holder) + "\n").encode())

    def _open(self) -> int:
        # O_NOFOLLOW: a lock file that is a symlink is refused (ELOOP), never followed to the file it names, which
        # taking the lock would empty.
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666 & ~_umask())

    def _is_at_path(self) -> bool:
        try:
            here, there = os.fstat(self._fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

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

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
