"""Hostile input, round 2 (issue 22), the ledger and run half: records that lie, locks that are not locks, runs dirs
inside runs dirs, a lost flops.json, arguments checked only after FLOPs were reserved, starts that fail.

Every case runs the real `main` of train.py, forecast.py or flops.py in-process and checks the documented exit
status, exactly one line naming the file, key or value at fault (no traceback), and that every file that existed
before is byte-identical afterwards (a record's "lock" that names checkpoint.pt or an h5 must not empty it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_faults import REPO, TINY, copy_run, data, finished, lines_of, train  # noqa: F401 (fixtures)

import accounting.cli
import forecasting.cli
import training.setup
from common.exit_codes import EXIT_FAILED, EXIT_USAGE
from forecasting.metering import DECODE_STEPS_PER_REPORT
from ledger import RECORD_NAME, Record, read_record, read_records
from qwen_mini.loading import CheckpointError


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (lock files aside: taking one rewrites its holder line)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink() and p.suffix != ".lock"}


def edit_record(run: Path, change) -> None:
    path = run / RECORD_NAME
    record = json.loads(path.read_text())
    change(record, run)
    path.write_text(json.dumps(record))


def reservation(lock, **more) -> dict:
    return {"id": "0123456789ab", "kind": "forecast", "flops": 1000, "spent": 0, "lock": str(lock), "pid": 1,
            "host": "elsewhere", **more}


def forecast_main(capsys, *argv) -> tuple[int, list[str]]:
    status = forecasting.cli.main([str(a) for a in argv])
    return status, lines_of(capsys.readouterr().err)


def flops_main(capsys, *argv) -> tuple[int, list[str]]:
    status = accounting.cli.main([str(a) for a in argv])
    return status, lines_of(capsys.readouterr().err)


def run_tool(tool: str, capsys, run: Path, data: str) -> tuple[int, list[str]]:
    """The command each table row runs against the (damaged) run: a plain forecast, --settle, or a resume."""
    runs = run.parent
    if tool == "forecast":  # without --runs-dir: the record's own runs_dir is read too
        return forecast_main(capsys, "--run", run, "--limit", "1", "--horizon", "2", "--quiet")
    if tool == "forecast-in-runs":
        return forecast_main(capsys, "--run", run, "--runs-dir", runs, "--limit", "1", "--horizon", "2", "--quiet")
    if tool == "settle":
        return flops_main(capsys, "--model", "tiny", "--runs", runs, "--settle")
    assert tool == "resume"
    return train(capsys, *TINY, "--data", data, "--runs-dir", runs, "--out", run, "--steps", "4", "--resume")


EXIT_OF = {"forecast": EXIT_USAGE, "forecast-in-runs": EXIT_USAGE, "settle": EXIT_USAGE, "resume": EXIT_FAILED}


def lock_names_checkpoint(record, run):
    record["reservations"] = [reservation(run / "checkpoint.pt")]


def lock_names_data(record, run):  # the h5 lies outside the run: the `data` fixture's file
    record["reservations"] = [reservation(Path(record["config"]["data"]).resolve())]


def lock_is_a_symlink_to_the_checkpoint(record, run):
    (run / "evil.lock").symlink_to(run / "checkpoint.pt")
    record["reservations"] = [reservation(run / "evil.lock")]


def lock_is_a_directory(record, run):
    (run / ".reservation-0123456789ab.lock").mkdir()
    record["reservations"] = [reservation(run / ".reservation-0123456789ab.lock")]


# (what is wrong, how the record is damaged, the tool, what its one line must name)
RECORD_CASES = [
    ("lock names checkpoint.pt", lock_names_checkpoint, "forecast", ["reservations[0].lock", "checkpoint.pt"]),
    ("lock names checkpoint.pt", lock_names_checkpoint, "settle", ["reservations[0].lock", "checkpoint.pt"]),
    ("lock names the h5", lock_names_data, "settle", ["reservations[0].lock", ".h5"]),
    ("lock names the h5", lock_names_data, "forecast-in-runs", ["reservations[0].lock", ".h5"]),
    ("lock is a symlink", lock_is_a_symlink_to_the_checkpoint, "settle", ["evil.lock", "plain file"]),
    ("lock is a directory", lock_is_a_directory, "settle", [".reservation-0123456789ab.lock", "plain file"]),
    ("by_kind a string", lambda r, run: r.update(by_kind="lots"), "settle", ["by_kind", "lots"]),
    ("by_kind a string", lambda r, run: r.update(by_kind="lots"), "resume", ["by_kind", "lots"]),
    ("train a list", lambda r, run: r.update(train=[]), "forecast", ["train must be a JSON object"]),
    ("reservation without lock", lambda r, run: r.update(reservations=[{"id": "x", "flops": 5}]), "settle",
     ["reservations[0].lock"]),
    ("reservations not a list", lambda r, run: r.update(reservations="all"), "resume", ["reservations", "all"]),
    ("runs_dir is /", lambda r, run: r.update(runs_dir="/"), "forecast", ["runs_dir '/'", "--runs-dir"]),
    ("runs_dir a number", lambda r, run: r.update(runs_dir=5), "settle", ["runs_dir", "5"]),
]


@pytest.mark.parametrize("what, damage, tool, named", RECORD_CASES, ids=[f"{c[0]}-{c[2]}" for c in RECORD_CASES])
def test_a_record_that_lies_is_refused_in_one_line_and_no_file_changes(tmp_path, finished, data, capsys, what, damage,
                                                                       tool, named):
    run = copy_run(finished, tmp_path)
    edit_record(run, damage)
    before, data_before = digest(run.parent), hashlib.sha256(Path(data).read_bytes()).hexdigest()
    status, lines = run_tool(tool, capsys, run, data)
    assert status == EXIT_OF[tool], lines
    assert len(lines) == 1 and all(n in lines[0] for n in named), lines
    assert str(run / RECORD_NAME) in lines[0] or "runs_dir" in lines[0] or ".lock" in lines[0], lines
    assert digest(run.parent) == before  # checkpoint.pt, flops.json and every other file byte-identical
    assert hashlib.sha256(Path(data).read_bytes()).hexdigest() == data_before
    assert (run / "checkpoint.pt").stat().st_size > 0


@pytest.mark.parametrize("kind", ["directory", "dangling symlink"])
def test_a_record_that_is_not_a_file_is_an_error_not_zero_spending(tmp_path, finished, data, capsys, kind):
    run = copy_run(finished, tmp_path)
    (run / RECORD_NAME).unlink()
    if kind == "directory":
        (run / RECORD_NAME).mkdir()
    else:
        (run / RECORD_NAME).symlink_to(tmp_path / "gone.json")
    before = digest(run.parent)
    for tool in ("settle", "resume"):
        status, lines = run_tool(tool, capsys, run, data)
        assert status == EXIT_OF[tool] and len(lines) == 1, lines
        assert f"{run / RECORD_NAME}: unreadable run record" in lines[0], lines
    assert digest(run.parent) == before


def test_a_ledger_lock_that_is_a_directory_is_named_and_nothing_is_written(tmp_path, data, capsys):
    runs = tmp_path / "runs"
    (runs / ".ledger.lock").mkdir(parents=True)
    status, lines = train(capsys, *TINY, "--data", data, "--steps", "3", "--runs-dir", runs, "--out", runs / "r")
    assert status == EXIT_FAILED and len(lines) == 1, lines
    assert str(runs / ".ledger.lock") in lines[0] and "plain file" in lines[0], lines
    assert sorted(p.name for p in runs.iterdir()) == [".ledger.lock"]


def test_settle_that_cannot_write_says_so_in_one_line(tmp_path, finished, data, capsys, monkeypatch):
    run = copy_run(finished, tmp_path)
    edit_record(run, lambda r, run: r.update(reservations=[reservation(run / ".reservation-0123456789ab.lock")]))
    before = digest(run.parent)

    def read_only(self):  # what a read-only mount answers to the record's atomic rewrite
        raise OSError(errno.EROFS, "Read-only file system", str(self.path))
    monkeypatch.setattr(Record, "write", read_only)
    status, lines = flops_main(capsys, "--model", "tiny", "--runs", run.parent, "--settle")
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert f"{run / RECORD_NAME}: read-only file system" in lines[0], lines
    assert digest(run.parent) == before


# ---- a runs directory inside another's ledger ----------------------------------------------------------------------

def test_a_runs_dir_inside_another_ledger_is_refused_so_the_outer_cap_holds(tmp_path, finished, data, capsys):
    outer = copy_run(finished, tmp_path).parent
    (outer / ".ledger.lock").touch()  # the outer ledger has been used (copy_run copies the run, not the ledger)
    spent = sum(r.flops_used for r in read_records(outer))
    status, lines = train(capsys, *TINY, "--data", data, "--steps", "3", "--runs-dir", outer / "sub",
                          "--out", outer / "sub" / "r", "--max-flops", spent + 1)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert f"lies inside the runs directory {outer.resolve()}" in lines[0] and f"--runs-dir {outer.resolve()}" in \
        lines[0], lines
    assert not (outer / "sub").exists()
    assert sum(r.flops_used for r in read_records(outer)) == spent


# ---- a lost flops.json ---------------------------------------------------------------------------------------------

def test_resume_rebuilds_a_deleted_record_from_the_checkpoint_and_metrics(tmp_path, finished, data, capsys):
    run = copy_run(finished, tmp_path)
    original = read_record(run / RECORD_NAME)
    (run / RECORD_NAME).unlink()
    status, lines = train(capsys, *TINY, "--data", data, "--runs-dir", run.parent, "--out", run, "--steps", "4",
                          "--resume")
    assert status == 0, lines
    assert any(f"{run / RECORD_NAME} was missing; rebuilt from checkpoint.pt (step 3)" in line for line in lines)
    resumed = read_record(run / RECORD_NAME)
    per_step = original.per_step_flops
    eval_pass = original.by_kind["eval"] // original.data["eval"]["passes"]
    # What the original record said, plus the one step and the one validation pass the resume ran.
    assert resumed.by_kind["train"] == original.by_kind["train"] + per_step
    assert resumed.by_kind["eval"] == original.by_kind["eval"] + eval_pass
    assert resumed.data["rebuilt"]["from"].startswith("checkpoint.pt (step 3)")


def test_a_forecast_on_a_run_whose_record_is_gone_is_refused_so_training_spend_is_not_forgotten(tmp_path, finished,
                                                                                                   data, capsys):
    run = copy_run(finished, tmp_path)
    original = read_record(run / RECORD_NAME)
    (run / RECORD_NAME).unlink()
    before = digest(run)
    status, lines = forecast_main(capsys, "--run", run, "--runs-dir", run.parent, "--limit", "1", "--horizon", "2",
                                  "--quiet")
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert f"{run / RECORD_NAME} is missing although {run} holds a trained run" in lines[0] and "--resume" in lines[0]
    assert digest(run) == before and not (run / RECORD_NAME).exists() and not list(run.glob("forecast*"))
    # The command the line names brings the training spend back; then the forecast books on top of it.
    assert train(capsys, *TINY, "--data", data, "--runs-dir", run.parent, "--out", run, "--steps", "3",
                 "--resume")[0] == 0
    assert read_record(run / RECORD_NAME).by_kind["train"] == original.by_kind["train"]
    status, lines = forecast_main(capsys, "--run", run, "--runs-dir", run.parent, "--limit", "1", "--horizon", "2",
                                  "--quiet")
    assert status == 0, lines
    after = read_record(run / RECORD_NAME)
    assert after.by_kind["train"] == original.by_kind["train"] and after.by_kind["forecast"] > 0


# ---- arguments checked before FLOPs are reserved -------------------------------------------------------------------

def test_a_context_too_short_for_lv_fit_is_refused_before_any_flops_are_reserved(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path)
    before = digest(run.parent)
    status, lines = forecast_main(capsys, "--run", run, "--runs-dir", run.parent, "--context", "1", "--horizon", "1",
                                  "--quiet")
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert "context 1 is too short for the baseline lv_fit" in lines[0], lines
    assert digest(run.parent) == before  # flops.json included: nothing reserved, nothing booked
    status, lines = forecast_main(capsys, "--run", run, "--runs-dir", run.parent, "--context", "1", "--horizon", "1",
                                  "--baselines", "persistence", "--limit", "1", "--quiet")
    assert status == 0, lines


# ---- a start that fails leaves no record ---------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_device_this_machine_lacks_is_one_line_exit_2_before_anything(tmp_path, finished, data, capsys, device):
    runs = tmp_path / "runs"
    status, lines = train(capsys, *TINY, "--data", data, "--steps", "3", "--runs-dir", runs, "--out", runs / "r",
                          "--device", device)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert f"--device {device}: no CUDA device is available" in lines[0], lines
    assert not runs.exists()
    run = copy_run(finished, tmp_path)
    before = digest(run.parent)
    status, lines = forecast_main(capsys, "--run", run, "--device", device, "--quiet")
    assert status == EXIT_USAGE and len(lines) == 1 and f"--device {device}: no CUDA" in lines[0], lines
    assert digest(run.parent) == before


def test_a_model_that_fails_to_load_leaves_no_record_and_no_directory(tmp_path, data, capsys, monkeypatch):
    runs = tmp_path / "runs"

    def damaged(*args, **kwargs):  # what loading a truncated model.safetensors raises
        raise CheckpointError("model/model.safetensors: truncated (12 of 4096 bytes)")
    monkeypatch.setattr(training.setup, "load_model_and_tokenizer", damaged)
    status, lines = train(capsys, *TINY, "--data", data, "--steps", "3", "--runs-dir", runs, "--out", runs / "r",
                          "--gqa", "real")
    assert status == EXIT_FAILED and len(lines) == 1 and "model.safetensors: truncated" in lines[0], lines
    assert read_records(runs) == [] and not (runs / "r").exists()
    monkeypatch.undo()  # the model loads now: a rerun with the other convention is not blocked by a stale record
    status, lines = train(capsys, *TINY, "--data", data, "--steps", "1", "--runs-dir", runs, "--out", runs / "r",
                          "--gqa", "mha")
    assert status == 0, lines
    assert [r.gqa for r in read_records(runs)] == ["mha"]


def test_a_reservation_for_a_lock_of_its_own_record_still_settles(tmp_path, finished, capsys):
    """The check on a record's locks refuses only paths outside it: a dead job's own lock is released as before."""
    run = copy_run(finished, tmp_path)
    edit_record(run, lambda r, run: r.update(reservations=[reservation(run / ".reservation-0123456789ab.lock")]))
    spent = read_record(run / RECORD_NAME).flops_used
    status, lines = flops_main(capsys, "--model", "tiny", "--runs", run.parent, "--settle")
    assert status == 0, lines
    record = read_record(run / RECORD_NAME)
    assert record.reservations == [] and record.flops_used == spent
    assert os.listdir(run).count(".reservation-0123456789ab.lock") == 0


# ---- a forecast killed in the middle of a generate call ------------------------------------------------------------

KILL_AFTER_A_DECODE_REPORT = """
import os, signal
import forecasting.metering as metering
read = metering.ReportingConstraint.read
def read_then_die(self, tokens):  # kill -9 right after the call reported decode FLOPs: in the middle of the call
    read(self, tokens)
    if self.reported is not None and self.reported >= metering.DECODE_STEPS_PER_REPORT:
        os.kill(os.getpid(), signal.SIGKILL)
