"""Issue 33: a successive-halving search stage — its rung arithmetic by hand, its plan keys, configurations drawn
from ranges, survivors that continue bit for bit as if trained straight, a killed search that trains nothing twice,
the cap, parallel jobs, divergence and the noise rule, and the report's rung table."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import tiny_plan
from test_train import comparable, write_small_data

import flops as flops_cli
import report as report_cli
import train as train_cli
from ledger import Ledger, read_record
from qwen_mini.flop_report import format_flops
from study import search as search_module
from study import standing
from study.estimate import estimate_plan
from study.halving import Cut, SearchSpec, cut_rung, keep_count, rung_steps, survivor_counts
from study.plan import PlanError, load_plan
from study.run import run_plan
from study.standing import resolve
from training import TrainConfig, read_metrics, train_run
from training.stopping import TrainingDiverged

LRS = [1e-4, 1e-3, 3e-3, 1e-2]
SEARCH = """
[[stage]]
name = "search"
search = "halving"
eta = 2
first_steps = 2
steps = 8
lr = [1e-4, 1e-3, 3e-3, 1e-2]
"""
FINAL = """
[[stage]]
name = "final"
from = "search"
steps = 10

[[stage]]
name = "test"
forecast = "final"
limit = 2
"""


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5")


def write(path: Path, data: str, stages: str, **train) -> Path:
    path.write_text(tiny_plan(path.stem, data, stages, **{"eval_every": None, "checkpoint_every": 2, **train}))
    return path


# ---- the rules, by hand ----------------------------------------------------------------------------------------------

def test_rung_arithmetic_by_hand():
    assert rung_steps(50, 3, 450) == [50, 150, 450]
    assert rung_steps(20, 2, 160) == [20, 40, 80, 160]
    assert rung_steps(50, 3, 400) == [50, 150, 400]  # the top rung is `steps`, whatever eta would give
    assert rung_steps(100, 3, 100) == [100]  # one rung: a grid
    assert SearchSpec(eta=3).first_rung(450) == 50  # default: three rungs
    assert survivor_counts(27, 3, 3) == [27, 9, 3]
    assert survivor_counts(16, 2, 4) == [16, 8, 4, 2]
    assert survivor_counts(5, 3, 3) == [5, 1, 1] and keep_count(2, 3) == 1
    # Six configurations, eta 3: the best two go on (0.3 and 0.305); 0.31 is within the noise 0.006 of 0.305, so it
    # goes on too; 0.5, 0.9 and the NaN one (None) are cut.
    scores = [0.5, 0.3, None, 0.31, 0.9, 0.305]
    assert cut_rung(scores, 3, 0.006) == Cut(kept=[1, 5], ties=[3], cut=[0, 2, 4])
    assert cut_rung(scores, 3, 0.004) == Cut(kept=[1, 5], ties=[], cut=[0, 2, 3, 4])
    assert cut_rung(scores, 3, None) == Cut(kept=[1, 5], ties=[], cut=[0, 2, 3, 4])  # unmeasured: exact ties only
    assert cut_rung([None, None, 0.7], 3, 1.0).going_on == [2]  # NaN never goes on, however large the noise
    assert cut_rung([0.4, 0.4, 0.5], 3, None) == Cut(kept=[0], ties=[1], cut=[2])  # equal scores share a fate


BAD = {
    'search = "random"': "search must be one of 'halving'",
    'search = "halving"\neta = 1': "eta must be a whole number from 2",
    'search = "halving"\nfirst_steps = 20': "first_steps 20 is beyond steps 8",
    'search = "halving"\nschedule = "cosine"\nwarmup = 1': "schedule = \"constant\"",
    'search = "halving"\nfirst_steps = 4\neval_every = 3': "eval_every 3 must divide first_steps 4",
    'search = "halving"\nlr = {log = [1e-5, 1e-2]}': "need `configs`",
    'search = "halving"\nconfigs = 4\nlr = [1e-3, 1e-2]': "configs draws configurations from ranges",
    'search = "halving"\nlr = {log = [0, 1e-2]}\nconfigs = 3': "a log range needs low > 0",
    'search = "halving"\nlr = {normal = [1, 2]}\nconfigs = 3': "a range is one of",
    'search = "halving"\nseed = [1, 2]': "a search cannot vary seed",
    'search = "halving"\nnoise_seeds = [0]': "holds the configurations' own seed 0",
    'lr = {log = [1e-5, 1e-2]}': "only a search stage takes these",
    'eta = 3': "only a search stage takes these",
    'search = "halving"\nrank = {int = [2, 3]}\nconfigs = 4': "drew the same values",
}


@pytest.mark.parametrize("keys", list(BAD))
def test_search_keys_are_checked_with_the_stage_named(tmp_path, keys):
    path = tmp_path / "p.toml"
    path.write_text(tiny_plan("p", "x.h5", f'[[stage]]\nname = "s"\nsteps = 8\n{keys}\n', eval_every=None))
    with pytest.raises(PlanError, match=r"stage 1 \(s\): .*" + BAD[keys].replace("(", r"\(").replace("[", r"\[")):
        load_plan(path)


def test_a_forecast_of_a_search_is_of_its_winner(tmp_path):
    path = write(tmp_path / "p.toml", "x.h5", SEARCH + '[[stage]]\nname = "t"\nforecast = "search"\n')
    assert load_plan(path).stage("t").which == "best"
    path.write_text(path.read_text() + 'which = "all"\n')
    with pytest.raises(PlanError, match="forecast its winner"):
        load_plan(path)


def test_configurations_drawn_from_ranges_are_a_seeded_latin_hypercube(tmp_path):
    stage = ('[[stage]]\nname = "s"\nsearch = "halving"\nsteps = 9\nlr = {log = [1e-5, 1e-2]}\nrank = [2, 4, 8]\n'
             'configs = 9\nsample_seed = %d\n')
    (tmp_path / "a.toml").write_text(tiny_plan("a", "x.h5", stage % 0, eval_every=None))
    (tmp_path / "b.toml").write_text(tiny_plan("b", "x.h5", stage % 1, eval_every=None))
    drawn = load_plan(tmp_path / "a.toml").stage("s").drawn
    assert drawn == load_plan(tmp_path / "a.toml").stage("s").drawn  # seeded: the same every time
    assert drawn != load_plan(tmp_path / "b.toml").stage("s").drawn
    lrs = [c["lr"] for c in drawn]
    assert all(1e-5 <= lr <= 1e-2 and float(f"{lr:.3g}") == lr for lr in lrs)  # in range, 3 significant digits
    # A Latin hypercube: the 9 draws fall one in each ninth of the log range, and the ranks three of each value.
    ninths = sorted(int(9 * (math.log(lr) - math.log(1e-5)) / (math.log(1e-2) - math.log(1e-5))) for lr in lrs)
    assert ninths == list(range(9))
    assert sorted(c["rank"] for c in drawn) == [2, 2, 2, 4, 4, 4, 8, 8, 8]
    runs = resolve(load_plan(tmp_path / "a.toml"))["s"][0]
    assert [r.name for r in runs][0] == f"c0_lr{lrs[0]:g}_r{drawn[0]['rank']}".replace("c0_", "c00_")
    assert all(r.settings["eval_every"] == 1 for r in runs)  # first rung 9 // 3**2 = 1: evaluated at every rung


# ---- a finished search ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def searched(tmp_path_factory, small_data):
    """A search of 4 learning rates (eta 2: 4, 2 and 1 configurations at 2, 4 and 8 steps, a noise replicate), a
    final run from its winner and a forecast: estimated first, then run by train.py --plan."""
    root = tmp_path_factory.mktemp("search")
    plan, runs = write(root / "srch.toml", small_data, SEARCH + FINAL), root / "runs"
    estimate = estimate_plan(load_plan(plan, runs_dir=runs))
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)]) == 0
    study = json.loads((runs / "srch" / "study.json").read_text())
    return plan, runs, estimate, study


def loss_at(run_dir: Path, step: int) -> float:
    """A rung's score by hand: the validation loss at the rung's step (never an earlier one, nor step 0's)."""
    (value,) = [m["val_loss"] for m in read_metrics(run_dir) if m["step"] == step]
    return value


def test_which_configurations_reach_which_steps(searched):
    _, runs, _, study = searched
    record = study["stages"][0]
    stage_dir = runs / "srch" / "search"
    assert record["ladder"] == [2, 4, 8] and len(record["runs"]) == 4
    # The noise, from the metrics: the first rung's best configuration against its replicate at seed 1, at each
    # rung's step (the replicate goes on with the search to the top rung).
    first = {Path(d).name: loss_at(Path(d), 2) for d in record["runs"]}
    best = min(first, key=first.get)
    replicate = stage_dir / f"{best}_seed1"
    assert record["noise_runs"] == [str(replicate)] and record["noise_reference"] == str(stage_dir / best)
    for rung in record["rungs"]:
        noise = abs(loss_at(stage_dir / best, rung["steps"]) - loss_at(replicate, rung["steps"]))
        assert rung["noise"] == pytest.approx(noise, abs=1e-12)
    assert record["noise"] == record["rungs"][-1]["noise"] and record["noise_steps"] == 8  # the top rung's
    alive = sorted(first, key=first.get)
    reached = {}
    for rung in record["rungs"]:
        steps = rung["steps"]
        scores = {name: loss_at(stage_dir / name, steps) for name in alive}
        assert rung["runs"] == sorted(rung["runs"], key=lambda n: list(first).index(n))
        assert set(rung["runs"]) == set(alive)
        for name in alive:
            reached[name] = steps
        if "winner" in rung:
            assert rung["winner"] == min(scores, key=scores.get)
            break
        ranked = sorted(alive, key=scores.get)
        kept = ranked[:max(1, len(alive) // 2)]
        ties = [n for n in ranked[len(kept):] if scores[n] - scores[kept[-1]] <= rung["noise"]]
        assert (rung["kept"], rung["ties"]) == (kept, ties)
        alive = kept + ties
    for name, steps in reached.items():  # every configuration trained exactly to the rung it reached, no further
        assert read_metrics(stage_dir / name)[-1]["step"] == (8 if name == best else steps)  # (the noise's: on)
    assert read_metrics(replicate)[-1]["step"] == 8
    assert record["best"] == str(stage_dir / record["rungs"][-1]["winner"])


def test_a_survivor_continues_bit_for_bit_as_if_trained_straight(searched, tmp_path, small_data):
    _, runs, _, study = searched
    winner = Path(study["stages"][0]["best"])
    config = json.loads((winner / "config.json").read_text())
    settings = {k: config[k] for k in ("model", "data", "rank", "lr", "batch", "ctx", "val_batches", "seed",
                                       "eval_every", "schedule", "warmup", "gqa")}
    straight = train_run(TrainConfig(**settings, steps=8, out=str(tmp_path / "straight"), runs_dir=str(tmp_path),
                                     checkpoint_every=0), progress=False)
    got, expected = comparable(read_metrics(winner)), comparable(read_metrics(straight.run_dir))
    assert [m["step"] for m in got] == list(range(9))
    assert got == expected  # losses, validation losses, lr, gradient norms: bit for bit across rungs 2 and 4


def test_the_plan_counts_the_search_and_the_ledger_books_every_step(searched):
    plan, runs, estimate, study = searched
    record = study["stages"][0]
    run_dirs = [Path(d) for d in record["runs"] + record["noise_runs"]]
    booked = [read_record(d / "flops.json") for d in run_dirs]
    spent = sum(r.by_kind["train"] + r.by_kind["eval"] for r in booked)
    search = next(s for s in estimate.stages if s.name == "search")
    after = next(s for s in estimate_plan(load_plan(plan, runs_dir=runs)).stages if s.name == "search")
    assert after.total == spent == record["flops"]["search"] and after.search["done"]  # exact once decided
    # Before anything ran: a bound without ties (the noise's reference counted apart at every later rung, where it
    # may be cut), and one with every configuration going on as a tie.
    assert search.search["bounds"] == ["the noise's reference counted apart where it may be cut"]
    assert spent <= search.search["with_ties"]
    if not any(r.get("ties") for r in record["rungs"]):
        assert spent <= search.total
    per_step = read_record(run_dirs[0] / "flops.json").data["train"]["per_step_flops"]
    assert search.search["train"] == (4 * 2 + 2 * 2 + 1 * 4 + 8 + (2 + 4)) * per_step  # by hand, no ties
    steps = sum(read_metrics(d)[-1]["step"] for d in run_dirs)
    reference = Path(record["noise_reference"]).name
    reached = max(r["steps"] for r in record["rungs"] if reference in r["runs"])
    in_rungs = sum(len(r["runs"]) * (r["steps"] - before) for r, before in zip(record["rungs"], [0, 2, 4]))
    assert steps == in_rungs + 8 + (8 - reached)  # the rungs, the replicate to the top, the reference carried on
    assert record["flops"]["search_train"] == steps * per_step  # every step booked once
    assert record["flops"]["grid_train"] == 4 * 8 * per_step  # the same configurations as a full grid
    assert search.search["counts"][0] == 4 and search.search["grid_train"] == 4 * 8 * per_step
    final = next(s for s in study["stages"] if s["name"] == "final")
    assert json.loads((Path(final["best"]) / "config.json").read_text())["lr"] == \
        json.loads((Path(record["best"]) / "config.json").read_text())["lr"]  # from = "search": its winner


def test_the_report_shows_the_rungs(searched, tmp_path, capsys):
    _, runs, _, study = searched
    assert report_cli.main([str(runs), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    header = "| configuration | steps reached | loss @2 | loss @4 | loss @8 | outcome |"
    lines = text.splitlines()
    table = lines[lines.index(header) + 2:]
    table = table[:next(i for i, line in enumerate(table) if not line.startswith("|"))]
    assert len(table) == 5 and table[-1].startswith("| *seed noise at the rung* | | ")  # every configuration, cut
    noises = [f"{r['noise']:.4g}" for r in study["stages"][0]["rungs"]]  # or not, and the noise at each rung
    assert [c.strip() for c in table[-1].strip("|").split("|")][2:5] == noises
    winner = study["stages"][0]["rungs"][-1]["winner"]
    assert table[0].startswith(f"| `{winner}` | 8 |") and table[0].endswith("| winner |")
    cut = [line for line in table if line.endswith("| cut at 2 |")]
    assert len(cut) == 4 - 2 - len(study["stages"][0]["rungs"][0]["ties"])
    figure = next((tmp_path / "report_figures").glob("search_*.png"))
    assert f"report_figures/{figure.name}" in text
    assert "of the " in text and "the same configurations would cost as a full grid" in text
    # Issue 40: the search's noise, measured at its top rung, everywhere; never "unmeasured" beside its replicate.
    findings = text.split("## Findings\n")[1].split("\n## ")[0]
    noise = study["stages"][0]["noise"]
    assert f"Noise of the whole-window validation loss: {noise:.4g}, measured by the search at step 8" in findings
    for said in ("unmeasured", "No seed replicates", "no seed replicates", "Next: rerun"):
        assert said not in text
    assert "lowered its criterion by " in text and "lowered its criterion by -" not in text  # (a double negative)


def copy_of(runs: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    return copy


DAMAGED = {"rungs = 5": ("rungs", 5, '"rungs" must be a list of rung records, got 5'),
           "kept = []": ("kept", [], '"rungs"[0]["kept"] must be a non-empty list of run names, got []'),
           "kept names no run": ("kept", ["bogus"], '"rungs"[0]["kept"] names \'bogus\', which is not one of'),
           "kept is a string": ("kept", "c00", '"rungs"[0]["kept"] must be a non-empty list of run names, got \'c00\'')}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_search_record_is_named_in_one_line(searched, tmp_path, capsys, case):
    """Issue 42 item 13: a hand-damaged study.json record of a search is refused by flops.py --plan and train.py
    --plan in one line naming the field (was a TypeError traceback, or "no configuration has a finite validation
    loss"), and the report names it and no winner."""
    plan, runs, _, _ = searched
    key, value, message = DAMAGED[case]
    runs = copy_of(runs, tmp_path)
    path = runs / "srch" / "study.json"
    study = json.loads(path.read_text())
    if key == "rungs":
        study["stages"][0]["rungs"] = value
    else:
        study["stages"][0]["rungs"][0][key] = value
    path.write_text(json.dumps(study))
    capsys.readouterr()
    assert flops_cli.main(["--plan", str(plan), "--runs", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the record of search stage search is damaged: " + message in err, err
    if case == "rungs = 5":
        assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert report_cli.main([str(runs), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "The search record of this stage in study.json is damaged (" + message in text
    assert "its search record in study.json is damaged" in text and "Winner: `c" not in text


def test_a_study_record_that_cannot_be_read_names_no_winner(searched, tmp_path, capsys):
    """Issue 42 item 13: with study.json unreadable the report no longer treats the search as a grid whose best
    run (a seed replicate among them) "won"; and a torn metrics.jsonl is warned about once (item 17)."""
    _, runs, _, study = searched
    runs = copy_of(runs, tmp_path)
    (runs / "srch" / "study.json").write_text("{ not json")
    torn = Path(study["stages"][0]["runs"][0].replace(str(searched[1]), str(runs))) / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 99, "val_lo')
    capsys.readouterr()
    assert report_cli.main([str(runs), "--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().err.count("dropped the last line") == 1  # (was twice: the runs, then the figure)
    text = (tmp_path / "report" / "report.md").read_text()
    search = text.split("### srch/search")[1].split("\n### ")[0]
    assert "Winner:" not in search and "| winner |" not in search
    record = runs / "srch" / "study.json"
    assert f"- **srch/search**: its study's record {record} cannot be read: no run is named its winner." in text


# ---- killed, capped, parallel --------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def test_a_killed_search_resumes_in_its_rung_and_trains_nothing_twice(tmp_path, small_data):
    plan_path, runs = write(tmp_path / "k.toml", small_data, SEARCH), tmp_path / "runs"
    estimate = estimate_plan(load_plan(plan_path, runs_dir=runs))
    resumed = []

    def kill_at_the_second_run_of_rung_2(line: str) -> None:
        if "resuming (4 steps)" in line:
            resumed.append(line)
            if len(resumed) == 2:
                raise Killed(line)

    with pytest.raises(Killed):
        run_plan(load_plan(plan_path, runs_dir=runs), progress=False, log=kill_at_the_second_run_of_rung_2)
    # Issue 42 item 8: the report of the killed search counts what the ledger booked (study.json's record of its
    # FLOPs predates the kill) and says where it stopped, naming no winner.
    assert report_cli.main([str(runs), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"| search's FLOPs with validation (spent) | {format_flops(Ledger(runs).totals().spent)} |" in text
    assert "- **k/search**: The search is not finished: rung 2 of 3 (4 steps) in progress" in text
    assert "Winner:" not in text and "winner `" not in text
    finished = Path(resumed[0].split(": resuming")[0].split("] ", 1)[1])
    finished_dir = runs / "k" / finished
    before = (finished_dir / "metrics.jsonl").read_text()
    assert read_metrics(finished_dir)[-1]["step"] == 4  # it finished rung 2 before the kill
    run_plan(load_plan(plan_path, runs_dir=runs), progress=False, log=lambda line: None)
    assert (finished_dir / "metrics.jsonl").read_text() == before  # not trained again
    record = json.loads((runs / "k" / "study.json").read_text())["stages"][0]
    assert record["done"]
    for run_dir in map(Path, record["runs"] + record["noise_runs"]):
        steps = [m["step"] for m in read_metrics(run_dir)]
        assert steps == list(range(steps[-1] + 1))  # every step once
        booked = read_record(run_dir / "flops.json")
        assert booked.by_kind["train"] == steps[-1] * booked.data["train"]["per_step_flops"]  # booked once
    spent = Ledger(runs).totals().spent
    assert spent == estimate_plan(load_plan(plan_path, runs_dir=runs)).total and Ledger(runs).totals().outstanding == 0
    assert spent <= estimate.stages[0].search["with_ties"]


def test_the_cap_refuses_a_search_that_does_not_fit_before_anything_runs(tmp_path, small_data, capsys):
    plan_path, runs = write(tmp_path / "c.toml", small_data, SEARCH), tmp_path / "runs"
    total = estimate_plan(load_plan(plan_path, runs_dir=runs)).total
    assert flops_cli.main(["--plan", str(plan_path), "--runs", str(runs), "--max-flops", str(total - 1)]) == 3
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "successive halving, eta 2" in out and "as a full grid to 8 steps" in out
    assert train_cli.main(["--plan", str(plan_path), "--runs-dir", str(runs), "--max-flops", str(total - 1)]) == 3
    assert not (runs / "c" / "search").exists() and Ledger(runs).totals().spent == 0


def test_a_rungs_runs_go_through_parallel_jobs(searched, tmp_path, small_data):
    plan_path, runs = write(tmp_path / "srch.toml", small_data, SEARCH), tmp_path / "runs"
    assert train_cli.main(["--plan", str(plan_path), "--runs-dir", str(runs), "--jobs", "2"]) == 0
    record = json.loads((runs / "srch" / "study.json").read_text())["stages"][0]
    sequential = searched[3]["stages"][0]
    assert record["rungs"] == sequential["rungs"] and record["noise"] == sequential["noise"]
    logs = sorted(p.name for p in (runs / "srch" / "jobs" / "search").glob("*.log"))
    assert len(logs) == 5  # four configurations and the noise replicate, each a job (a log appended per rung)


# ---- divergence and the noise rule under the budget ----------------------------------------------------------------

def test_a_diverged_configuration_is_cut_not_a_failed_study(tmp_path, small_data, monkeypatch):
    plan_path, runs = write(tmp_path / "d.toml", small_data, SEARCH), tmp_path / "runs"
    real, calls = search_module.train_or_resume, []

    def diverge_the_largest_lr(config, label, progress, log):
        calls.append(label)
        if config.lr == 1e-2:
            raise TrainingDiverged(f"{config.run_dir}: non-finite numbers at step 1")
        real(config, label, progress, log)

    monkeypatch.setattr(search_module, "train_or_resume", diverge_the_largest_lr)
    run_plan(load_plan(plan_path, runs_dir=runs), progress=False, log=lambda line: None)
    record = json.loads((runs / "d" / "study.json").read_text())["stages"][0]
    assert record["diverged"] == ["c03_lr0.01"] and record["done"]
    first = record["rungs"][0]
    assert first["scores"][3] is None and "c03_lr0.01" in first["cut"]
    calls.clear()
    run_plan(load_plan(plan_path, runs_dir=runs), progress=False, log=lambda line: None)
    assert calls == []  # a rerun trains nothing: the diverged configuration stays cut


def test_ties_within_the_noise_go_on_only_while_the_plan_fits_and_the_verdict_is_kept(tmp_path, small_data,
                                                                                      monkeypatch):
    plan_path, runs = write(tmp_path / "t.toml", small_data, SEARCH), tmp_path / "runs"
    real_cut = standing.cut_rung

    def a_tie_at_the_first_rung(scores, eta, noise):  # the third within the noise of the second
        return Cut([0, 1], [2], [3]) if len(scores) == 4 else real_cut(scores, eta, noise)

    monkeypatch.setattr(standing, "cut_rung", a_tie_at_the_first_rung)

    class DoesNotFit:
        fits = False

    monkeypatch.setattr(search_module, "estimate_plan", lambda plan: DoesNotFit())
    lines = []
    run_plan(load_plan(plan_path, runs_dir=runs), progress=False, log=lines.append)
    record = json.loads((runs / "t" / "study.json").read_text())["stages"][0]
    first = record["rungs"][0]
    assert first["ties"] == [] and first["ties_dropped"] == [first["runs"][2]] and first["runs"][2] in first["cut"]
    assert any("would not leave the rest of the plan room in the budget" in line for line in lines)
    tie_dir = runs / "t" / "search" / first["runs"][2]
    assert read_metrics(tie_dir)[-1]["step"] == 2  # cut at the first rung
    monkeypatch.setattr(search_module, "estimate_plan", lambda plan: type("Fits", (), {"fits": True})())
    run_plan(load_plan(plan_path, runs_dir=runs), progress=False, log=lambda line: None)
    assert read_metrics(tie_dir)[-1]["step"] == 2  # the recorded verdict holds on a rerun: not trained on
    assert json.loads((runs / "t" / "study.json").read_text())["stages"][0]["rungs"][0] == first


def test_ties_within_the_noise_go_on_when_the_plan_fits(tmp_path, small_data, monkeypatch):
    plan_path = write(tmp_path / "f.toml", small_data, SEARCH.replace("steps = 8", "steps = 4"))
    runs = tmp_path / "runs"
    real_cut = standing.cut_rung
    monkeypatch.setattr(standing, "cut_rung", lambda scores, eta, noise:
                        Cut([0, 1], [2], [3]) if len(scores) == 4 else real_cut(scores, eta, noise))
    run_plan(load_plan(plan_path, runs_dir=runs), progress=False, log=lambda line: None)
    first = json.loads((runs / "f" / "study.json").read_text())["stages"][0]["rungs"][0]
    assert first["ties"] == [first["runs"][2]] and first["ties_dropped"] == []
    assert read_metrics(runs / "f" / "search" / first["runs"][2])[-1]["step"] == 4  # it went on to the top rung


ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_search_plans_fit_and_the_coursework_search_costs_less_than_its_grid(tmp_path):
    def stages(name):
        plan = load_plan(ROOT / "plans" / f"{name}.toml", runs_dir=tmp_path / name)
        estimate = estimate_plan(plan)
        assert estimate.fits and estimate.total <= 1e17
        return plan, {s.name: s for s in estimate.stages}

    plan, searched = stages("coursework_search")
    _, gridded = stages("coursework")
    assert searched["search"].runs >= 3 * 9 and plan.stage("search").search is not None
    assert searched["search"].total <= gridded["grid"].total  # more configurations for fewer FLOPs ...
    assert searched["final"].steps > 6000  # ... and the final run gets what that saves (steps = "rest")
    plan, demo = stages("demo_search")
    assert demo["search"].runs >= 16 and (ROOT / plan.train["model"]).is_dir()
    grid_plan, grid = stages("demo_search_grid")
    assert grid["grid"].runs == demo["search"].runs  # the evidence plan: the same configurations as a grid
    assert demo["search"].search["grid_train"] == grid["grid"].train


def test_the_command_line_cannot_break_a_search(tmp_path):
    """--seed equal to a noise seed, or a cosine schedule, given with --plan, are checked as the plan's own are."""
    from study.plan import with_train_settings

    path = write(tmp_path / "p.toml", "x.h5", SEARCH + "noise_seeds = [1]\n")
    with pytest.raises(PlanError, match="with the command line's settings: noise_seeds \\[1\\] holds"):
        with_train_settings(load_plan(path), {"seed": 1, "data": "x.h5"})
    with pytest.raises(PlanError, match="with the command line's settings: a search trains with schedule"):
        with_train_settings(load_plan(path), {"schedule": "cosine"})


def test_runs_over_lora_targets_are_named_by_their_letters(tmp_path):
    """A grid over `targets` names its runs _qv, _qkvo (was _targets['q_proj', 'v_proj']: quotes and spaces in a
    directory name); a search names every varied setting the same way."""
    stages = ('[[stage]]\nname = "g"\nsteps = 4\ntargets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", '
              '"o_proj"]]\n')
    path = tmp_path / "p.toml"
    path.write_text(tiny_plan("p", "x.h5", stages + SEARCH.replace("lr = [1e-4, 1e-3, 3e-3, 1e-2]",
                                                                   'targets = [["q_proj"], ["down_proj", "up_proj"]]'),
                              eval_every=None))
    options = resolve(load_plan(path))
    assert [r.name for r in options["g"][0]] == ["tiny_r2_lr1e-05_ctx32_qv", "tiny_r2_lr1e-05_ctx32_qkvo"]
    assert [r.name for r in options["search"][0]] == ["c00_q", "c01_du"]


def test_the_noise_is_measured_on_the_criterion_the_cuts_use(tmp_path, small_data):
    """Configurations at two context lengths are compared over the same last N targets; so is the noise."""
    stages = ('[[stage]]\nname = "search"\nsearch = "halving"\neta = 2\nfirst_steps = 2\nsteps = 4\n'
              'ctx = [16, 32]\n')
    plan_path, runs = write(tmp_path / "n.toml", small_data, stages), tmp_path / "runs"
    run_plan(load_plan(plan_path, runs_dir=runs), progress=False, log=lambda line: None)
    record = json.loads((runs / "n" / "study.json").read_text())["stages"][0]
    dirs = [Path(d) for d in record["runs"] + record["noise_runs"]]
    counts = set.intersection(*({int(k) for m in read_metrics(d) if m.get("val_loss_last") for k in m["val_loss_last"]}
                                for d in dirs))
    n = max(counts)

    def last_n(run_dir, step):
        (value,) = [m["val_loss_last"][str(n)] for m in read_metrics(run_dir) if m["step"] == step]
        return value

    first = record["rungs"][0]
    assert first["scores"] == pytest.approx([last_n(d, 2) for d in dirs[:2]], abs=0)
    best = dirs[:2][min(range(2), key=lambda i: first["scores"][i])]
    assert first["noise"] == pytest.approx(abs(last_n(best, 2) - last_n(dirs[2], 2)), abs=1e-12)
    top = record["rungs"][-1]  # the top's, on its criterion (one context length left there: whole windows)
    at_top = (lambda d: last_n(d, 4)) if "last" in top["criterion"] else (lambda d: loss_at(d, 4))
    assert record["noise"] == pytest.approx(abs(at_top(best) - at_top(dirs[2])), abs=1e-12)
    assert f"last {n} targets" in first["criterion"]
