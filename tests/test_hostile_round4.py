"""Hostile input, round 4 (issue 42, items 3, 4, 7, 9, 10, 16, 19, 20 and 22): a flag no run of a plan takes is
refused, not a study of its own; flops.py --plan costs the study train.py will run; Ctrl-C at a run's last step stops
the plan (130); --data spelled otherwise than the plan's is the same data; an absurd learning rate is refused before
any FLOP; a rerun stopped after one stage keeps study.json's other stages; bench/gpu_check.py's OUT is resolved and
checked before any part runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import lines_of
from test_train import tiny_config, write_small_data

import flops as flops_cli
import study.jobs
import train as train_cli
from bench import gpu_check
from common.exit_codes import EXIT_OK, EXIT_USAGE
from ledger import read_records
from study.identity import study_for
from study.plan import load_plan
from study.run import run_plan
from training import train_run
from training.cli import failure_status
from training.stopping import Interrupted

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = 'model = "tiny"\nbatch = 2\nctx = 32\nrank = 2\nval_batches = 1\n'


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv10.h5", n=10)


def write_plan(path: Path, data: str, stages: str, train: str = "") -> str:
    path.write_text(f'[study]\nname = "s"\n[train]\n{TINY_TRAIN}data = "{data}"\n{train}\n{stages}')
    return str(path)


GRID_THEN_FINAL = ('[[stage]]\nname = "grid"\nlr = [1e-3, 1e-2]\nsteps = 1\n'
                   '[[stage]]\nname = "final"\nfrom = "grid"\nsteps = 2\n')


# ---- item 3: a flag that every stage overrides ---------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, named", [
    ("--lr", "0.5", "--lr 0.5: no run of {plan} would take it: every training stage (grid, final) sets its own lr "
                    "or takes it from the stage it starts from; leave the flag out, or change the plan"),
    ("--steps", "3", "--steps 3: no run of {plan} would take it: every training stage (grid, final) sets its own "
                     "steps"),
    ("--split", "random", "--split random: no run of {plan} would take it")])
def test_a_flag_no_run_of_the_plan_takes_is_refused_and_forks_no_study(tmp_path, capsys, small_data, flag, value,
                                                                       named):
    """grid sets lr and steps, final takes lr from grid and sets its own steps: --lr and --steps change no run (and
    --split, where [train] is overridden by both stages' split_mode). Refused in one line before anything runs,
    rather than a study s-<key> that trains the same runs again."""
    plan = write_plan(tmp_path / "p.toml", small_data,
                      GRID_THEN_FINAL.replace('steps = 1\n', 'steps = 1\nsplit_mode = "ordered"\n', 1)
                      .replace('steps = 2\n', 'steps = 2\nsplit_mode = "ordered"\n'))
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs), flag, value]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    assert line.startswith("train.py: error: " + named.format(plan=plan)), line
    assert not runs.exists()


def test_which_stages_take_a_setting_from_train(tmp_path, small_data):
    """A stage sized by the cap (steps = "rest") sets its steps; a `from` stage takes its source's lr but not its
    eval_every (study.plan.inherited), so --eval-every still reaches it; a forecast of the base model takes --model."""
    from study.cli import refuse_unused_settings
    from study.plan import PlanError

    plan = load_plan(write_plan(tmp_path / "p.toml", small_data,
                                '[[stage]]\nname = "grid"\nlr = [1e-3, 1e-2]\nsteps = 2\neval_every = 1\n'
                                '[[stage]]\nname = "final"\nfrom = "grid"\nsteps = "rest"\n'))
    for key, value in (("steps", 3), ("lr", 0.5)):
        with pytest.raises(PlanError, match=f"every training stage \\(grid, final\\) sets its own {key}"):
            refuse_unused_settings(plan, {key: value})
    refuse_unused_settings(plan, {"eval_every": 1, "rank": 4})  # final's eval_every, and every stage's rank
    base = load_plan(write_plan(tmp_path / "b.toml", small_data, '[[stage]]\nname = "zero_shot"\nforecast = "base"\n'))
    refuse_unused_settings(base, {"model": "tiny", "decimals": 3})
    with pytest.raises(PlanError, match="--lr 0.5: no run of .* would take it: it has no training stage"):
        refuse_unused_settings(base, {"lr": 0.5})


def test_a_flag_some_run_takes_still_wins(tmp_path, capsys, small_data):
    """--lr with a stage that does not set lr (a forecast of the base model aside): taken, not refused."""
    plan = write_plan(tmp_path / "p.toml", small_data, '[[stage]]\nname = "grid"\nsteps = 1\n'
                      '[[stage]]\nname = "other"\nlr = 1e-3\nsteps = 1\n')
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs), "--lr", "0.5"]) == EXIT_OK
    study = json.loads((runs / "s" / "study.json").read_text())
    [grid_run] = study["stages"][0]["runs"]
    assert json.loads((Path(grid_run) / "config.json").read_text())["lr"] == 0.5


# ---- item 7: flops.py --plan after the data changed in place -------------------------------------------------------

def test_flops_plan_costs_the_study_train_py_will_run_after_the_data_changed(tmp_path, capsys, small_data):
    data = write_small_data(tmp_path / "lv.h5", n=10)
    plan = write_plan(tmp_path / "p.toml", data, '[[stage]]\nname = "grid"\nsteps = 2\n')
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs)]) == EXIT_OK
    capsys.readouterr()
    write_small_data(tmp_path / "lv.h5", n=10, seed=9)  # the same shape, other numbers: the same FLOPs
    assert flops_cli.main(["--plan", plan, "--runs", str(runs), "--json"]) == EXIT_OK
    out, err = capsys.readouterr()
    estimate = json.loads(out)
    fresh = load_plan(plan, runs_dir=tmp_path / "fresh")  # the same plan where nothing ran yet: all of it needed
    assert flops_cli.main(["--plan", plan, "--runs", str(tmp_path / "fresh"), "--json"]) == EXIT_OK
    needed = json.loads(capsys.readouterr().out)["needed"]
    assert needed > 0 and estimate["needed"] == needed, estimate
    own = study_for(load_plan(plan, runs_dir=runs), log=lambda line: None)
    assert own.name.startswith("s-") and f"{own.study_dir}/" in err and fresh.name == "s"
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs)]) == EXIT_OK  # trains what flops.py counted
    assert f"a study of its own: {own.study_dir}/" in capsys.readouterr().out


def test_flops_plan_refuses_what_train_py_refuses_another_version_of_the_plan(tmp_path, capsys, small_data):
    """The study directory holds a study of the plan's earlier text: train.py --plan refuses it, so flops.py --plan
    does too (it used to cost the edited plan as if it would run, "fits")."""
    plan = write_plan(tmp_path / "p.toml", small_data, '[[stage]]\nname = "grid"\nsteps = 1\n')
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs)]) == EXIT_OK
    write_plan(tmp_path / "p.toml", small_data, '[[stage]]\nname = "grid"\nsteps = 2\n')
    capsys.readouterr()
    for tool, argv in ((train_cli, ["--runs-dir", str(runs)]), (flops_cli, ["--runs", str(runs)])):
        assert tool.main(["--plan", plan, *argv]) == EXIT_USAGE
        [line] = lines_of(capsys.readouterr().err)
        assert f"{runs / 's'} holds a study started from another version of a plan" in line, line


# ---- item 9: Ctrl-C at a run's last step ---------------------------------------------------------------------------

def sigint_at(step_wanted: int):
    def hook(step, entry):
        if step == step_wanted:
            os.kill(os.getpid(), signal.SIGINT)
    return hook


def test_ctrl_c_at_the_last_step_finishes_the_run_and_stops(tmp_path, capsys, small_data):
    """The signal comes after the last step's stop check (here: while its metrics line is logged, after the final
    validation): the run finishes (checkpoint and adapter saved, its ledger record settled), then stops, 130."""
    run = tmp_path / "runs" / "r"
    config = tiny_config(run, small_data, steps=2, ctx=32, batch=2, val_batches=1)
    with pytest.raises(Interrupted) as stopped:
        train_run(config, hooks=[sigint_at(2)], progress=False)
    assert stopped.value.run_finished and stopped.value.checkpoint_step == 2
    assert (run / "adapter").is_dir() and (run / "checkpoint.pt").is_file()
    [record] = read_records(tmp_path / "runs")
    assert record.reservations == [] and record.data.get("finished")  # settled as a finished run
    assert failure_status(stopped.value, "train.py", "the same command") == 130
    assert lines_of(capsys.readouterr().err)[-1] == (
        f"train.py: stopped by SIGINT at the last step (2) of {run}, which finished with its weights saved; to "
        "continue, run the same command")


def test_ctrl_c_at_a_runs_last_step_stops_the_plan_with_130(tmp_path, capsys, monkeypatch, small_data):
    """train.py --plan: the first run's last step is where the Ctrl-C comes; no other run trains, exit 130, and the
    same command continues with the runs left."""
    real = study.jobs.train_run
    monkeypatch.setattr(study.jobs, "train_run", lambda config, **kw: real(config, hooks=[sigint_at(1)], **kw))
    plan = write_plan(tmp_path / "p.toml", small_data, GRID_THEN_FINAL)
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs)]) == 130
    line = lines_of(capsys.readouterr().err)[-1]
    assert line.startswith("train.py: stopped by SIGINT at the last step (1) of ") and line.endswith(
        "which finished with its weights saved; to continue, run the same command")
    assert [p.name for p in (runs / "s" / "grid").iterdir()] == ["tiny_r2_lr0.001_ctx32"]
    assert not (runs / "s" / "final").exists()
    monkeypatch.setattr(study.jobs, "train_run", real)
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs)]) == EXIT_OK
    assert "grid/tiny_r2_lr0.001_ctx32: done already" in capsys.readouterr().out


def test_ctrl_c_at_the_last_step_of_a_single_run_exits_130_with_nothing_to_continue(tmp_path, capsys, monkeypatch,
                                                                                   small_data):
    import training.cli

    real = training.cli.train_run
    monkeypatch.setattr(training.cli, "train_run", lambda config, **kw: real(config, hooks=[sigint_at(2)], **kw))
    run = tmp_path / "runs" / "one"
    argv = ["--model", "tiny", "--batch", "2", "--ctx", "32", "--val-batches", "1", "--rank", "2", "--data",
            small_data, "--runs-dir", str(tmp_path / "runs"), "--steps", "2", "--out", str(run)]
    assert train_cli.main(argv) == 130
    assert lines_of(capsys.readouterr().err)[-1] == (
        f"train.py: stopped by SIGINT at the last step (2) of {run}, which finished with its weights saved; nothing "
        "is left to continue")
    assert (run / "adapter").is_dir()
    # demo.py's training (its own `again`): the demo has forecasts left, which the same demo.py command makes
    argv[argv.index(str(run))] = str(run.with_name("demo"))
    assert train_cli.main(argv, again="the same demo.py command") == 130
    assert lines_of(capsys.readouterr().err)[-1].endswith(
        "which finished with its weights saved; to continue, run the same demo.py command")


def test_ctrl_c_during_a_validation_pass_stops_after_that_step_not_the_next(tmp_path, monkeypatch, small_data):
    """The signal comes while step 2's validation runs (after the step's own stop check): the run stops after step
    2, as the line "stopping after this step" promised, not after step 3."""
    import training.loop

    real, passes = training.loop.validation_losses, []

    def validation(*args, **kwargs):
        passes.append(True)
        if len(passes) == 2:  # step 0's pass, then step 2's
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(training.loop, "validation_losses", validation)
    run = tmp_path / "runs" / "r"
    config = tiny_config(run, small_data, steps=4, eval_every=2, ctx=32, batch=2, val_batches=1)
    with pytest.raises(Interrupted) as stopped:
        train_run(config, progress=False)
    assert stopped.value.checkpoint_step == 2 and not stopped.value.run_finished
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_sigterm_during_a_plans_forecast_stage_is_one_line_and_143(tmp_path, small_data):
    """The driver between runs (here: a forecast stage) had SIGTERM's default: killed without a word."""
    plan = write_plan(tmp_path / "p.toml", small_data, '[[stage]]\nname = "grid"\nsteps = 1\n[[stage]]\n'
                      'name = "test"\nforecast = "grid"\nlimit = 1\nnum_samples = 1\nbaselines = []\n')
    code = ("import os, signal, sys\nimport study.run\nreal = study.run.budgeted_evaluate\n"
            "def evaluate(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*args, **kwargs)\n"
            "study.run.budgeted_evaluate = evaluate\nimport train\nsys.exit(train.main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, "--plan", plan, "--runs-dir", str(tmp_path / "runs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr
    assert lines_of(done.stderr)[-1] == ("train.py: stopped by SIGTERM (the newest checkpoint is the one written "
                                         "before); to continue, run the same command")
    assert not (tmp_path / "runs" / "s" / "test" / "tiny_r2_lr1e-05_ctx32" / "metrics.json").exists()


# ---- item 16: --data spelled otherwise than the plan -----------------------------------------------------------------

def test_data_given_relative_for_the_plans_absolute_path_continues_the_study(tmp_path, capsys, monkeypatch,
                                                                            small_data):
    """The plan names /abs/lv.h5, the command --data lv.h5 from its directory: the same study (identity by bytes),
    and its stopped run resumes rather than "cannot resume with different settings"."""
    monkeypatch.chdir(tmp_path)
    data = write_small_data(tmp_path / "lv.h5", n=10)
    plan = write_plan(tmp_path / "p.toml", str(Path(data).resolve()), '[[stage]]\nname = "grid"\nsteps = 3\n'
                      'checkpoint_every = 1\n')
    real = study.jobs.train_run
    monkeypatch.setattr(study.jobs, "train_run", lambda config, **kw: real(config, hooks=[sigint_at(1)], **kw))
    assert train_cli.main(["--plan", plan, "--runs-dir", "runs"]) == 130
    monkeypatch.setattr(study.jobs, "train_run", real)
    capsys.readouterr()
    assert train_cli.main(["--plan", plan, "--runs-dir", "runs", "--data", "lv.h5"]) == EXIT_OK, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert "grid/tiny_r2_lr1e-05_ctx32: resuming" in out and "study of its own" not in out
    config = json.loads((tmp_path / "runs" / "s" / "grid" / "tiny_r2_lr1e-05_ctx32" / "config.json").read_text())
    assert config["data"] == str(Path(data).resolve())  # the plan's spelling, kept


def test_a_model_directory_given_by_another_spelling_is_the_plans_own(tmp_path, capsys, monkeypatch, small_data):
    """--model tinymodel for the plan's /abs/tinymodel: the plan's own setting, its study "done already", not a study
    of its own that trains the same run again."""
    from qwen_mini import save_pretrained
    from qwen_mini.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny")
    save_pretrained(model, tmp_path / "tinymodel")
    tokenizer.save_pretrained(tmp_path / "tinymodel")
    monkeypatch.chdir(tmp_path)
    plan = write_plan(tmp_path / "p.toml", small_data, '[[stage]]\nname = "grid"\nsteps = 1\n')
    (tmp_path / "p.toml").write_text((tmp_path / "p.toml").read_text().replace(
        'model = "tiny"', f'model = "{tmp_path / "tinymodel"}"'))
    assert train_cli.main(["--plan", plan, "--runs-dir", "runs"]) == EXIT_OK
    capsys.readouterr()
    assert train_cli.main(["--plan", plan, "--runs-dir", "runs", "--model", "tinymodel"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "done already" in out and "study of its own" not in out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["s"]


def test_resume_takes_the_same_file_under_another_spelling_or_a_copy(tmp_path, capsys, monkeypatch, small_data):
    """train.py --resume: a relative path for the run's absolute one, or a byte-for-byte copy, is the same data; a
    file of other bytes is still refused."""
    import shutil

    run = tmp_path / "runs" / "r"
    flags = ["--model", "tiny", "--batch", "2", "--ctx", "32", "--val-batches", "1", "--rank", "2", "--runs-dir",
             str(tmp_path / "runs"), "--out", str(run), "--checkpoint-every", "1"]
    assert train_cli.main([*flags, "--data", str(Path(small_data).resolve()), "--steps", "1"]) == EXIT_OK
    copy = shutil.copy(small_data, tmp_path / "copy.h5")
    assert train_cli.main([*flags, "--data", str(copy), "--steps", "2", "--resume"]) == EXIT_OK
    other = write_small_data(tmp_path / "other.h5", n=10, seed=5)
    capsys.readouterr()
    assert train_cli.main([*flags, "--data", other, "--steps", "3", "--resume"]) == 1
    assert "cannot resume with different settings (data: " in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert train_cli.main([*flags, "--data", "copy.h5", "--steps", "3", "--resume"]) == EXIT_OK


def test_a_stopped_demo_given_its_data_by_another_spelling_is_continued(tmp_path, monkeypatch, small_data):
    """demo.py --data lv.h5 after a demo stopped with --data /abs/lv.h5: the same data, so the same demo continues
    (not a demo-2 trained from step 0)."""
    import demo

    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "config.json").write_text(json.dumps({"data": small_data, "seed": 0, "steps": 3}))
    monkeypatch.chdir(Path(small_data).parent)
    base = tmp_path / "runs" / "demo"
    assert demo.unfinished_demo(base, Path(small_data).name, 0, 3) == base
    assert demo.unfinished_demo(base, Path(small_data).name, 1, 3) is None  # another seed: a demo of its own


# ---- item 20: an absurd learning rate ------------------------------------------------------------------------------

def test_an_absurd_learning_rate_is_refused_before_any_flop(tmp_path, capsys, small_data):
    """1e39 fits a Python float but not AdamW's float32 step: once a traceback after the first step was booked."""
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as refused:
        train_cli.main(["--model", "tiny", "--data", small_data, "--runs-dir", str(runs), "--steps", "2",
                        "--lr", "1e39"])
    assert refused.value.code == EXIT_USAGE
    assert "train.py: error: lr must be at most 1e+06 (AdamW moves every weight by about lr a step), got 1e+39" in \
        capsys.readouterr().err
    for stage in ('[[stage]]\nname = "grid"\nlr = 1e39\nsteps = 1\n',
                  '[[stage]]\nname = "search"\nsearch = "halving"\nlr = {log = [1e-3, 1e39]}\nconfigs = 3\n'
                  'steps = 9\n'):
        plan = write_plan(tmp_path / "p.toml", small_data, stage)
        for argv in (["--plan", plan, "--runs-dir", str(runs)], ["--plan", plan, "--runs", str(runs)]):
            tool = train_cli if "--runs-dir" in argv else flops_cli
            assert tool.main(argv) == EXIT_USAGE
            [line] = lines_of(capsys.readouterr().err)
            assert "lr must be at most 1e+06" in line and plan in line, line  # (which table: issue 42, item 11)
    plan = write_plan(tmp_path / "p.toml", small_data, '[[stage]]\nname = "grid"\nsteps = 1\n')
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs), "--lr", "1e39"]) == EXIT_USAGE
    assert "lr must be at most 1e+06" in lines_of(capsys.readouterr().err)[0]
    assert not runs.exists()


