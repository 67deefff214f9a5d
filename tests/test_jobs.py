"""A study's runs as parallel jobs (train.py --plan P --jobs N, --launcher submitit-local): runs overlap in time and
give what the sequential path gives, the FLOP cap holds across jobs, submitit's dispatch continues to the next stage,
a rerun continues, and a failed job is named with its log and a non-zero exit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import tiny_plan
from test_train import write_small_data

import train as train_cli
from ledger import Ledger, read_record, read_records
from study.jobs import JobOptions, JobsFailed, run_stage_jobs
from study.plan import PlanError, load_plan, stage_runs
from training import read_metrics
from training.budget import plan_run_flops
from training.loop import train_run


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5")


def write_plan(path: Path, data: str, steps: int = 12, next_stage: bool = False) -> Path:
    stages = '[[stage]]\nname = "grid"\nlr = [1e-3, 3e-3]\n'
    if next_stage:
        stages += '\n[[stage]]\nname = "context"\nfrom = "grid"\nctx = [16]\nsteps = 6\n'
    path.write_text(tiny_plan("par", data, stages, steps=steps))
    return path


def grid_dirs(runs: Path) -> list[Path]:
    return [runs / "par" / "grid" / f"tiny_r2_lr{lr}_ctx32" for lr in ("0.001", "0.003")]


def val_losses(run_dir: Path) -> list[float]:
    return [m["val_loss"] for m in read_metrics(run_dir) if m.get("val_loss") is not None]


def times(run_dir: Path) -> tuple[datetime, datetime]:
    record = read_record(run_dir / "flops.json").data
    return datetime.fromisoformat(record["started"]), datetime.fromisoformat(record["finished"])


def test_two_jobs_overlap_and_match_the_sequential_run(tmp_path, small_data, capsys):
    plan = write_plan(tmp_path / "par.toml", small_data)
    parallel, sequential = tmp_path / "parallel", tmp_path / "sequential"
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(parallel), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("job started") == 2 and out.count("job done") == 2
    # They ran at the same time: both jobs started before either was done, and neither run's record (times to the
    # second: a job of the tiny model may take one) ended before the other began.
    assert out.rindex("job started") < out.index("job done"), out
    (a_start, a_end), (b_start, b_end) = (times(d) for d in grid_dirs(parallel))
    assert max(a_start, b_start) <= min(a_end, b_end), (a_start, a_end, b_start, b_end)
    assert all((parallel / "par" / "jobs" / "grid" / f"{d.name}.log").is_file() for d in grid_dirs(parallel))
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(sequential)]) == 0
    for p, s in zip(grid_dirs(parallel), grid_dirs(sequential)):
        assert len(val_losses(p)) == len(val_losses(s)) == 5
        assert val_losses(p) == pytest.approx(val_losses(s), abs=1e-6)
        started, finished = times(s)  # the sequential path writes the times too
        assert started <= finished
    assert Ledger(parallel).totals().spent == Ledger(sequential).totals().spent
    assert json.loads((parallel / "par" / "study.json").read_text())["stages"][0]["best"]


def test_a_cap_that_fits_one_run_holds_across_two_jobs(tmp_path, small_data):
    runs = tmp_path / "runs"
    plan = load_plan(write_plan(tmp_path / "par.toml", small_data), runs_dir=runs)
    stage = plan.stage("grid")
    grid = stage_runs(stage, plan.train)
    one_run = plan_run_flops(grid[0].config(plan), gqa="mha").total  # the plan counts with gqa = "mha"
    plan.max_flops = one_run * 3 // 2  # the second run's reservation does not fit while the first holds its own
    with pytest.raises(JobsFailed) as failed:
        run_stage_jobs(plan, "grid", grid, {}, JobOptions(jobs=2), print)
    assert [f.status for f in failed.value.failures] == [3] and failed.value.exit_status == 3
    refused = failed.value.failures[0]
    assert "refused by the FLOP budget" in refused.log.read_text()
    assert not (plan.study_dir / refused.run / "config.json").exists()  # refused before it loaded anything
    totals = Ledger(runs).totals()
    assert totals.outstanding == 0 and totals.spent == one_run <= plan.max_flops


def test_submitit_local_runs_a_stage_then_the_next_and_a_rerun_continues(tmp_path, small_data, capsys):
    pytest.importorskip("submitit")
    plan_path, runs = write_plan(tmp_path / "par.toml", small_data, steps=6, next_stage=True), tmp_path / "runs"
    plan = load_plan(plan_path, runs_dir=runs)
    half = stage_runs(plan.stage("grid"), plan.train)[1]
    train_run(half.config(plan, steps=3), progress=False)  # a run stopped half way (its checkpoint at step 3)
    command = ["--plan", str(plan_path), "--runs-dir", str(runs), "--launcher", "submitit-local", "--jobs", "2"]
    assert train_cli.main(command) == 0
    out = capsys.readouterr().out
    assert out.count("submitted as job") == 3  # two runs of the grid, then the run of the next stage
    first, second = grid_dirs(runs)
    assert [m["step"] for m in read_metrics(second)] == list(range(7))  # resumed at step 3, not trained again
    assert "resuming" in "".join(p.read_text() for p in (runs / "par" / "jobs" / "grid").rglob("*.out"))
    study = json.loads((runs / "par" / "study.json").read_text())
    assert [s["name"] for s in study["stages"]] == ["grid", "context"]
    assert len(val_losses(Path(study["stages"][1]["runs"][0]))) == 3
    before = {d: (d / "metrics.jsonl").read_text() for d in (first, second)}
    assert train_cli.main(command) == 0  # the same command again: everything is done, nothing is submitted
    out = capsys.readouterr().out
    assert "submitted as job" not in out and out.count("done already") == 3
    assert {d: (d / "metrics.jsonl").read_text() for d in (first, second)} == before
    assert Ledger(runs).totals().outstanding == 0


def test_a_failed_job_is_named_with_its_log_and_the_others_are_kept(tmp_path, small_data, capsys):
    plan, runs = write_plan(tmp_path / "par.toml", small_data, steps=3), tmp_path / "runs"
    good, bad = grid_dirs(runs)
    bad.parent.mkdir(parents=True)
    bad.write_text("not a directory\n")  # the run's directory cannot be made: its job fails
    command = ["--plan", str(plan), "--runs-dir", str(runs), "--jobs", "2"]
    assert train_cli.main(command) == 1
    err = capsys.readouterr().err
    log = runs / "par" / "jobs" / "grid" / f"{bad.name}.log"
    # the job's own one line (train.py's, from its log) in the summary, then where the log is
    assert f"grid/{bad.name}: its job exited with status 1: train.py: grid/{bad.name}: error: " in err
    assert f"(log: {log})" in err and len(err.strip().splitlines()) == 3
    assert "Traceback" in log.read_text() or "error" in log.read_text().lower()
    assert [m["step"] for m in read_metrics(good)] == [0, 1, 2, 3]  # the other job finished and is kept
    assert not (runs / "par" / "study.json").exists()  # the stage is not done
    bad.unlink()
    assert train_cli.main(command) == 0  # fixed: the same command trains only the failed run
    out = capsys.readouterr().out
    assert "done already" in out and out.count("job started") == 1


def test_job_flags_are_checked_before_anything_runs(tmp_path, small_data, capsys, monkeypatch):
    plan, runs = write_plan(tmp_path / "par.toml", small_data, steps=3), tmp_path / "runs"
    for argv, message in ((["--jobs", "2"], "--jobs dispatches the runs of a study plan: it needs --plan"),
                          (["--plan", plan, "--slurm-partition", "gpu"], "--slurm-partition needs --launcher slurm"),
                          (["--plan", plan, "--gpus", "0,0"], "distinct GPU numbers"),
                          (["--plan", plan, "--launcher", "submitit-local", "--gpus", "0"], "--gpus is for --launcher "
                                                                                            "local")):
        with pytest.raises(SystemExit) as stopped:
            train_cli.main([str(a) for a in argv])
        assert stopped.value.code == 2 and message in capsys.readouterr().err, argv
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed: one line, nothing trained
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs), "--launcher", "slurm"]) == 2
    assert "--launcher slurm and submitit-local need submitit: pip install submitit==1.5.4" in capsys.readouterr().err
    assert not list(runs.rglob("config.json"))
    (tmp_path / "bad.toml").write_text('[[stage]]\nname = "jobs"\nforecast = "base"\n')
    with pytest.raises(PlanError, match="cannot be named 'jobs'"):
        load_plan(tmp_path / "bad.toml")


# ---- the driver's life and the jobs' (issue 35, item 13) -------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def held(run_dir: Path) -> bool:
    """Whether a process still holds the run's lock (a job that outlived its driver)."""
    from common.fileio import FileLock, LockHeld
    try:
        FileLock(run_dir / "run.lock").release()
    except LockHeld:
        return True
    return False


