"""Plans of the wrong shape (issue 22, item 4): every value of every table is checked before anything runs, by the
rules of the settings it sets (TrainConfig for [train] and training stages, ForecastConfig for [forecast] and
forecast stages), and each fault is one line naming the file, the table, the key, the value and the expected type.

Each case runs train.py --plan in-process (the `main` train.py calls), expects exit 2 and one line, and checks that
the runs directory was never created (nothing ran, nothing was reserved).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_faults import lines_of

import study.jobs
import train as train_cli
from common.exit_codes import EXIT_USAGE
from study.jobs import JobOptions, run_local
from training.cli import failure_status
from training.stopping import Interrupted

STAGE = '[[stage]]\nname = "grid"\nsteps = 2\n'
FORECAST_STAGE = '[[stage]]\nname = "test"\nforecast = "grid"\n'


def plan_text(study: str = "", train: str = "", forecast: str = "", stages: str = STAGE) -> str:
    return (f'[study]\nname = "s"\n{study}\n[train]\nmodel = "tiny"\nbatch = 2\nctx = 32\n{train}\n'
            f"[forecast]\nlimit = 1\n{forecast}\n{stages}")


# (case, plan text, the pieces its one line must name). The expected types are those of TrainConfig's and
# ForecastConfig's annotations (common.fields), the names of the tables those of the plan file.
CASES = [
    ("full is a string", plan_text(train='full = "no"'), ["[train]", "full", "'no'", "true or false"]),
    ("lr is a bool", plan_text(train="lr = true"), ["[train]", "lr", "True", "a number"]),
    ("a stage's lr grid holds a bool", plan_text(stages=STAGE + "lr = [1e-4, true]\n"),
     ["stage 1 (grid)", "lr", "True", "a number"]),
    ("targets is one string", plan_text(train='targets = "q_proj"'),
     ["[train]", "targets", "'q_proj'", "a list of strings"]),
    ("max_flops is inf", plan_text(study="max_flops = inf"), ["[study] max_flops", "inf", "positive whole number"]),
    ("max_flops is nan", plan_text(study="max_flops = nan"), ["[study] max_flops", "nan", "positive whole number"]),
    ("runs_dir is a number", plan_text(study="runs_dir = 5"), ["[study] runs_dir", "5", "a string"]),
    ("[forecast] batch is 0", plan_text(forecast="batch = 0"), ["[forecast]", "batch", "0", ">= 1"]),
    ("baselines is one string", plan_text(forecast='baselines = "persistence"'),
     ["[forecast]", "baselines", "'persistence'", "a list of strings"]),
    ("an unknown baseline", plan_text(forecast='baselines = ["persistance"]'),
     ["[forecast]", "baselines", "'persistance'", "lv_fit"]),
    ("split is bogus", plan_text(forecast='split = "bogus"'), ["[forecast]", "split", "'bogus'", "train, val, test"]),
    ("a forecast stage's temperature is a string", plan_text(stages=STAGE + FORECAST_STAGE + 'temperature = "hot"\n'),
     ["stage 2 (test)", "temperature", "'hot'", "a finite number >= 0 or \"auto\""]),
    ("a value [train] gives, refused by its rule, is named in [train]", plan_text(train="rank = -1"),
     ["[train]", "rank", "-1", "positive integer"]),
    ("[train] dtype is bogus", plan_text(train='dtype = "bogus"'), ["[train]", "dtype", "'bogus'", "float32"]),
    ("[stage] instead of [[stage]]", plan_text(stages='[stage]\nname = "grid"\n'), ["[[stage]]", "'grid'"]),
    ("[train] is a value, not a table", 'train = 5\n[study]\nname = "s"\n' + STAGE, ["train", "5", "[train]"]),
    ("from names a list", plan_text(stages=STAGE + '[[stage]]\nname = "next"\nfrom = ["grid"]\n'),
     ["stage 2 (next)", "from", "['grid']"]),
    ("a stage named study.json", plan_text(stages='[[stage]]\nname = "study.json"\nsteps = 2\n'),
     ["stage 1", "'study.json'"]),
]


@pytest.mark.parametrize("case,text,named", CASES, ids=[c[0] for c in CASES])
def test_a_plan_value_of_the_wrong_type_is_one_line_naming_it_before_anything_runs(tmp_path, capsys, case, text,
                                                                                    named):
    plan, runs = tmp_path / "plan.toml", tmp_path / "runs"
    plan.write_text(text)
    status = train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)])
    lines = lines_of(capsys.readouterr().err)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert lines[0].startswith(f"train.py: error: {plan}"), lines[0]  # the file first
    for piece in named:
        assert piece in lines[0], (piece, lines[0])
    assert not runs.exists()  # checked before the ledger, the study directory or a run was touched


def test_a_plan_that_is_not_utf8_is_named_with_the_byte_at_fault(tmp_path, capsys):
    plan = tmp_path / "plan.toml"
    plan.write_bytes(plan_text().encode().replace(b'"s"', b'"\xff"'))
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(tmp_path / "runs")]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    offset = plan.read_bytes().index(b"\xff")
    assert line == f"train.py: error: {plan}: not UTF-8 text (byte 0xff at offset {offset}); a plan is a TOML file"


def test_a_stage_or_study_directory_that_holds_a_run_of_its_own_is_refused(tmp_path, capsys):
    """A run trained by hand at <runs>/s/grid (or <runs>/s) would be mixed with the stage's runs (or the study's)."""
    runs, plan = tmp_path / "runs", tmp_path / "plan.toml"
    plan.write_text(plan_text())
    (runs / "s" / "grid").mkdir(parents=True)
    (runs / "s" / "grid" / "config.json").write_text(json.dumps({"model": "tiny"}))
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    assert f"{runs / 's' / 'grid'} holds a training run of its own (config.json)" in line
    (runs / "s" / "grid" / "config.json").rename(runs / "s" / "config.json")
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    assert f"the study's directory {runs / 's'} holds a training run of its own" in line
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == [Path("s"), Path("s/config.json"),
                                                                    Path("s/grid")] != before


@pytest.mark.parametrize("damage", [b'{"name": "s", "plan_sha', b"[1, 2]"], ids=["torn", "a list"])
def test_a_damaged_study_json_is_one_line_and_kept(tmp_path, capsys, damage):
    runs, plan = tmp_path / "runs", tmp_path / "plan.toml"
    plan.write_text(plan_text())
    (runs / "s").mkdir(parents=True)
    (runs / "s" / "study.json").write_bytes(damage)
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    assert line.startswith(f"train.py: error: {runs / 's' / 'study.json'}: ")
    assert "move it away to start the study again" in line
    assert (runs / "s" / "study.json").read_bytes() == damage


def test_gpus_on_a_machine_without_cuda_is_refused_not_run_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan, runs = tmp_path / "plan.toml", tmp_path / "runs"
    plan.write_text(plan_text())
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--plan", str(plan), "--runs-dir", str(runs), "--gpus", "0"])
    assert exit_.value.code == EXIT_USAGE and not runs.exists()
    assert lines_of(capsys.readouterr().err)[-1].startswith("train.py: error: --gpus 0: no CUDA device is available")


def test_sigterm_to_a_driver_of_jobs_stops_them_and_is_exit_143_naming_sigterm(tmp_path, monkeypatch, capsys):
    """The driver's SIGTERM handler: its jobs get a SIGTERM and are waited for; train.py says SIGTERM, exits 143."""
    children = []

    def start(spec, gpu, folder, log):  # a job that only a signal ends
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        process.log_file = open(folder / "job.log", "a")
        children.append(process)
        return process
    monkeypatch.setattr(study.jobs, "_start_local", start)
    monkeypatch.setattr(study.jobs.time, "sleep", lambda seconds: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Interrupted) as stopped:
        run_local([{"run": "grid/a"}], JobOptions(jobs=1), tmp_path, print)
    assert [c.returncode for c in children] == [-signal.SIGTERM]  # stopped and waited for, not left running
    assert failure_status(stopped.value, "train.py", "the same command") == 143
    assert lines_of(capsys.readouterr().err) == [
        "train.py: stopped by SIGTERM (the newest checkpoint is the one written before); to continue, run the same "
        "command"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_forecast_stage_that_scores_nothing_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    """A plan's forecast stage whose forecasts all failed to parse (forecasting.budget.NothingScored: its FLOPs stay
    booked) ends the plan as forecast.py ends: one line, exit 1, not a traceback."""
    import study.run
    from forecasting.budget import NothingScored

    def nothing_scored(*args, **kwargs):
        raise NothingScored("no forecast of the 1 trajectory parsed: nothing to score")

    monkeypatch.setattr(study.run, "budgeted_evaluate", nothing_scored)
    from test_train import write_small_data

    data = write_small_data(tmp_path / "lv40.h5")
    plan = tmp_path / "p.toml"
    plan.write_text(plan_text(train=f'data = "{data}"', stages='[[stage]]\nname = "zero_shot"\nforecast = "base"\n'))
    status = train_cli.main(["--plan", str(plan), "--runs-dir", str(tmp_path / "runs")])
    lines = lines_of(capsys.readouterr().err)
    assert status == 1 and len(lines) == 1 and "nothing to score" in lines[0], lines
