"""Issue 40: the wsd schedule by hand values, a run that continues another run's checkpoint bit for bit (across a
study's stages too, booking only its own steps), `steps = "rest"` and `flops = N` sized from the ledger, the final
run's name, and the settings a stage inherits (issue 42 item 15)."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from conftest import tiny_plan
from test_train import Killed, comparable, kill_after, tiny_config, write_small_data

import flops as flops_cli
import report as report_cli
import train as train_cli
from ledger import read_record, read_records, totals
from qwen_mini.flop_report import format_flops
from study.estimate import estimate_plan
from study.plan import PlanError, load_plan
from study.standing import resolve
from training import RunDirError, TrainConfig, read_metrics, train_run
from training.config import ConfigError
from training.setup import lr_factor


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv10.h5", n=10)


# ---- the schedule ----------------------------------------------------------------------------------------------------

def test_wsd_by_hand():
    """10 steps, warmup 2, decay 0.4: 4 decay steps after a stable phase that ends at step index 6; the decay is
    1 - sqrt((s - 6) / 4), which reaches 0 at --steps (index 10), as the cosine does."""
    config = TrainConfig(model="tiny", steps=10, warmup=2, schedule="wsd", decay=0.4)
    assert (config.decay_steps, config.stable_steps) == (4, 6)
    expected = [0.5, 1, 1, 1, 1, 1, 1, 1 - math.sqrt(1 / 4), 1 - math.sqrt(2 / 4), 1 - math.sqrt(3 / 4), 0]
    assert [lr_factor(s, config) for s in range(11)] == pytest.approx(expected, abs=1e-15)
    # The default decay is 0.2: 120 steps decay over the last 24; the stable phase is the constant schedule's,
    # value for value (warmup included).
    wsd = TrainConfig(model="tiny", steps=120, warmup=5, schedule="wsd")
    constant = TrainConfig(model="tiny", steps=120, warmup=5)
    assert (wsd.decay, wsd.decay_steps, wsd.stable_steps) == (0.2, 24, 96)
    assert [lr_factor(s, wsd) for s in range(97)] == [lr_factor(s, constant) for s in range(97)]
    assert lr_factor(97, wsd) == pytest.approx(1 - math.sqrt(1 / 24)) and lr_factor(119, wsd) > 0
    assert TrainConfig(model="tiny", steps=7, schedule="wsd", decay=0.2).decay_steps == 1  # round(1.4), at least 1


@pytest.mark.parametrize("settings, message", [
    (dict(schedule="constant", decay=0.3), "decay 0.3 is the share of the steps a wsd schedule decays over"),
    (dict(schedule="wsd", decay=1.5), "decay must be a share of the steps"),
    (dict(schedule="wsd", decay=0.5, warmup=6), r"warmup \(6\) must end before the wsd decay starts"),
])
def test_wsd_settings_that_cannot_make_a_schedule_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="tiny", steps=10, **settings)


# ---- continuing a run ------------------------------------------------------------------------------------------------

SETTINGS = dict(ctx=64, stride=64, batch=4, eval_every=2, warmup=2, grad_clip=0.5, weight_decay=0.01, lr=5e-3,
                rank=4, lora_dropout=0.2, targets=("q_proj", "v_proj", "down_proj"))
WSD = dict(**SETTINGS, steps=10, schedule="wsd", decay=0.4)  # decays after step 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data) -> tuple[Path, Path]:
    """(a constant run of 4 steps, a straight wsd run of 10 steps) of the same settings."""
    root = tmp_path_factory.mktemp("trained")
    source = tiny_config(root / "source", small_data, **SETTINGS, steps=4, checkpoint_every=2)
    train_run(source, progress=False)
    straight = train_run(tiny_config(root / "straight", small_data, **WSD), progress=False)
    return source.run_dir, straight.run_dir


def test_a_continued_run_is_the_straight_run_bit_for_bit(tmp_path, small_data, trained):
    """A constant run of 4 steps, continued under wsd to 10: the same curve as a straight wsd run of 10 steps (losses,
    validation losses, lr, gradient norms; dropout, clipping, weight decay and the AdamW moments carried); the source
    is untouched, and the continued run books only its own 6 steps."""
    source, straight = trained
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    continued = tiny_config(tmp_path / "continued", small_data, **WSD, continue_from=str(source))
    train_run(continued, progress=False)
    assert comparable(read_metrics(continued.run_dir)) == comparable(read_metrics(straight))
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == before
    record = read_record(continued.run_dir / "flops.json")
    per_step = record.data["train"]["per_step_flops"]
    assert record.by_kind["train"] == 6 * per_step  # steps 5..10; steps 1..4 are the source's (booked there)
    config = json.loads((continued.run_dir / "config.json").read_text())
    assert config["continued_from_step"] == 4 and config["planned_flops"] == 6 * per_step


def test_a_continued_run_killed_resumes_bit_for_bit(tmp_path, small_data, trained):
    source, straight = tmp_path / "source", trained[1]
    shutil.copytree(trained[0], source)
    stopped = tiny_config(tmp_path / "stopped", small_data, **WSD, continue_from=str(source), checkpoint_every=6)
    with pytest.raises(Killed):
        train_run(stopped, hooks=[kill_after(8)], progress=False)
    (source / "checkpoint.pt").unlink()  # the stopped run has its own (forked at step 4, then step 6)
    train_run(dataclasses.replace(stopped, resume=True), progress=False)
    assert comparable(read_metrics(stopped.run_dir)) == comparable(read_metrics(straight))
    per_step = read_record(straight / "flops.json").data["train"]["per_step_flops"]
    assert read_record(stopped.run_dir / "flops.json").by_kind["train"] == (6 + 2) * per_step  # 7, 8 twice


@pytest.mark.parametrize("settings, message", [
    (dict(schedule="wsd", decay=0.8), r"past the end of this run's constant learning rate \(step 2"),
    (dict(schedule="wsd", decay=0.4, lr=1e-3), r"only a run of its own settings.*lr: it has 0.005"),
    (dict(steps=4), "leaves nothing to train"),
    (dict(schedule="wsd", decay=0.4, ctx=32, stride=32), "only a run of its own settings.*ctx: it has 64"),
])
def test_a_continuation_that_cannot_be_exact_is_refused(tmp_path, small_data, trained, settings, message):
    config = tiny_config(tmp_path / "new", small_data, **{**SETTINGS, "steps": 10, **settings,
                                                          "continue_from": str(trained[0])})
    with pytest.raises(RunDirError, match=message):
        train_run(config, progress=False)
    assert not config.run_dir.exists()  # refused before anything was written or reserved


def test_a_source_that_decayed_or_lost_its_checkpoint_is_refused(tmp_path, small_data, trained):
    cosine = tiny_config(tmp_path / "cosine", small_data, **SETTINGS, steps=4, schedule="cosine")
    train_run(cosine, progress=False)
    with pytest.raises(RunDirError, match="past the end of its constant learning rate .*schedule cosine"):
        train_run(tiny_config(tmp_path / "new", small_data, **WSD, continue_from=str(cosine.run_dir)), progress=False)
    shutil.copytree(trained[0], tmp_path / "lost")
    (tmp_path / "lost" / "checkpoint.pt").unlink()
    with pytest.raises(RunDirError, match="no checkpoint.pt to continue from .* continue = false"):
        train_run(tiny_config(tmp_path / "new", small_data, **WSD, continue_from=str(tmp_path / "lost")),
                  progress=False)
    assert not (tmp_path / "new").exists()


# ---- across a study's stages -----------------------------------------------------------------------------------------

GRID = """
[[stage]]
name = "grid"
lr = [1e-2]
steps = 4
"""
FINAL = """
[[stage]]
name = "final"
from = "grid"
schedule = "wsd"
decay = 0.4
steps = 10
"""
TEST = """
[[stage]]
name = "test"
forecast = "final"
limit = 1
context = 10
horizon = 4
baselines = []
"""


def write(path: Path, data: str, stages: str, **train) -> Path:
    path.write_text(tiny_plan(path.stem, data, stages, **{"eval_every": None, "checkpoint_every": 2, **train}))
    return path


def test_a_final_stage_continues_the_winner_bit_for_bit_and_books_only_its_steps(tmp_path, small_data, capsys):
    plan_path, runs = write(tmp_path / "c.toml", small_data, GRID + FINAL), tmp_path / "runs"
    plan = load_plan(plan_path, runs_dir=runs)
    assert resolve(plan)["final"][0][0].continues.name == "tiny_r2_lr0.01_ctx32"
    planned = {s.name: s for s in estimate_plan(plan).stages}
    assert train_cli.main(["--plan", str(plan_path), "--runs-dir", str(runs)]) == 0
    final, grid = runs / "c" / "final" / "tiny_r2_lr0.01_ctx32", runs / "c" / "grid" / "tiny_r2_lr0.01_ctx32"
    config = json.loads((final / "config.json").read_text())
    settings = {k: config[k] for k in ("model", "data", "rank", "lr", "batch", "ctx", "val_batches", "eval_every",
                                       "schedule", "decay", "gqa")}
    straight = train_run(TrainConfig(**settings, steps=10, out=str(tmp_path / "straight"), runs_dir=str(tmp_path),
                                     checkpoint_every=0), progress=False)
    assert comparable(read_metrics(final)) == comparable(read_metrics(straight.run_dir))  # steps 0..10, bit for bit
    per_step = config["per_step_flops"]
    booked = {d.parent.name: read_record(d / "flops.json").by_kind["train"] for d in (grid, final)}
    assert booked == {"grid": 4 * per_step, "final": 6 * per_step}  # each step booked once, by the run that took it
    assert planned["final"].train == 6 * per_step  # flops.py --plan counted only the new steps
    assert totals(read_records(runs)).by_kind["train"] == 10 * per_step
    assert "continues grid/tiny_r2_lr0.01_ctx32 from its step 4" in capsys.readouterr().out
    assert report_cli.main([str(runs), "--out", str(tmp_path / "report")]) == 0
    assert (f"`r2_lr0.01_ctx32` continued `grid/tiny_r2_lr0.01_ctx32` from its step 4: continuing saved 4 steps and "
            f"{format_flops(4 * per_step)} training FLOPs") in (tmp_path / "report" / "report.md").read_text()


def test_continuing_is_the_default_where_it_applies_and_can_be_turned_off(tmp_path):
    def final_of(final: str, grid: str = GRID):
        path = write(tmp_path / "p.toml", "x.h5", grid + final)
        return resolve(load_plan(path))["final"][0][0]

    assert final_of(FINAL).continues is not None and final_of(FINAL).start == 4
    assert final_of(FINAL + "continue = false\n").continues is None
    assert final_of(FINAL.replace('"wsd"', '"cosine"').replace("decay = 0.4\n", "")).continues is None  # decays
    assert final_of(FINAL, GRID + 'schedule = "cosine"\n').continues is None  # the winner decayed: from step 0
    assert final_of(FINAL + "lr = 1e-3\n").continues is None  # another run than the winner's
    with pytest.raises(PlanError, match=r"stage 2 \(final\): continue = 1"):
        final_of(FINAL + "continue = 1\n")
    with pytest.raises(PlanError, match="cannot continue \\(continue = true\\): grid's winner .* trained under "
                                        "schedule cosine"):
        final_of(FINAL + "continue = true\n", GRID + 'schedule = "cosine"\n')
    with pytest.raises(PlanError, match="past which its own learning rate is not constant .* continue = false"):
        final_of(FINAL.replace("decay = 0.4", "decay = 0.8"))  # the decay would start at step 2, before 4


@pytest.mark.parametrize("stage, message", [
    ('name = "x"\ncontinue = true\nsteps = 4', "continue = True: true or false, whether"),
    ('name = "x"\nfrom = "grid"\nsteps = "rest"\nlr = [1e-3, 1e-2]', "size a stage of one run"),
    ('name = "x"\nfrom = "grid"\nsteps = "all"', "steps = 'all': a whole number, or \"rest\""),
    ('name = "x"\nfrom = "grid"\nsteps = "rest"\nflops = 1e9', "both size the stage"),
    ('name = "x"\nfrom = "grid"\nflops = -1', "flops must be a positive whole number"),
    ('name = "x"\nfrom = "grid"\nsearch = "halving"\ncontinue = true\nlr = [1e-3, 1e-2]', "it takes no continue"),
])
def test_the_new_stage_keys_are_checked_with_the_stage_named(tmp_path, stage, message):
    path = write(tmp_path / "p.toml", "x.h5", GRID + "[[stage]]\n" + stage + "\n")
    with pytest.raises(PlanError, match=r"stage 2 \(x\): .*" + re.escape(message)):
        load_plan(path)


def test_a_share_above_the_plans_cap_is_refused_with_the_stage_named(tmp_path):
    """flops = 1e30 under max_flops = 1e12 was once "steps must be at most 1e+09 (a billion), got 1533...", no
    stage named; a share above the cap can never be spent."""
    path = write(tmp_path / "p.toml", "x.h5", GRID + '[[stage]]\nname = "x"\nfrom = "grid"\nflops = 1e30\n')
    path.write_text(path.read_text().replace("[study]\n", "[study]\nmax_flops = 1e12\n", 1))
    with pytest.raises(PlanError, match=r"stage 2 \(x\): flops = 1e\+30 is more than the study's max_flops 1e\+12"):
        load_plan(path)


def test_rest_in_train_is_named_as_a_stage_key(tmp_path):
    with pytest.raises(PlanError, match=r"\[train\]: steps = \"rest\" sizes one stage's run"):
        load_plan(write(tmp_path / "p.toml", "x.h5", GRID.replace("steps = 4\n", ""), steps="rest"))


def test_rest_spends_the_cap_to_within_three_percent_and_never_over(tmp_path, small_data, capsys):
    plan_path, runs = write(tmp_path / "r.toml", small_data, GRID + FINAL.replace("steps = 10", 'steps = "rest"')
                            + TEST), tmp_path / "runs"
    cap = 1.2e10
    steps = next(s for s in estimate_plan(load_plan(plan_path, runs_dir=runs, max_flops=cap)).stages
                 if s.name == "final").steps
    assert flops_cli.main(["--plan", str(plan_path), "--runs", str(runs), "--max-flops", f"{cap:g}"]) == 0
    assert f'steps = "rest": {steps} steps from step 4 of grid/tiny_r2_lr0.01_ctx32 now' in capsys.readouterr().out
    assert train_cli.main(["--plan", str(plan_path), "--runs-dir", str(runs), "--max-flops", f"{cap:g}"]) == 0
    spent = totals(read_records(runs)).spent
    assert 0.97 * cap <= spent <= cap
    final = runs / "r" / "final" / "tiny_r2_lr0.01_ctx32"
    assert read_metrics(final)[-1]["step"] == json.loads((final / "config.json").read_text())["steps"] == steps
    # The stage is sized once, when it starts: a rerun of the finished study keeps its steps, and spends nothing.
    assert estimate_plan(load_plan(plan_path, runs_dir=runs)).stages[1].steps == steps
    assert train_cli.main(["--plan", str(plan_path), "--runs-dir", str(runs)]) == 0
    assert totals(read_records(runs)).spent == spent


def test_rest_too_small_for_a_run_is_refused_in_one_line_before_anything_runs(tmp_path, small_data, capsys):
    plan_path, runs = write(tmp_path / "s.toml", small_data, GRID + FINAL.replace("steps = 10", 'steps = "rest"')
                            + TEST), tmp_path / "runs"
    ample = estimate_plan(load_plan(plan_path, runs_dir=runs, max_flops=10 ** 12))
    stages = {s.name: s for s in ample.stages}
    per_step = stages["final"].train // (stages["final"].steps - 4)
    cap = stages["grid"].total + ample.needed - stages["final"].left + 5 * per_step  # 5 new steps' worth
    assert flops_cli.main(["--plan", str(plan_path), "--runs", str(runs), "--max-flops", str(cap)]) == 3
    assert 'refused: stage final: steps = "rest" buys' in capsys.readouterr().out
    assert train_cli.main(["--plan", str(plan_path), "--runs-dir", str(runs), "--max-flops", str(cap)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "it needs at least" in err[0] and "raise max_flops" in err[0]
    assert not (runs / "s" / "grid").exists()  # refused before anything ran


def test_a_share_of_the_cap_buys_its_steps(tmp_path):
    from training.budget import evaluation_count

    path = write(tmp_path / "f.toml", "x.h5", GRID + FINAL.replace("steps = 10", "flops = 3e9"))
    estimate = estimate_plan(load_plan(path, runs_dir=tmp_path / "runs"))
    final = next(s for s in estimate.stages if s.name == "final")
    run = resolve(load_plan(path))["final"][0][0]
    from study.estimate import remembered_run_flops
    plan = remembered_run_flops(run.config(load_plan(path)), 4, estimate.gqa)

    def cost(steps):  # the new steps and the validation passes every steps // 10 steps and at the end, by hand
        return (steps - 4) * plan.per_step + evaluation_count(4, steps, max(steps // 10, 1)) * plan.eval_pass

    assert cost(final.steps) <= 3e9 < cost(final.steps + 1) and final.steps > 14
    assert final.total == cost(final.steps)


# ---- what a stage inherits, and what its run is called ---------------------------------------------------------------

SEARCH = """
[[stage]]
name = "search"
search = "halving"
eta = 2
first_steps = 2
steps = 4
targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]]
"""


def test_a_search_after_a_search_derives_its_own_eval_every(tmp_path):
    """Issue 42 item 15: the first search's eval_every (its first rung, 2) is not the second's (first_steps 3)."""
    second = '[[stage]]\nname = "again"\nfrom = "search"\nsearch = "halving"\neta = 3\nfirst_steps = 3\n' \
             'steps = 9\nlr = [1e-3, 1e-2]\n'
    options = resolve(load_plan(write(tmp_path / "p.toml", "x.h5", SEARCH + second)))
    assert {r.settings["eval_every"] for r in options["again"][0]} == {3}
    with pytest.raises(PlanError, match=r"eval_every 2 must divide first_steps 3, .* \(eval_every is \[train\]'s\)"):
        load_plan(write(tmp_path / "q.toml", "x.h5", SEARCH + second, eval_every=2))


def test_a_long_final_run_does_not_validate_at_the_searchs_rungs(tmp_path):
    """Issue 42 item 15: a 6,000-step final run from a search validates steps // 10 apart, not every first rung."""
    final = '[[stage]]\nname = "final"\nfrom = "search"\nsteps = 6000\n'
    runs = resolve(load_plan(write(tmp_path / "p.toml", "x.h5", SEARCH + final)))["final"]
    assert {run.config(load_plan(tmp_path / "p.toml")).eval_every for option in runs for run in option} == {600}


def test_a_final_run_is_named_by_the_settings_its_stages_varied(tmp_path):
    final = '[[stage]]\nname = "final"\nfrom = "search"\nsteps = 8\n'
    options = resolve(load_plan(write(tmp_path / "p.toml", "x.h5", SEARCH + final)))
    assert sorted(run.name for option in options["final"] for run in option) == \
        ["tiny_r2_lr1e-05_ctx32_qkvo", "tiny_r2_lr1e-05_ctx32_qv"]


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, winner_steps", [("demo_search", 90), ("coursework_search", 400)])
def test_the_shipped_search_plans_continue_the_winner_under_wsd_for_the_rest(tmp_path, name, winner_steps):
    plan = load_plan(ROOT / "plans" / f"{name}.toml", runs_dir=tmp_path)
    final = plan.stage("final")
    assert final.size == "rest" and final.settings["schedule"] == "wsd"
    assert {run.start for option in resolve(plan)["final"] for run in option} == {winner_steps}
    estimate = estimate_plan(plan)
    assert estimate.fits and 0.97 * estimate.budget <= estimate.committed + estimate.needed <= estimate.budget
