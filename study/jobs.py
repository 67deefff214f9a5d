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
reported with its log once the others have finished; their results are kept, and the same command continues.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.exit_codes import EXIT_FAILED, EXIT_OVER_BUDGET
from common.fileio import write_json_atomic
from training.config import TrainConfig
from training.loop import train_run
from training.rundir import holds_run
from training.stopping import Interrupted

from .plan import JOBS_DIR, Plan, PlanError, StudyRun, is_complete

LAUNCHERS = ("local", "slurm", "submitit-local")
ROOT = Path(__file__).resolve().parents[1]  # the checkout: what a job process imports from
POLL_SECONDS = 0.2


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
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
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
                    failures.append(Failure(spec["run"], f"its job exited with status {status}", log_path, status))
                    log(f"[plan] {spec['run']}: job FAILED (exit status {status}); log: {log_path}")
    except BaseException:
        for process in running:  # our own children, by pid
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in running:
            process.wait()
            process.log_file.close()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return failures


def _interrupt(signum, frame):
    raise Interrupted(signum)  # train.py's line "stopped by SIGTERM" and exit status 143, as a run's own stop has


def _log_path(folder: Path, spec: dict) -> Path:
    return folder / (spec["run"].split("/", 1)[1] + ".log")


def _start_local(spec: dict, gpu: str | None, folder: Path, log) -> subprocess.Popen:
    name = spec["run"].split("/", 1)[1]
    spec_path = write_json_atomic(folder / f"{name}.json", spec)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
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
    failures = []
    for spec, job in zip(specs, jobs):
        try:
            job.result()
            log(f"[plan] {spec['run']}: job {job.job_id} done")
        except Exception as e:  # noqa: BLE001 (the job's own failure, with its traceback, is in its log)
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            failures.append(Failure(spec["run"], f"job {job.job_id} failed: {why}", job.paths.stderr,
                                    EXIT_OVER_BUDGET if "BudgetExceeded" in str(e) else None))
            log(f"[plan] {spec['run']}: job {job.job_id} FAILED; log: {job.paths.stderr}")
    return failures
