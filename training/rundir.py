"""The run directory before training: claiming it (a lock held for the run's life) and deciding where the run starts.

`claim_run_dir` makes sure the directory can be written and locks it; `resume_point` checks that it fits the request
(a fresh run needs an empty one; --resume needs a run there, trained with the same settings on the same data) and
says from which step, with which FLOPs already spent, the run continues (or, with --continue-from, from which other
run's checkpoint it starts: `continuation_point`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from common.fileio import FileLock, LockHeld, describe_holder, ensure_writable_dir, os_error_text, sha256_file
from data.lotka_volterra import default_data_path
from ledger import RECORD_NAME, read_record, record_present

from .checkpoint import read_checkpoint
from .config import CONTINUE_KEYS, TRAJECTORY_KEYS, TrainConfig
from .run import (
    ADAPTER_DIR,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    LOCK_NAME,
    METRICS_NAME,
    MODEL_DIR,
    SETTING_NAMES,
    RunDirError,
    read_metrics,
    read_run_config,
)

# Files whose presence means a run directory already holds a run.
RUN_FILES = (CONFIG_NAME, METRICS_NAME, CHECKPOINT_NAME, RECORD_NAME)


def claim_run_dir(config: TrainConfig) -> RunDirLock:
    """Make sure the run directory can be written and lock it for this process, which holds the lock until the run
    ends: a second process on the same directory is refused at once, naming the holder (pid, host, since). The
    lock dies with its process, so after a crash or kill -9 the next run takes it over (and says so)."""
    run_dir = config.run_dir
    if config.resume:
        check_resumable(run_dir)  # before anything is created in a mistyped directory
    created = topmost_missing(run_dir)
    try:
        ensure_writable_dir(run_dir)
        lock = FileLock(run_dir / LOCK_NAME, what=f"train.py {run_dir}")
    except LockHeld as e:
        raise RunDirError(f"{run_dir} is in use by {describe_holder(e.holder)}: wait for that run to end (or stop "
                          "it), or choose another --out") from None
    except OSError as e:
        raise RunDirError(f"cannot write the run directory: {os_error_text(e)}") from None
    if lock.took_over:
        print(f"train.py: note: {run_dir} was last locked by {describe_holder(lock.previous)}, which ended without "
              "releasing it (a crash or kill -9); taken over", file=sys.stderr)
    for directory in (run_dir, run_dir / ADAPTER_DIR, run_dir / MODEL_DIR):
        for leftover in directory.glob(".*.tmp"):  # half-written by a killed process (atomic_write's temporaries)
            leftover.unlink(missing_ok=True)
    return RunDirLock(lock, created)


def topmost_missing(path: Path) -> Path | None:
    """The highest of `path` and its parents that does not exist: the first directory mkdir(parents=True) makes."""
    missing = None
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing = directory
    return missing


class RunDirLock:
    """A run directory's lock (see claim_run_dir). Released by a run that never wrote anything there (refused by the
    budget, say), it removes its file and the directories claim_run_dir created: a refused run leaves no trace."""

    def __init__(self, lock: FileLock, created: Path | None):
        self.lock, self.created = lock, created  # created: the topmost directory that did not exist before

    @property
    def path(self) -> Path:
        return self.lock.path

    def release(self) -> None:
        self.lock.release()
        run_dir = self.path.parent
        if self.created is None or os.listdir(run_dir) != [LOCK_NAME]:
            return
        self.path.unlink(missing_ok=True)
        for directory in (run_dir, *run_dir.parents):
            try:
                directory.rmdir()
            except OSError:  # no longer empty: something else lives there now
                return
            if directory == self.created:
                return


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_FILES)


def check_resumable(run_dir: Path) -> None:
    if not holds_run(run_dir):
        what = "no such directory" if not run_dir.exists() else f"no run in it (none of {', '.join(RUN_FILES)})"
        raise RunDirError(f"{run_dir}: --resume found {what}; check the path, or leave out --resume to start a new "
                          "run")


def lost_checkpoint_step(saved: dict, metrics: list[dict]) -> int | None:
    """The step of a checkpoint the run must have written, judged from its config.json and metrics, or None. A run
    resumed at step s had one at s; otherwise its first scheduled one (at checkpoint_every, or at the last step)
    was written before the next step was logged."""
    if saved.get("start_step"):
        return saved["start_step"]
    every, steps = saved.get("checkpoint_every") or 0, saved.get("steps")
    first = min(every, steps) if every and steps else (steps or every or None)
    logged = max((row["step"] for row in metrics), default=0)
    return first if first is not None and logged > first else None


def check_same_data(saved: dict, config: TrainConfig, where) -> None:
    """Refuse to resume on a data file whose bytes changed since the run started (its sha256 is in config.json)."""
    path = Path(config.data) if config.data is not None else default_data_path()
    recorded = saved.get("data_sha256")
    if recorded and path.is_file():  # a deleted default set is simulated again, byte for byte the same
        now = sha256_file(path)
        if now != recorded:
            raise RunDirError(f"{where}: the data file {path} changed since the run started (sha256 {recorded[:12]}... "
                              f"then, {now[:12]}... now); resuming needs the data it trained on: put that file "
                              "back, or start a new run with another --out")


def same_setting(key: str, saved, wanted) -> bool:
    """Whether a run's recorded setting is this one's. Two spellings of one local model directory or data file (a
    relative and an absolute one: `train.py --plan P --data lv.h5` over the plan's /home/me/lv.h5) are the same, and
    so are two data files of the same bytes, as a study's identity counts them (`check_same_data` checks the bytes
    against the run's record)."""
    if saved == wanted:
        return True
    if key not in ("model", "data") or not isinstance(saved, str) or not isinstance(wanted, str):
        return False
    then, now = Path(saved), Path(wanted)
    try:
        if then.exists() and now.exists() and then.resolve() == now.resolve():
            return True
        return key == "data" and then.is_file() and now.is_file() and sha256_file(then) == sha256_file(now)
    except OSError:
        return False


def different_settings(saved: dict, wanted: dict, skip=()) -> list[str]:
    """The trajectory settings (TRAJECTORY_KEYS but `skip`) a run recorded otherwise than `wanted` (`same_setting`)."""
    return [key for key in TRAJECTORY_KEYS
            if key in saved and key not in skip and not same_setting(key, saved[key], wanted[key])]


def check_same_trajectory(saved: dict, wanted: dict, where) -> None:
    different = different_settings(saved, wanted)
    if different:
        details = ", ".join(f"{key}: run has {saved[key]!r}, now {wanted[key]!r}" for key in different)
        raise RunDirError(f"{where}: cannot resume with different settings ({details}); pass the run's own values "
                          "or start a new run in another --out")


@dataclass(frozen=True)
class ResumePoint:
    step: int  # steps already done (0 for a fresh run)
    flops_used: int  # training + validation FLOPs the run's ledger record already counts (lost steps included)
    history: tuple = ()  # the metrics lines a resumed run keeps: those up to its checkpoint's step
    source: Path | None = None  # --continue-from: the run whose checkpoint it starts from (None: its own)


def continuation_point(config: TrainConfig, flops_used: int = 0) -> ResumePoint:
    """Where a run with --continue-from starts: the step k of that run's checkpoint, once this run is that run
    continued: the same trajectory settings apart from the schedule (CONTINUE_KEYS), the same data, and k inside
    both runs' stable phase (`TrainConfig.stable_steps`), so steps 1..k and the learning rate of step k + 1 are the
    same under both schedules. Its metrics.jsonl lines up to k become this run's first lines; its FLOPs stay its
    own (`flops_used`: what this run's record counts)."""
    source = Path(config.continue_from)
    where = f"--continue-from {source}"
    if source.resolve() == config.run_dir.resolve():
        raise RunDirError(f"{where} is this run's own directory: continue a stopped run with --resume")
    try:
        saved = read_run_config(source)
    except RunDirError as e:
        raise RunDirError(f"{where}: {e}") from None
    state = read_checkpoint(source, mmap=True)
    if state is None:
        raise RunDirError(f"{where}: no {CHECKPOINT_NAME} to continue from (deleted or moved, or the run saved none): "
                          "put it back, or train this run from step 0 (in a plan: continue = false)")
    theirs, ours = state["trajectory"], config.trajectory_values()
    different = different_settings(theirs, ours, skip=CONTINUE_KEYS)
    if different:
        details = ", ".join(f"{k}: it has {theirs[k]!r}, this run {ours[k]!r}" for k in different)
        raise RunDirError(f"{where}: a run continues only a run of its own settings, apart from the schedule "
                          f"({details})")
    check_same_data(saved, config, source)
    step, trained = int(state["step"]), TrainConfig(**{k: v for k, v in saved.items() if k in SETTING_NAMES})
    for run, stable, what in ((trained, trained.stable_steps, "its"), (config, config.stable_steps, "this run's")):
        if step > stable:
            raise RunDirError(f"{where}: its checkpoint is at step {step}, past the end of {what} constant learning "
                              f"rate (step {stable}: schedule {run.schedule}, {run.steps} steps), so this run's "
                              "steps would not be that run's: continue a constant-schedule run inside this run's "
                              "stable phase, or train from step 0 (in a plan: continue = false)")
    if step >= config.steps:
        raise RunDirError(f"{where}: its checkpoint is at step {step}; --steps {config.steps} leaves nothing to train")
    history = tuple(row for row in read_metrics(source, drop_torn_tail=True) if row["step"] <= step)
    return ResumePoint(step, flops_used, history, source)


def resume_point(config: TrainConfig) -> ResumePoint:
    """Where the run in config.run_dir starts, after checking that the directory fits the request: a fresh run needs
    a directory without a run in it; --resume needs a run there, continues from its checkpoint (or from step 0 if
    the run was stopped before its first one; a checkpoint that went missing is refused) and needs the same
    settings and data file as the run it continues. A torn last line of metrics.jsonl is dropped with a warning.
    With --continue-from, a run without a checkpoint of its own starts from that run's (`continuation_point`)."""
    run_dir = config.run_dir
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not config.resume:
        if existing:
            raise RunDirError(f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                              "or choose another directory with --out")
        return continuation_point(config) if config.continue_from is not None else ResumePoint(0, 0)
    check_resumable(run_dir)
    saved = read_run_config(run_dir) if (run_dir / CONFIG_NAME).is_file() else {}
    if saved:
        check_same_trajectory(saved, config.trajectory_values(), run_dir / CONFIG_NAME)
        check_same_data(saved, config, run_dir)
    metrics = read_metrics(run_dir, drop_torn_tail=True)
    state = read_checkpoint(run_dir, mmap=True)
    flops_used = 0
    if record_present(run_dir / RECORD_NAME):  # a directory or a dangling symlink: refused, never read as 0
        by_kind = read_record(run_dir / RECORD_NAME).by_kind
        flops_used = by_kind["train"] + by_kind["eval"]
    if state is None and config.continue_from is not None and saved.get("continued_from_step") is None:
        # Stopped before it forked the source's checkpoint into its own (which it does before config.json).
        return continuation_point(config, flops_used)
    if state is None:
        lost = lost_checkpoint_step(saved, metrics)
        if lost is not None:
            raise RunDirError(f"{run_dir}: --resume found no {CHECKPOINT_NAME}, but the run wrote one at step {lost} "
                              f"(metrics.jsonl goes to step {max(row['step'] for row in metrics)}): it was deleted or "
                              "moved; starting again at step 0 would overwrite that history. Put the checkpoint back, "
                              "or train again with another --out")
    else:
        check_same_trajectory(state["trajectory"], config.trajectory_values(), run_dir / CHECKPOINT_NAME)
    step = 0 if state is None else int(state["step"])
    if step > config.steps:
        raise RunDirError(f"{run_dir}: the checkpoint is at step {step}, past --steps {config.steps}")
    return ResumePoint(step, flops_used, tuple(row for row in metrics if step and row["step"] <= step))