metering.ReportingConstraint.read = read_then_die
"""


def test_a_forecast_killed_mid_call_has_booked_what_it_computed_and_settle_keeps_it(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path)
    before = read_record(run / RECORD_NAME)
    code = (f"import sys\n{KILL_AFTER_A_DECODE_REPORT}\nfrom forecasting.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    argv = ["--run", run, "--runs-dir", run.parent, "--limit", "2", "--horizon", "20", "--baselines", "persistence",
            "--quiet"]
    killed = subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    record = read_record(run / RECORD_NAME)
    [entry] = [e for e in record.forecasts if e not in before.forecasts]
    assert entry["calls"] == 0  # no generate call finished: all of it was booked while the call ran
    assert entry["prefill_flops"] > 0 and entry["decode_flops"] > 0
    assert entry["decode_tokens"] >= 2 * DECODE_STEPS_PER_REPORT  # 2 rows x the forwards before the report
    spent = record.by_kind["forecast"] - before.by_kind["forecast"]
    assert spent == entry["flops"] == entry["prefill_flops"] + entry["decode_flops"]
    [held] = record.reservations
    assert held["spent"] == spent
    status, lines = flops_main(capsys, "--model", "tiny", "--runs", run.parent, "--settle")
    assert status == 0, lines
    settled = read_record(run / RECORD_NAME)
    assert settled.reservations == [] and settled.by_kind["forecast"] - before.by_kind["forecast"] == spent > 0