def still_training(run_dirs: list[Path], seconds: float = 3.0) -> bool:
    """Whether any run logs more steps within `seconds` (a job that outlived its driver trains on)."""
    before = [len(read_metrics(d)) for d in run_dirs]
    time.sleep(seconds)
    return [len(read_metrics(d)) for d in run_dirs] != before or any(held(d) for d in run_dirs)


def start_driver(tmp_path: Path, plan: Path, runs: Path, *flags: str):
    """train.py --plan --jobs 2 in a process of its own; its output goes to files (a pipe would stay open as long as
    any job it started, so reading it to the end would wait for the jobs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWEN_MINI_CACHE": str(tmp_path / "cache")}
    # SIGINT as at a terminal: a suite started in the background by a shell without job control inherits it
    # ignored, and Python then never raises KeyboardInterrupt (the driver would rightly train on, as under nohup &)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--plan", str(plan), "--runs-dir", str(runs),
                             "--jobs", "2", *flags], cwd=tmp_path, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=open(tmp_path / "driver.out", "w"), stderr=open(tmp_path / "driver.err", "w"))


def wait_for_training(driver, run_dirs: list[Path], timeout: float = 240) -> None:
    """Until every run has logged a training step (its job is past loading)."""
    deadline = time.monotonic() + timeout
    while not all((d / "metrics.jsonl").is_file() and len(read_metrics(d)) >= 2 for d in run_dirs):
        assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before it was stopped"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_a_submitit_local_driver_stops_its_jobs(tmp_path, small_data, sig):
    """The driver exits 128 + signal only once its jobs are gone: no run is left locked by a job of it, and the same
    command continues both runs from where they stopped."""
    pytest.importorskip("submitit")
    plan, runs = write_plan(tmp_path / "par.toml", small_data, steps=2000), tmp_path / "runs"
    driver = start_driver(tmp_path, plan, runs, "--launcher", "submitit-local")
    wait_for_training(driver, grid_dirs(runs))
    driver.send_signal(sig)
    driver.wait(timeout=180)
    err = (tmp_path / "driver.err").read_text()
    assert driver.returncode == 128 + sig, err
    assert "Traceback" not in err and "to continue, run the same command" in err, err
    assert not still_training(grid_dirs(runs))  # no job of the stopped driver lives on


def test_local_jobs_stop_when_their_driver_is_killed(tmp_path, small_data):
    """kill -9 of the driver (no chance to stop its jobs): each job notices its parent is gone and stops after its
    step with a checkpoint, instead of training on as an orphan that holds its run."""
    plan, runs = write_plan(tmp_path / "par.toml", small_data, steps=2000), tmp_path / "runs"
    driver = start_driver(tmp_path, plan, runs)
    wait_for_training(driver, grid_dirs(runs))
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(held(d) for d in grid_dirs(runs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not still_training(grid_dirs(runs))
    for run_dir in grid_dirs(runs):
        log = (runs / "par" / "jobs" / "grid" / f"{run_dir.name}.log").read_text()
        assert "stopped by SIGTERM after step" in log and (run_dir / "checkpoint.pt").is_file(), log


def test_slurm_without_slurm_is_refused_before_any_stage(tmp_path, small_data, capsys, monkeypatch):
    """No sbatch/srun on PATH: one line, exit 2, and not even the zero-shot forecast that comes first is made."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    plan = tmp_path / "p.toml"
    plan.write_text(tiny_plan("par", small_data, '[forecast]\nlimit = 1\nhorizon = 3\nbaselines = []\n'
                              '[[stage]]\nname = "zero_shot"\nforecast = "base"\n'
                              '[[stage]]\nname = "grid"\nlr = [1e-3, 3e-3]\n', steps=2))
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "--launcher slurm: sbatch and srun not found on PATH" in err
    assert not (runs / "par" / "zero_shot").exists() and read_records(runs) == []


def test_a_failed_submitit_job_is_summed_up_by_its_error_not_its_log_paths():
    """submitit's message ends with the paths of the job's logs; the summary names the exception instead."""
    from study.jobs import exception_line
    text = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
            "last):\n  File \"submission.py\", line 55, in process_job\n    result = delayed.result()\n"
            "training.run.RunDirError: runs/x is in use by pid 123 on host (since 10:00): wait for that run to end\n\n"
            "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
            "  - /tmp/log/1_0_log.err\n  - /tmp/log/1_0_log.out")
    assert exception_line(text) == ("RunDirError: runs/x is in use by pid 123 on host (since 10:00): wait for that run "
                                    "to end")
