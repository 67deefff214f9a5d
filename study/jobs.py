"""A study stage's runs as parallel jobs (`train.py --plan P --jobs N`, `--launcher slurm`): each run is trained by a
process of its own, on this machine (`--launcher local`, the default: up to N at once, one GPU each with --gpus,
max(1, cores // N) torch threads each on CPU) or as SLURM jobs through submitit (`--launcher slurm`; `submitit-local`
runs the same submitit code path on this machine, for testing). The driver waits for every job of a stage before
the next one starts; a stage is done only when every run in it is.

One code path builds a run's arguments: the driver turns each run into a spec (`job_spec`: its TrainConfig as a dict,
the working directory, its threads), and every job, whatever launched it, runs `train_job(spec)`, which trains or
resumes the run exactly as the sequential path (`train_or_resume`) does. Local jobs run `python -m study.worker
SPEC.json`; submitit pickles `train_job` and the spec. Specs and logs live in <study>/jobs/<stage>/.

The FLOP cap holds across jobs as it does across any processes: each run reserves its FLOPs in the ledger under the
ledger's file lock before it loads anything, so a job whose run does not fit is refused (exit 3). A job that fails is
reported with its log and its one-line error once the others have finished; their results are kept, and the same
command continues.

The jobs live no longer than their driver: a Ctrl-C or SIGTERM to it stops its jobs (local ones get a SIGTERM and stop
after their step with a checkpoint; submitit's are cancelled) and waits for them, and a local job whose driver
died without a word (kill -9) notices within a second that its parent is gone and stops the same way
(`study.worker`), so the same command, run again, finds no job of the old one holding its runs. `preflight` checks
the launcher itself before any stage runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.exit_codes import EXIT_DIVERGED, EXIT_FAILED, EXIT_OVER_BUDGET
from common.fileio import write_json_atomic
from training.config import TrainConfig
from training.loop import train_run
from training.rundir import holds_run
from training.stopping import Interrupted

from .plan import JOBS_DIR, Plan, PlanError, StudyRun, is_complete

LAUNCHERS = ("local", "slurm", "submitit-local")
ROOT = Path(__file__).resolve().parents[1]  # the checkout: what a job process imports from
POLL_SECONDS = 0.2
DRIVER_PID = "QWEN_MINI_DRIVER_PID"  # a local job's environment: the driver it must not outlive (study.worker)
CANCEL_WAIT_SECONDS = 120  # how long a stopped driver waits for its cancelled submitit jobs to end


@dataclass(frozen=True)
class JobOptions:
    """How a stage's runs are dispatched (train.py's --jobs, --gpus, --launcher and --slurm-* flags)."""
    jobs: int = 1
    gpus: tuple[str, ...] = ()
    launcher: str = "local"
    slurm_partition: str | None = None
    slurm_time: int = 60  # minutes; also the timeout of submitit-local jobs
    slurm_gpus_per_job: int | None = None
    slurm_account: str | None = None
    slurm_array_parallelism: int | None = None

    @property
    def parallel(self) -> int:
        """Local jobs running at once: --jobs, at most one per GPU of --gpus."""
        return min(self.jobs, len(self.gpus)) if self.gpus else self.jobs

    @property
    def as_jobs(self) -> bool:
        """Whether runs go to job processes at all (else the sequential path trains them in this process)."""
        return self.launcher != "local" or self.jobs > 1 or bool(self.gpus)

    def threads(self) -> int:
        """Torch threads of each job run on this machine: the cores shared between the jobs running at once."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.parallel)


@dataclass(frozen=True)
class Failure:
    run: str  # <stage>/<run>
    why: str
    log: Path
    status: int | None = None  # the job's exit status, where known


