"""Hostile input to training, round 3 (issue 35, items 11, 12 and 14, training's parts): absurd step counts are
counted, not listed, and refused in one line; seeds no generator takes are refused before any FLOP; data too short
for a plan's forecasts is refused before any run trains; a plan name holding NUL is one line; an unwritable
--tensorboard-dir leaves no run behind; a run stopped before its first checkpoint says so."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import lines_of
from test_train import tiny_config, write_small_data

import train as train_cli
from common.exit_codes import EXIT_OVER_BUDGET, EXIT_USAGE
from data.lotka_volterra import save, simulate
from ledger import read_records
from training import train_run
from training.budget import evaluation_count
from training.cli import failure_status
from training.stopping import Interrupted

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--batch", "2", "--ctx", "32", "--val-batches", "1", "--rank", "2"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv10.h5", n=10)


def run_cli(argv, cwd: Path, timeout: float = 120):
    """train.py / flops.py in a process of its own: a hang is a failed test, not a stuck suite."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWEN_MINI_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("start, steps, every", [(0, 10, 3), (0, 9, 3), (0, 1, 5), (4, 10, 3), (3, 9, 3), (6, 6, 2),
                                                 (0, 7, 1), (5, 12, 100), (7, 5, 2)])
def test_evaluation_count_is_the_number_of_validation_steps(start, steps, every):
    """Counted against the steps listed by the loop's own rule: step 0 of a fresh run, every `every`-th, the last."""
    listed = [s for s in range(start, steps + 1)
              if (s == 0 and start == 0) or (s > start and (s % every == 0 or s == steps))]
    assert evaluation_count(start, steps, every) == len(listed)


def test_a_billion_steps_are_counted_at_once_and_more_are_refused(tmp_path, small_data):
    """--steps 1e9 --eval-every 1 (a MemoryError listing a billion steps) is refused by the budget in one line;
    --steps 1e10 (a hang) is refused as a setting; both before anything is written."""
    runs = tmp_path / "runs"
    done = run_cli([ROOT / "train.py", *TINY, "--data", small_data, "--runs-dir", runs, "--steps", "1000000000",
                    "--eval-every", "1"], tmp_path)
    assert done.returncode == EXIT_OVER_BUDGET and "refused by the FLOP budget" in done.stderr, done.stderr
    assert len(lines_of(done.stderr)) == 1
    done = run_cli([ROOT / "train.py", *TINY, "--data", small_data, "--runs-dir", runs, "--steps", "10000000000"],
                   tmp_path)
    assert done.returncode == EXIT_USAGE and "steps must be at most 1e+09" in done.stderr, done.stderr
    assert not [p for p in runs.iterdir() if p.is_dir()]  # no run directory (the ledger's lock file aside)


def test_a_plan_of_1e26_steps_is_one_line_not_a_hang(tmp_path, small_data):
    plan = tmp_path / "p.toml"
    plan.write_text(f'[study]\nname = "s"\n[train]\nmodel = "tiny"\ndata = "{small_data}"\n'
                    '[[stage]]\nname = "grid"\nsteps = 100000000000000000000000000\n')
    for tool in ("flops.py", "train.py"):
        done = run_cli([ROOT / tool, "--plan", plan, "--runs-dir" if tool == "train.py" else "--runs",
                        tmp_path / "runs"], tmp_path)
        assert done.returncode == EXIT_USAGE and "steps must be at most" in done.stderr, (tool, done.stderr)
        assert len(lines_of(done.stderr)) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag, value", [("--seed", "-3"), ("--split-seed", "-1"), ("--seed", str(2 ** 76))])
def test_a_seed_no_generator_takes_is_refused_before_any_flop(tmp_path, capsys, small_data, flag, value):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as refused:
        train_cli.main([*TINY, "--data", small_data, "--runs-dir", str(runs), "--steps", "2", flag, value])
    assert refused.value.code == EXIT_USAGE and f"argument {flag}: expected an integer >= 0" in capsys.readouterr().err
    assert not runs.exists()


