"""Half-written outputs and the other hostile inputs of issue 22 (items 3, 11, 12): a forecast's files appear
together or not at all (metrics.json, what marks a forecast done, last), one forecast at a time writes into a
directory, stale plots go, the report's writes fail with one line and no temporary file, odd --data / --out / --ctx
values are named for what they are.

Every case runs the real `main` of the command (forecast.py, train.py, report.py, flops.py) in-process, with real
signals sent to this process where a stop is tested (the commands' handlers turn them into their one line), and
checks the exit status, the one line, and that nothing was lost or half written: the files before are byte for byte
the files after, no metrics.json without its siblings, no temporary file or staging directory left.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import REPO, TINY, copy_run, data, finished, flags, lines_of, snapshot, train  # noqa: F401 (fixtures)

import flops as flops_cli
import forecast
import forecasting.cli
import report as report_cli
import reporting.report
import training.loop
import training.setup
from common.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from forecasting.evaluate import FILES_KEY, OUTPUT_LOCK, lock_output
from forecasting.forecast import check_samples_fit
from training.stopping import Interrupted

EVALUATE = importlib.import_module("forecasting.evaluate")  # the module (the package exports a function of its name)
QUICK = ["--horizon", "3", "--quiet", "--no-baselines"]  # one short forecast of the model alone


def run_forecast(capsys, run: Path, out: Path, *more) -> tuple[int, list[str]]:
    status = forecast.main([str(a) for a in ["--run", run, "--runs-dir", run.parent, "--out", out, *QUICK, *more]])
    return status, lines_of(capsys.readouterr().err)


def leftovers(directory: Path) -> list[Path]:
    """Temporary files and staging directories: none may outlive the command."""
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def kill_self_in(monkeypatch, module, name: str, signum: int) -> None:
    """`module.name` still runs, then this process gets `signum` (as from `kill` or a terminal)."""
    real = getattr(module, name)

    def then_signal(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signum)
        return result
    monkeypatch.setattr(module, name, then_signal)


@pytest.fixture(scope="module")
def forecast_finished(tmp_path_factory, finished) -> Path:
    """The finished run with one finished forecast of trajectory 3 in run/forecast."""
    run = copy_run(finished, tmp_path_factory.mktemp("forecast"))
    status = forecast.main([str(a) for a in ["--run", run, "--runs-dir", run.parent, "--out", run / "forecast",
                                             *QUICK, "--sample", "3"]])
    assert status == EXIT_OK
    return run


@pytest.fixture
def forecast_done(tmp_path, forecast_finished) -> tuple[Path, Path]:
    """A copy of that run and its forecast, for a test to damage."""
    run = copy_run(forecast_finished, tmp_path)
    return run, run / "forecast"


# ---- a forecast's files: all or nothing ----------------------------------------------------------------------------

@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_while_the_outputs_are_written_keeps_the_earlier_forecast_whole(forecast_done, monkeypatch, capsys,
                                                                                 signum, status):
    run, out = forecast_done
    before = snapshot(out)
    kill_self_in(monkeypatch, EVALUATE, "write_per_trajectory_csv", signum)  # the first file of the set
    got, lines = run_forecast(capsys, run, out, "--sample", "4")
    assert got == status
    assert lines[-1] == f"error: stopped by {signal.Signals(signum).name}; nothing was written"
    assert snapshot(out) == before and not leftovers(run)  # the earlier forecast, byte for byte; no staging dir


def test_a_signal_while_the_files_are_moved_into_place_waits_until_the_set_is_whole(forecast_done, monkeypatch,
                                                                                     capsys):
    run, out = forecast_done
    kill_self_in(monkeypatch, EVALUATE, "earlier_outputs", signal.SIGTERM)  # read as the moves begin
    status, lines = run_forecast(capsys, run, out, "--sample", "4")
    assert status == 143
    assert lines[-1] == f"error: stopped by SIGTERM as the forecast was written: {out} holds it in full"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trajectories"] == [4] and sorted(metrics[FILES_KEY]) == sorted(
        p.name for p in out.iterdir() if p.name != OUTPUT_LOCK)
    assert not leftovers(run)


def test_a_full_disk_while_the_outputs_are_written_leaves_no_metrics_json(tmp_path, finished, monkeypatch, capsys):
    run = copy_run(finished, tmp_path)
    out = run / "forecast_new"

    def disk_full(out_dir, evaluation):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "trajectory_3.png"))
    monkeypatch.setattr(EVALUATE, "write_plots", disk_full)
    status, lines = run_forecast(capsys, run, out, "--sample", "3")
    assert status == EXIT_FAILED
    assert lines[-1].endswith("trajectory_3.png: no space left on device: the forecasts were not written")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_LOCK]  # no metrics.json, no sibling, no staging dir


def test_metrics_json_lists_the_files_and_a_new_forecast_removes_the_stale_plots(forecast_done, capsys):
    run, out = forecast_done
    metrics = json.loads((out / "metrics.json").read_text())
    metrics[FILES_KEY] += ["notes.txt", "../checkpoint.pt"]  # a hand-edited list: data, never trusted
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "notes.txt").write_text("the user's")
    status, _ = run_forecast(capsys, run, out, "--sample", "4", "5")
    assert status == EXIT_OK
    files = json.loads((out / "metrics.json").read_text())[FILES_KEY]
    assert "trajectory_3.png" not in files and {"trajectory_4.png", "trajectory_5.png", "metrics.json"} <= set(files)
    kept = {OUTPUT_LOCK, "notes.txt"}
    assert sorted(p.name for p in out.iterdir() if p.name not in kept) == sorted(files)  # trajectory_3 is gone
    assert (out / "notes.txt").read_text() == "the user's" and (run / "checkpoint.pt").is_file()


def test_a_second_forecast_into_the_same_directory_is_refused_naming_the_first(forecast_done, capsys):
    run, out = forecast_done
    before = snapshot(out)
    with lock_output(out, "the first forecast"):  # held as a live forecast holds it (flock: per open file)
        status, lines = run_forecast(capsys, run, out, "--sample", "4")
    assert status == EXIT_USAGE and [line for line in lines if line.startswith("error")] == lines[-1:]
    assert lines[-1].startswith(f"error: {out} is being written by another forecast (pid {os.getpid()} on host ")
    assert "(the first forecast)" in lines[-1]
    assert snapshot(out) == before


def test_a_damaged_metrics_json_of_an_earlier_forecast_is_replaced_not_a_traceback(forecast_done, capsys):
    run, out = forecast_done
    (out / "metrics.json").write_text('{"files": ["trajectory_3.png", ')  # torn
    status, _ = run_forecast(capsys, run, out, "--sample", "4")
    assert status == EXIT_OK
    assert json.loads((out / "metrics.json").read_text())["trajectories"] == [4]
    assert not (out / "trajectory_3.png").exists()  # a trajectory plot is known stale without the list


# ---- stops before the forecast -------------------------------------------------------------------------------------

def test_ctrl_c_before_the_handlers_or_while_the_data_is_prepared_is_one_line(tmp_path, finished, monkeypatch,
                                                                                capsys):
    run = copy_run(finished, tmp_path)

    def ctrl_c_now(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(forecasting.cli, "build_parser", ctrl_c_now)  # before StopSignals is installed
    assert forecast.main(["--run", str(run)]) == 130
    assert lines_of(capsys.readouterr().err) == ["error: stopped by SIGINT; nothing was written"]
    monkeypatch.undo()
    kill_self_in(monkeypatch, forecasting.cli, "from_run", signal.SIGINT)  # loading the run, simulating the data
    status, lines = run_forecast(capsys, run, run / "never")
    assert status == 130 and lines == ["error: stopped by SIGINT; nothing was written"]
    assert not (run / "never").exists()


def test_ctrl_c_while_forecast_py_imports_is_one_line(tmp_path):
    """The import of torch takes seconds: a Ctrl-C then is raised by the import (simulated here by a finder)."""
    driver = ("import sys, runpy\n"
              "class CtrlC:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'forecasting.cli':\n"
              "            raise KeyboardInterrupt\n"
              "sys.meta_path.insert(0, CtrlC())\n"
              "runpy.run_path('forecast.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", driver], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130
    assert lines_of(done.stderr) == ["error: stopped by SIGINT while starting; nothing was written"]


def test_a_run_stopped_before_its_first_checkpoint_does_not_mention_one(tmp_path, data, monkeypatch, capsys):
    def stopped_while_loading(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)
    monkeypatch.setattr(training.setup, "load_model_and_tokenizer", stopped_while_loading)
    run = tmp_path / "runs" / "r"
    status, lines = train(capsys, *TINY, "--data", data, "--steps", "2", "--runs-dir", run.parent, "--out", run)
    assert status == 143
    assert lines[-1] == ("train.py: stopped by SIGTERM before the first checkpoint (none was written); to continue, "
                         "run the same command with --resume")


# ---- odd places ----------------------------------------------------------------------------------------------------

def test_out_empty_or_dot_with_no_budget(tmp_path, finished, monkeypatch, capsys):
    run = copy_run(finished, tmp_path)
    status, lines = run_forecast(capsys, run, "")
    assert status == EXIT_USAGE and lines == ["error: --out must name a directory, got ''"]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    status = forecast.main(["--model", "tiny", "--data", str(run / ".." / ".." / "x.h5"), "--out", "."] + QUICK)
    assert status == EXIT_USAGE  # (no such data file: the refusal comes before anything is written)
    assert lines_of(capsys.readouterr().err) == [f"error: {run / '..' / '..' / 'x.h5'}: no such file"]
    status = forecast.main(["--model", "tiny", "--limit", "1", "--out", ".", "--no-budget", *QUICK])
    assert status == EXIT_OK, capsys.readouterr().err
    record = json.loads((here / "flops.json").read_text())
    assert record["run_name"] == "here"  # the directory `.` is, not an empty name
    assert (here / "metrics.json").is_file()


def test_an_out_that_is_the_runs_dir_itself_is_refused(tmp_path, data, capsys):
    runs = tmp_path / "runs"
    status, lines = train(capsys, *TINY, "--data", data, "--steps", "1", "--runs-dir", runs, "--out", runs)
    assert status == EXIT_USAGE and len(lines) == 1
    assert lines[0] == (f"train.py: error: {runs} is the runs directory itself: a run or a forecast needs a "
                        f"directory of its own inside it (such as {runs / 'name'})")
    assert not (runs / "flops.json").exists() and not (runs / "checkpoint.pt").exists()
    status = forecast.main(["--model", "tiny", "--data", data, "--limit", "1", "--runs-dir", str(runs), "--out",
                            str(runs), *QUICK])
    assert status == EXIT_USAGE
    assert lines_of(capsys.readouterr().err)[-1].startswith(f"error: {runs} is the runs directory itself")
    assert not (runs / "flops.json").exists() and not (runs / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_a_data_path_that_is_no_regular_file_says_what_it_is(tmp_path, finished, capsys, kind):
    if kind == "fifo":
        path, what = tmp_path / "pipe", "is a named pipe (FIFO)"
        os.mkfifo(path)
    else:
        path, what = Path("/dev/null"), "is a character device"
    run = copy_run(finished, tmp_path)
    status, lines = run_forecast(capsys, run, run / "f", "--data", path)
    assert status == EXIT_USAGE and lines == [f"error: {path}: {what}, not an h5 file"]
    status, lines = train(capsys, *TINY, "--data", path, "--steps", "1", "--runs-dir", tmp_path / "r",
                          "--out", tmp_path / "r" / "x")
    assert status != EXIT_OK and lines == [f"train.py: error: {path}: {what}, not an h5 file"]


def test_flops_refuses_a_ctx_beyond_the_models_positions(capsys):
    assert flops_cli.main(["--model", "tiny", "--ctx", "1000000000"]) == EXIT_USAGE
    assert lines_of(capsys.readouterr().err) == [
        "flops.py: error: --ctx 1000000000 is more than the 4096 positions tiny supports (max_position_embeddings "
        "in its config.json)"]
    assert flops_cli.main(["--model", "tiny", "--ctx", "4096"]) == EXIT_OK  # the limit itself is allowed


# ---- the report's writes -------------------------------------------------------------------------------------------

def test_a_report_that_cannot_be_written_is_one_line(tmp_path, finished, capsys):
    runs = copy_run(finished, tmp_path).parent
    (tmp_path / "a_file").write_text("not a directory")
    before = snapshot(runs)
    assert report_cli.main([str(runs), "--out", str(tmp_path / "a_file" / "report")]) == EXIT_FAILED
    [line] = lines_of(capsys.readouterr().err)
    assert line.startswith(f"report.py: error: {tmp_path / 'a_file'}") and line.endswith("the report was not written")
    assert snapshot(runs) == before


def test_a_full_disk_or_sigterm_while_the_report_is_written_leaves_no_temporary_file(tmp_path, finished,
                                                                                     monkeypatch, capsys):
    runs = copy_run(finished, tmp_path).parent
    out = tmp_path / "report"
    real = reporting.report.atomic_write

    def full(path, write):
        def then_fail(tmp):
            write(tmp)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, then_fail)
    monkeypatch.setattr(reporting.report, "atomic_write", full)
    assert report_cli.main([str(runs), "--out", str(out)]) == EXIT_FAILED
    [line] = lines_of(capsys.readouterr().err)
    assert line == f"report.py: error: {out / 'report.md'}: no space left on device: the report was not written"
    assert not (out / "report.md").exists() and not leftovers(out)

    def sigterm(path, write):
        def then_stop(tmp):
            write(tmp)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, then_stop)
    monkeypatch.setattr(reporting.report, "atomic_write", sigterm)
    assert report_cli.main([str(runs), "--out", str(out)]) == 143
    assert lines_of(capsys.readouterr().err)[-1] == "report.py: stopped by SIGTERM; report.md was not written"
    assert not (out / "report.md").exists() and not leftovers(out)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---- the second hostile pass (issue 22): outputs that cannot be, damaged files the report reads ---------------------

def test_a_tensorboard_dir_where_a_file_stands_is_refused_before_the_run_directory(tmp_path, data, monkeypatch,
                                                                                   capsys):
    monkeypatch.setattr(training.loop, "summary_writer_class", lambda: None)  # the package is not what is tested
    run, blocker = tmp_path / "runs" / "tb", tmp_path / "a_file"
    blocker.write_text("keep\n")
    for where in (blocker, blocker / "sub"):
        status, lines = train(capsys, *flags(run, data, "--steps", "1", "--tensorboard", "--tensorboard-dir", where))
        assert status == EXIT_USAGE and lines == [
            f"train.py: error: --tensorboard-dir {blocker}: exists and is not a directory, so the TensorBoard event "
            f"files cannot go to {where}"]
        assert not (tmp_path / "runs").exists() and blocker.read_text() == "keep\n"  # no run directory, no record
    with pytest.raises(SystemExit) as exit_:  # without --tensorboard it would be ignored: refused instead
        train(capsys, *flags(run, data, "--steps", "1", "--tensorboard-dir", tmp_path / "tb"))
    assert exit_.value.code == EXIT_USAGE and not (tmp_path / "runs").exists() and not (tmp_path / "tb").exists()
    assert capsys.readouterr().err.splitlines()[-1] == (
        "train.py: error: --tensorboard-dir says where --tensorboard writes: it needs --tensorboard")


def test_an_out_holding_a_directory_named_like_an_output_file_or_a_dangling_link_is_refused_before_forecasting(
        tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path)
    record = (run / "flops.json").read_bytes()
    (run / "forecast" / "metrics.json").mkdir(parents=True)
    status, lines = run_forecast(capsys, run, run / "forecast")
    assert status == EXIT_USAGE and lines[-1] == (
        f"error: cannot write the output: {run / 'forecast' / 'metrics.json'}: not a regular file, where the "
        "forecast writes its file of that name")
    (run / "dangling").symlink_to(tmp_path / "gone")
    status, lines = run_forecast(capsys, run, run / "dangling")
    assert status == EXIT_USAGE and lines[-1] == (
        f"error: cannot write the output: {run / 'dangling'}: a symbolic link to {tmp_path / 'gone'}, which does "
        "not exist")
    assert (run / "flops.json").read_bytes() == record and not (tmp_path / "gone").exists()  # nothing spent


def test_a_memory_budget_too_small_for_one_sample_does_not_advise_zero_samples():
    with pytest.raises(ValueError) as refused:
        check_samples_fit(2, 1, 100, 50, 2, 1e-9)
    assert "at most 0" not in str(refused.value) and "use fewer trajectories (--limit)" in str(refused.value)


REPORT_DAMAGE = [  # (case, file of the run's forecast or of the run, damage, the fault its warning names)
    ("metrics a number", "forecast/metrics.json", lambda m: m.update(metrics=5),
     "metrics must be a JSON object, got 5"),
    ("metrics.json a list", "forecast/metrics.json", lambda m: [], "not a JSON object (a list)"),
    ("a score a string", "forecast/metrics.json", lambda m: m["metrics"]["model"]["prey"].update(mse="abc"),
     "metrics.model.prey.mse must be a number, got 'abc'"),
    ("a species a number", "forecast/metrics.json", lambda m: m["metrics"]["model"].update(prey=7),
     "metrics.model.prey must be a JSON object, got 7"),
    ("trajectories a string", "forecast/metrics.json", lambda m: m.update(trajectories="x"),
     "trajectories must be a list, got 'x'"),
    ("ctx a list", "config.json", lambda c: c.update(ctx=[1]), "not a train.py run config (ctx must be a whole number"),
    ("rank null", "config.json", lambda c: c.update(rank=None), "rank must be a whole number, got None"),
    ("ctx and steps gone", "config.json", lambda c: [c.pop("ctx"), c.pop("steps")] and c,
     "not a train.py run config (missing ctx, steps)"),
    ("config.json a number", "config.json", lambda c: 5, "not a train.py run config (a JSON int, not an object)"),
]


@pytest.mark.parametrize("case,name,damage,fault", REPORT_DAMAGE, ids=[c[0] for c in REPORT_DAMAGE])
def test_the_report_names_a_damaged_forecast_or_run_config_and_goes_on(forecast_done, capsys, case, name, damage,
                                                                       fault):
    run, _ = forecast_done
    path = run / name
    value = json.loads(path.read_text())
    damaged = damage(value)
    path.write_text(json.dumps(value if damaged is None else damaged))
    before = snapshot(run)
    assert report_cli.main([str(run.parent), "--out", str(run.parent.parent / "report")]) == EXIT_OK
    [line] = lines_of(capsys.readouterr().err)
    assert line.startswith("report.py: warning: ") and str(path) in line and fault in line
    assert snapshot(run) == before


def test_a_runs_dir_that_is_a_file_is_named_as_not_a_directory(tmp_path, finished, capsys):
    target = tmp_path / "runs.txt"
    target.write_text("keep\n")
    status = forecast.main([str(a) for a in ["--run", finished, "--runs-dir", target, "--out", tmp_path / "out",
                                             *QUICK]])
    assert status == EXIT_USAGE and lines_of(capsys.readouterr().err) == [
        f"error: --runs-dir {target}: not a directory (the runs directory whose FLOP ledger counts this forecast)"]
    assert not (tmp_path / "out").exists()
    assert report_cli.main([str(target)]) == EXIT_USAGE
    assert lines_of(capsys.readouterr().err) == [f"report.py: error: {target}: not a directory"]
    assert flops_cli.main(["--runs", str(target)]) == EXIT_USAGE
    assert lines_of(capsys.readouterr().err) == [f"flops.py: error: --runs {target}: not a directory"]
    assert target.read_text() == "keep\n"


def test_the_report_of_a_copied_runs_dir_reads_the_copys_forecasts_not_the_originals(forecast_done, capsys):
    """flops.json books each forecast with its absolute --out: the copy's report must not show the original's."""
    run, out = forecast_done  # a copy of a run whose forecast was made elsewhere
    shutil.rmtree(out)
    assert report_cli.main([str(run.parent), "--out", str(run.parent.parent / "report")]) == EXIT_OK
    assert lines_of(capsys.readouterr().err) == [f"report.py: warning: forecast {out}: no metrics.json"]