class JobsFailed(RuntimeError):
    """Jobs of a stage that did not finish their run; the others' results are kept."""

    def __init__(self, stage: str, failures: list[Failure]):
        self.stage, self.failures = stage, failures
        lines = [f"stage {stage}: {len(failures)} run(s) failed:"]
        lines += [f"  {f.run}: {f.why} (log: {f.log})" for f in failures]
        lines.append("fix what failed, then run the same command again: finished runs are kept, stopped ones resume")
        super().__init__("\n".join(lines))

    @property
    def exit_status(self) -> int:
        """3 when every failed job was refused by the FLOP budget, else 1."""
        return EXIT_OVER_BUDGET if all(f.status == EXIT_OVER_BUDGET for f in self.failures) else EXIT_FAILED


# ---- what every job runs -------------------------------------------------------------------------------------------

def train_or_resume(config: TrainConfig, label: str, progress: bool, log) -> None:
    """Train the run of `config` in its directory, or resume it there; a finished run is left as it is. The sequential
    path and every job run this."""
    if is_complete(config.run_dir, config.steps):
        log(f"[plan] {label}: done already")
        return
    resume = holds_run(config.run_dir)
    log(f"[plan] {label}: {'resuming' if resume else 'training'} ({config.steps} steps)")
    train_run(dataclasses.replace(config, resume=resume), progress=progress)


def job_spec(plan: Plan, run: StudyRun, overrides: dict, threads: int | None) -> dict:
    """What a job needs to train `run`: its settings (as the sequential path builds them), where relative paths start,
    and its torch threads (None: torch's choice)."""
    return {"run": f"{run.stage}/{run.name}", "config": run.config(plan, **overrides).to_dict(), "cwd": os.getcwd(),
            "threads": threads}


def train_job(spec: dict) -> None:
    """The body of one job, in a process of its own: train or resume the spec's run (raises on failure)."""
    os.chdir(spec["cwd"])
    threads = spec.get("threads") or int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)  # SLURM: the cores it gave
    if threads:
        import torch
        torch.set_num_threads(threads)
    settings = dict(spec["config"])
    if os.environ.get("QWEN_MINI_JOB_GPU") and str(settings.get("device", "")).startswith("cuda:"):
        settings["device"] = "cuda"  # the job sees its one GPU of --gpus as cuda:0
    train_or_resume(TrainConfig(**settings), spec["run"], progress=False, log=lambda m: print(m, flush=True))


# ---- the driver ----------------------------------------------------------------------------------------------------

def preflight(options: JobOptions) -> None:
    """Refuse (PlanError) a launcher that cannot start a job here, before any stage runs: submitit not installed,
    or --launcher slurm on a machine without SLURM's commands."""
    if options.launcher == "local":
        return
    import_submitit()
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if options.launcher == "slurm" and missing:
        raise PlanError(f"--launcher slurm: {' and '.join(missing)} not found on PATH: this machine submits no SLURM "
                        "jobs; run the plan where SLURM is (a login node), or use --launcher local")


def run_stage_jobs(plan: Plan, stage: str, runs: list[StudyRun], overrides: dict, options: JobOptions, log) -> None:
    """Train a stage's unfinished runs as jobs and wait for all of them; raises JobsFailed naming each run that did
    not finish (after every other job has ended)."""
    todo, seen = [], set()
    for run in runs:
        config = run.config(plan, **overrides)
        if is_complete(config.run_dir, config.steps):
            log(f"[plan] {run.stage}/{run.name}: done already")
        elif config.run_dir not in seen:
            seen.add(config.run_dir)
            todo.append(run)
    if not todo:
        return
    folder = plan.study_dir / JOBS_DIR / stage
    folder.mkdir(parents=True, exist_ok=True)
    local_threads = options.threads() if options.launcher != "slurm" else None
    specs = [job_spec(plan, run, overrides, local_threads) for run in todo]
    if options.launcher == "local":
        failures = run_local(specs, options, folder, log)
    else:
        failures = run_submitit(specs, options, folder, f"{plan.name}-{stage}", log)
    for run, spec in zip(todo, specs):  # a job that ended well must have left a finished run
        config = run.config(plan, **overrides)
        if not any(f.run == spec["run"] for f in failures) and not is_complete(config.run_dir, config.steps):
            failures.append(Failure(spec["run"], "its job ended without finishing the run", folder))
    if failures:
        raise JobsFailed(stage, failures)