# ---- item 22: study.json after a rerun stopped after its first stage -----------------------------------------------

def test_a_rerun_stopped_after_a_stage_keeps_the_stages_it_did_not_reach(tmp_path, small_data):
    plan = load_plan(write_plan(tmp_path / "p.toml", small_data, GRID_THEN_FINAL), runs_dir=tmp_path / "runs")
    finished = run_plan(plan, progress=False, log=lambda line: None)
    assert [s["name"] for s in finished["stages"]] == ["grid", "final"]

    def killed_after_grid(line):
        if line.startswith("[plan] final"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, progress=False, log=killed_after_grid)
    study = json.loads((plan.study_dir / "study.json").read_text())
    assert study["stages"] == finished["stages"]
    assert run_plan(plan, progress=False, log=lambda line: None)["stages"] == finished["stages"]


def test_a_run_killed_while_saving_its_adapter_is_not_done_already(tmp_path, capsys, small_data):
    """A kill between the adapter's two files (its tensors, then adapter_config.json) left an adapter/ that a rerun
    took for a finished run ("done already"), and its forecasts failed to load it: the rerun saves it again, from
    the last step's checkpoint, training nothing twice."""
    plan = write_plan(tmp_path / "p.toml", small_data, '[[stage]]\nname = "grid"\nsteps = 2\n')
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs)]) == EXIT_OK
    run = runs / "s" / "grid" / "tiny_r2_lr1e-05_ctx32"
    metrics, weights = (run / "metrics.jsonl").read_text(), (run / "adapter" / "adapter_model.safetensors").read_bytes()
    (run / "adapter" / "adapter_config.json").unlink()
    capsys.readouterr()
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs)]) == EXIT_OK
    assert "grid/tiny_r2_lr1e-05_ctx32: resuming" in capsys.readouterr().out
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == weights
    assert (run / "metrics.jsonl").read_text() == metrics