@pytest.mark.parametrize("setting", ["seed = -3", "split_seed = -1", f"seed = {2 ** 63}"])
def test_a_plans_seed_no_generator_takes_is_refused_before_any_flop(tmp_path, capsys, small_data, setting):
    plan = tmp_path / "p.toml"
    plan.write_text(f'[study]\nname = "s"\n[train]\nmodel = "tiny"\ndata = "{small_data}"\n{setting}\n'
                    '[[stage]]\nname = "grid"\nsteps = 2\n')
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(tmp_path / "runs")]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    assert "[train]" in line and setting.split(" = ")[0] in line and not (tmp_path / "runs").exists()


def test_data_too_short_for_a_plans_forecasts_is_refused_before_any_run_trains(tmp_path, capsys):
    """60 steps cannot hold the forecast stage's context 50 + horizon 50: one line naming the file and the stage."""
    data = tmp_path / "short.h5"
    save(data, simulate(n=10, steps=60, seed=1))
    plan = tmp_path / "p.toml"
    plan.write_text(f'[study]\nname = "s"\n[train]\nmodel = "tiny"\ndata = "{data}"\nbatch = 2\nctx = 32\n'
                    '[[stage]]\nname = "grid"\nsteps = 2\n[[stage]]\nname = "test"\nforecast = "grid"\n')
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(tmp_path / "runs")]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    assert f"stage test: data {data} has 60 steps: cannot take a context of 50 and a horizon of 50" in line
    assert read_records(tmp_path / "runs") == []


@pytest.mark.parametrize("study, stage, named", [
    ("a\\u0000b", "grid", "[study] name must be a plain directory name, got 'a\\x00b'"),
    ("a\\nb", "grid", "[study] name must be a plain directory name, got 'a\\nb'"),
    ("x" * 201, "grid", "[study] name must be a plain directory name"),
    ("s", "g\\u0000", "stage 1: every stage needs a plain `name`, got 'g\\x00'")])
def test_a_plan_name_no_directory_can_have_is_one_line(tmp_path, capsys, small_data, study, stage, named):
    plan = tmp_path / "p.toml"
    plan.write_text(f'[study]\nname = "{study}"\n[train]\nmodel = "tiny"\ndata = "{small_data}"\n'
                    f'[[stage]]\nname = "{stage}"\nsteps = 2\n')
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(tmp_path / "runs")]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    assert named in line and "\x00" not in line and not (tmp_path / "runs").exists()


def test_an_unwritable_tensorboard_dir_leaves_no_run_behind(tmp_path, capsys, small_data):
    """A read-only place (a file makes its parent unusable for directories; /sys takes no new files even as root)
    is refused before the run directory exists, so a plain rerun without --tensorboard starts cleanly."""
    runs = tmp_path / "runs"
    argv = [*TINY, "--data", small_data, "--runs-dir", str(runs), "--steps", "1"]
    for place in ("/sys/qwen_mini_tensorboard", "/proc/qwen_mini_tensorboard"):
        assert train_cli.main([*argv, "--tensorboard", "--tensorboard-dir", place]) == EXIT_USAGE
        [line] = lines_of(capsys.readouterr().err)
        assert f"--tensorboard-dir {place}: the TensorBoard event files cannot be written there" in line
        assert not runs.exists()
    assert train_cli.main(argv) == 0


def test_a_run_stopped_before_its_first_checkpoint_says_none_was_written(tmp_path, capsys, small_data):
    """A job's SIGTERM during step 0's validation: the job's line (failure_status without its configs, as
    study.worker calls it) must not speak of a checkpoint 'written before'."""
    def sigterm_at_step_0(step, entry):
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
    config = tiny_config(tmp_path / "runs" / "r", small_data, steps=3, checkpoint_every=1)
    with pytest.raises(Interrupted) as stopped:
        train_run(config, hooks=[sigterm_at_step_0], progress=False)
    assert failure_status(stopped.value, "train.py: grid/r", "the same train.py --plan command") == 143
    assert lines_of(capsys.readouterr().err) == [
        "train.py: grid/r: stopped by SIGTERM before the first checkpoint (none was written); to continue, run the "
        "same train.py --plan command"]
    assert not (tmp_path / "runs" / "r" / "checkpoint.pt").exists()