def run_local(specs: list[dict], options: JobOptions, folder: Path, log) -> list[Failure]:
    """Run each spec as `python -m study.worker SPEC.json`, up to options.parallel at once (one GPU of --gpus each,
    round-robin); their output goes to <folder>/<run>.log. The jobs run in sessions of their own, so a Ctrl-C (or a
    SIGTERM) reaches the driver alone, which sends each job one SIGTERM (each stops after its step, with a
    checkpoint) and waits for them before it stops."""
    pending, running, failures = list(specs), {}, []
    free_gpus = list(options.gpus)
    with sigterm_raises():
        try:
            _run_local(pending, running, failures, free_gpus, options, folder, log)
        except BaseException:
            for process in running:  # our own children, by pid
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in running:
                process.wait()
                process.log_file.close()
            raise
    return failures


def _run_local(pending: list, running: dict, failures: list, free_gpus: list, options: JobOptions, folder: Path,
               log) -> None:
    """run_local's loop: start jobs while there is room and collect those that ended (`running` keeps the live ones,
    for run_local to stop if the loop is interrupted)."""
    while pending or running:
        while pending and len(running) < options.parallel:
            spec = pending.pop(0)
            gpu = free_gpus.pop(0) if options.gpus else None
            running[_start_local(spec, gpu, folder, log)] = (spec, gpu)
        time.sleep(POLL_SECONDS)
        for process in [p for p in running if p.poll() is not None]:
            spec, gpu = running.pop(process)
            process.log_file.close()
            if gpu is not None:
                free_gpus.append(gpu)
            status, log_path = process.returncode, _log_path(folder, spec)
            if status == 0:
                log(f"[plan] {spec['run']}: job done")
            else:
                line = _job_error(log_path)
                failures.append(Failure(spec["run"], f"its job exited with status {status}"
                                        + (f": {line}" if line else ""), log_path, status))
                log(f"[plan] {spec['run']}: job FAILED (exit status {status}); log: {log_path}")


@contextlib.contextmanager
def sigterm_raises():
    """While the driver waits for its jobs, a SIGTERM to it raises Interrupted (train.py's line "stopped by SIGTERM"
    and exit status 143, as a run's own stop has), so it can stop its jobs before it goes; the previous handler
    comes back on exit. Only in the main thread (the only one Python delivers signals to)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise Interrupted(signum)


def _job_error(log_path: Path) -> str | None:
    """The one line a failed job's train.py said (its last "train.py: ..." line), for the driver's summary."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in reversed(lines) if line.startswith("train.py: ")), None)


# The line of a Python traceback that names the exception, unindented: "package.module.SomeError: message".
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Z]\w*): (.+)$")