# ---- items 4 and 19: bench/gpu_check.py's OUT ----------------------------------------------------------------------

def test_gpu_check_writes_a_relative_out_where_the_command_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--parts", "machine",
                           "rel_out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (ROOT / "rel_out").exists()
    machine = json.loads((tmp_path / "rel_out" / "machine.json").read_text())
    assert machine["status"] == "ok" and machine["cases"]
    assert "| machine | ok |" in (tmp_path / "rel_out" / "summary.md").read_text()


@pytest.mark.parametrize("case", ["a file", "under a file", "cannot be made", "a summary.md directory",
                                  "a part file not JSON", "a part file of another part"])
def test_gpu_check_refuses_an_out_it_cannot_use_in_one_line_before_any_part(tmp_path, capsys, case):
    (tmp_path / "file").write_text("x")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "out",
           "cannot be made": Path("/proc/gpu_check_out")}.get(case, tmp_path / "out")
    named = {"a file": f"{out}: is not a directory", "under a file": f"{out}: lies under {tmp_path / 'file'}, which "
             "is not a directory", "cannot be made": f"{out}: cannot be made",
             "a summary.md directory": f"{out / 'summary.md'}: not a file",
             "a part file not JSON": f"{out / 'machine.json'}: not a part's JSON",
             "a part file of another part": f"{out / 'machine.json'}: not the machine part's JSON"}[case]
    if case == "a summary.md directory":
        (out / "summary.md").mkdir(parents=True)
    elif case.startswith("a part file"):
        out.mkdir()
        (out / "machine.json").write_text("{not json" if case == "a part file not JSON" else '{"part": "jobs"}')
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    # --wall-s 0.001: were a part to be started, it would be skipped at once (and the summary written)
    assert gpu_check.main(["--cpu-smoke", "--parts", "jobs", "--wall-s", "0.001", str(out)]) == EXIT_USAGE
    [line] = lines_of(capsys.readouterr().err)
    assert line.startswith(f"gpu_check.py: error: {named}"), line
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before  # nothing written