def exception_line(text: str) -> str:
    """'SomeError: message' from the traceback text of a failed submitit job (its last exception line: the text
    ends with the paths of the job's logs), else the text's last line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        match = EXCEPTION_LINE.match(line)
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return lines[-1].strip() if lines else "no message"


def _log_path(folder: Path, spec: dict) -> Path:
    return folder / (spec["run"].split("/", 1)[1] + ".log")


def _start_local(spec: dict, gpu: str | None, folder: Path, log) -> subprocess.Popen:
    name = spec["run"].split("/", 1)[1]
    spec_path = write_json_atomic(folder / f"{name}.json", spec)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env[DRIVER_PID] = str(os.getpid())  # the job stops if this process dies (study.worker's watchdog)
    if gpu is not None:
        env.update(CUDA_VISIBLE_DEVICES=gpu, QWEN_MINI_JOB_GPU=gpu)
    log_path = _log_path(folder, spec)
    log_file = open(log_path, "a")
    command = [sys.executable, "-m", "study.worker", str(spec_path)]
    log_file.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(command)}"
                   f"{f' (CUDA_VISIBLE_DEVICES={gpu})' if gpu is not None else ''}, {spec['threads']} thread(s)\n")
    log_file.flush()
    process = subprocess.Popen(command, cwd=spec["cwd"], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    process.log_file = log_file
    log(f"[plan] {spec['run']}: job started (pid {process.pid}{f', GPU {gpu}' if gpu is not None else ''}, "
        f"{spec['threads']} thread(s)); log: {log_path}")
    return process


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise PlanError("--launcher slurm and submitit-local need submitit: pip install submitit==1.5.4") from None
    return submitit


def run_submitit(specs: list[dict], options: JobOptions, folder: Path, name: str, log) -> list[Failure]:
    """Submit each spec as a job of one submitit array (SLURM, or submitit's LocalExecutor for testing) and wait for
    every one; the executor's files and logs go to <folder>/submitit/."""
    submitit = import_submitit()
    executor_dir = folder / "submitit"
    if options.launcher == "slurm":
        try:
            executor = submitit.AutoExecutor(folder=executor_dir / "%j", cluster="slurm")
        except RuntimeError as e:  # no srun / sbatch here
            raise PlanError(f"--launcher slurm: {e}") from None
        parameters = {"name": name, "timeout_min": options.slurm_time, "gpus_per_node": options.slurm_gpus_per_job,
                      "slurm_partition": options.slurm_partition, "slurm_account": options.slurm_account,
                      "slurm_array_parallelism": options.slurm_array_parallelism}
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    else:
        executor = submitit.LocalExecutor(folder=executor_dir / "%j")
        executor.update_parameters(timeout_min=options.slurm_time)
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [path])])  # jobs unpickle study.jobs
    try:
        with executor.batch():
            jobs = [executor.submit(train_job, spec) for spec in specs]
    finally:
        if path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path
    for spec, job in zip(specs, jobs):
        log(f"[plan] {spec['run']}: submitted as job {job.job_id}; log: {job.paths.stdout}")
    with sigterm_raises():
        try:
            return [failure for spec, job in zip(specs, jobs) if (failure := _submitit_result(spec, job, log))]
        except BaseException:
            cancel_jobs(jobs, log)
            raise


# A submitit job's failure as train.py's exit status, by the exception it raised: a budget refusal, or a run that
# diverged (a search cuts such a configuration instead of failing the study).
SUBMITIT_STATUSES = {"BudgetExceeded": EXIT_OVER_BUDGET, "TrainingDiverged": EXIT_DIVERGED}


def _submitit_result(spec: dict, job, log) -> Failure | None:
    """Wait for one submitted job: None when its run finished, else its Failure with the job's one-line error."""
    try:
        job.result()
        log(f"[plan] {spec['run']}: job {job.job_id} done")
        return None
    except Exception as e:
        why = exception_line(str(e)) if str(e).strip() else type(e).__name__
        log(f"[plan] {spec['run']}: job {job.job_id} FAILED; log: {job.paths.stderr}")
        return Failure(spec["run"], f"job {job.job_id} failed: {why}", job.paths.stderr,
                       SUBMITIT_STATUSES.get(why.split(":", 1)[0]))


def cancel_jobs(jobs: list, log) -> None:
    """Stop every submitted job that has not ended and wait for them to end, so no job outlives the stopped driver
    and holds a run the next command needs: SLURM's are cancelled (scancel: SIGTERM first, so each stops after its
    step with a checkpoint); a local one's controller gets a SIGTERM, which it forwards to the job (its own cancel, a
    SIGINT, would print the controller's traceback and kill the job a second later, mid-step)."""
    live = [job for job in jobs if not job.done()]
    for job in live:
        controller = getattr(job, "_process", None)  # submitit 1.5's LocalJob: the controller process
        if controller is not None:
            controller.send_signal(signal.SIGTERM)
        else:
            job.cancel(check=False)
    log(f"[plan] cancelled {len(live)} job(s): {', '.join(str(job.job_id) for job in live)}" if live else
        "[plan] no job was left to cancel")
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while any(not job.done(force_check=True) for job in live) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
