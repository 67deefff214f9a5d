"""Issue 40 item 4 and issue 42 (the search's items): a rung scores the loss at its step (never step 0), the noise is
measured at every rung's length and the report holds each verdict against its own study's noise, a search's plan
keys refused as a grid's are (an inherited decaying schedule, a list naming a value twice, a bad range's end, one
configuration, too many), the default first rung, the count flops.py --plan gives, and the report after a search that
stopped. Runs written by hand where the numbers must be known in advance; real tiny searches where they must be
trained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_plan
from test_report_findings import report_of, section, write_run

import flops as flops_cli
import train as train_cli
from ledger import Ledger, read_record
from qwen_mini.flop_report import format_flops
from study.estimate import estimate_plan
from study.halving import MAX_CONFIGS, SearchSpec, rung_steps
from study.plan import load_plan
from study.run import run_plan
from study.search import rung_line
from study.standing import replay, resolve
from training import read_metrics

# ---- the rules, by hand --------------------------------------------------------------------------------------------


def test_the_default_first_rung_ends_the_ladder_exactly_at_steps():
    """Default first_steps = ceil(steps / eta**2): three rungs, the top one the stage's steps (was steps // eta**2:
    100 steps, eta 3 gave 11, 33, 99 and a 1-step top rung at 100)."""
    def ladder(steps, eta):
        return rung_steps(SearchSpec(eta=eta).first_rung(steps), eta, steps)

    assert ladder(100, 3) == [12, 36, 100]  # 100 / 9 = 11.1 -> 12; 12 x 3 = 36; 36 x 3 = 108 >= 100: the top
    assert ladder(450, 3) == [50, 150, 450]  # divisible: the rungs eta apart
    assert ladder(10, 2) == [3, 6, 10]  # 10 / 4 = 2.5 -> 3
    assert ladder(9, 3) == [1, 3, 9] and ladder(5, 3) == [1, 3, 5] and ladder(3, 3) == [1, 3]
    assert all(len(ladder(steps, 3)) == 3 for steps in range(10, 2000))  # never a fourth, tiny rung


def test_the_rung_line_counts_each_cut_configuration_once():
    rung = {"steps": 4, "runs": ["a", "b", "c", "d"], "scores": [1.0, 1.1, 1.12, 2.0], "criterion": "loss",
            "kept": ["a", "b"], "ties": [], "cut": ["c", "d"], "ties_dropped": ["c"], "noise": 0.05}
    line = rung_line("s", rung)
    assert line.endswith("cut for the budget though within the noise: c (1.1200); cut 1 other(s)")  # was "cut 2"


def fake_search(tmp_path: Path, curves: dict[str, list[tuple[int, float]]], stage: str) -> tuple:
    """A search plan whose configurations' runs are written by hand (config.json, metrics.jsonl, an adapter
    directory: each run finished its steps), so replay scores known numbers."""
    path = tmp_path / "f.toml"
    path.write_text(tiny_plan("f", "x.h5", stage, eval_every=None))
    plan = load_plan(path, runs_dir=tmp_path / "runs")
    runs = resolve(plan)["s"][0]
    for run in runs:
        write_fake_run(run.run_dir(plan), run.settings, curves[run.name])
    return plan, runs


def write_fake_run(run_dir: Path, settings: dict, curve: list[tuple[int, float]]) -> None:
    """A run finished to its curve's last step, as far as the search and the report read it."""
    write_run(run_dir, seed=settings.get("seed", 0), lr=settings["lr"], steps=curve[-1][0], vals=curve)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")  # (written last of a saved adapter)


def test_a_rung_scores_the_loss_at_its_step_never_step_0(tmp_path):
    """c00's loss went up from the untrained 3.0; c01 dipped at step 1 and ended at 3.4. The lowest up to the rung
    (the old score) gave 3.0 (step 0's: the untrained model), 2.0 (weights that do not go on) and 3.0 (step 0's
    again), and kept c01. At the rung's step: 3.5, 3.4, 3.2: c02 goes on alone (eta 3: the best third)."""
    stage = '[[stage]]\nname = "s"\nsearch = "halving"\neta = 3\nfirst_steps = 2\nsteps = 6\nnoise_seeds = []\n' \
            'lr = [1e-3, 2e-3, 3e-3]\n'
    curves = {"c00_lr0.001": [(0, 3.0), (1, 3.3), (2, 3.5)], "c01_lr0.002": [(0, 3.0), (1, 2.0), (2, 3.4)],
              "c02_lr0.003": [(0, 3.0), (1, 3.1), (2, 3.2)]}
    plan, runs = fake_search(tmp_path, curves, stage)
    first = replay(plan, plan.stage("s"), runs).rungs[0]
    assert first["scores"] == [3.5, 3.4, 3.2] and first["criterion"] == "validation loss at step 2"
    assert (first["kept"], first["ties"], first["cut"]) == (["c02_lr0.003"], [], ["c00_lr0.001", "c01_lr0.002"])


def test_a_search_recorded_before_the_noise_went_on_keeps_its_first_rungs_noise(tmp_path):
    """A finished search whose study.json predates the noise at every rung (no "noise_scores" in its rungs; its
    replicate trained to the first rung only) is not trained again: replay finds it done, its noise the first
    rung's (2.91 - 2.90 = 0.01, at step 2), flops.py --plan has nothing left to count, and the report says where
    the noise was measured."""
    stage = '[[stage]]\nname = "s"\nsearch = "halving"\neta = 2\nfirst_steps = 2\nsteps = 4\nnoise_seeds = [1]\n' \
            'lr = [1e-3, 2e-3, 3e-3, 4e-3]\n'
    curves = {"c00_lr0.001": [(0, 3.0), (2, 2.95)], "c01_lr0.002": [(0, 3.0), (2, 2.90), (4, 2.80)],
              "c02_lr0.003": [(0, 3.0), (2, 2.92), (4, 2.85)], "c03_lr0.004": [(0, 3.0), (2, 2.97)]}
    plan, runs = fake_search(tmp_path, curves, stage)
    s = plan.study_dir / "s"
    write_fake_run(s / "c01_lr0.002_seed1", {**runs[1].settings, "seed": 1}, [(0, 3.0), (2, 2.91)])
    rungs = [{"steps": 2, "runs": [r.name for r in runs], "scores": [2.95, 2.90, 2.92, 2.97],
              "criterion": "lowest validation loss", "noise": 0.01, "kept": ["c01_lr0.002", "c02_lr0.003"],
              "ties": [], "cut": ["c00_lr0.001", "c03_lr0.004"], "ties_dropped": []},
             {"steps": 4, "runs": ["c01_lr0.002", "c02_lr0.003"], "scores": [2.80, 2.85],
              "criterion": "lowest validation loss", "winner": "c01_lr0.002"}]
    record = {"name": "s", "kind": "train", "search": "halving", "eta": 2, "ladder": [2, 4], "varied": ["lr"],
              "runs": [str(r.run_dir(plan)) for r in runs], "noise_runs": [str(s / "c01_lr0.002_seed1")],
              "noise": 0.01, "noise_how": "its first rung's", "rungs": rungs, "diverged": [], "done": True,
              "best": str(s / "c01_lr0.002"), "criterion": "lowest validation loss", "best_score": 2.80}
    (plan.study_dir / "study.json").write_text(json.dumps({"name": "f", "stages": [record]}))
    state = replay(plan, plan.stage("s"), runs)
    assert state.done and state.winner.name == "c01_lr0.002" and not state.todo_replicates
    assert state.noise == pytest.approx(0.01, abs=1e-12) and state.noise_steps == 2 and not state.noise_carried
    assert estimate_plan(plan).left == 0
    text = report_of(plan.runs_dir)
    assert "Noise of the whole-window validation loss: 0.01, measured by the search at step 2" in text
    assert "(beyond the seed noise: 0.01 at step 2)" in text


# ---- plan keys refused as a grid's are (issue 42 items 1, 2, 11, 18, 21) --------------------------------------------

LRS, RANKS = ", ".join(f"{(i + 1) * 1e-5:g}" for i in range(110)), ", ".join(map(str, range(1, 11)))
REFUSED = {
    # A search inherits the schedule of the stage it starts from: a decay at every rung's end. Refused, naming it.
    "inherited cosine": ('[[stage]]\nname = "g"\nsteps = 8\nschedule = "cosine"\nlr = [1e-3, 1e-2]\n[[stage]]\n'
                         'name = "s"\nfrom = "g"\nsearch = "halving"\nsteps = 8\nrank = [2, 4]\n',
                         "stage 2 (s): a search trains with schedule = \"constant\" (after any warmup), got 'cosine' "
                         "from stage g"),
    "inherited wsd": ('[[stage]]\nname = "g"\nsteps = 8\nschedule = "wsd"\nlr = [1e-3, 1e-2]\n[[stage]]\n'
                      'name = "s"\nfrom = "g"\nsearch = "halving"\nsteps = 8\nrank = [2, 4]\n',
                      "got 'wsd' from stage g"),
    "a value twice": ('[[stage]]\nname = "s"\nsearch = "halving"\nsteps = 8\nlr = [1e-2, 1e-2, 1e-3]\n',
                      "stage 1 (s): lr = [0.01, 0.01, 0.001] lists 0.01 twice"),
    "a grid's value twice": ('[[stage]]\nname = "g"\nsteps = 8\nrank = [2, 4, 2]\n', "rank = [2, 4, 2] lists 2 twice"),
    "a range's bad end": ('[[stage]]\nname = "s"\nsearch = "halving"\nsteps = 8\nlr = {uniform = [-1e-2, 1e-2]}\n'
                          'configs = 4\n',
                          "stage 1 (s): the range lr = {uniform = [-0.01, 0.01]} ends at -0.01: lr must be a positive"),
    "one configuration": ('[[stage]]\nname = "s"\nsearch = "halving"\nsteps = 8\nlr = [1e-2]\n',
                          "stage 1 (s): a search of one configuration has nothing to cut"),
    "configs = 100000": ('[[stage]]\nname = "s"\nsearch = "halving"\nsteps = 8\nlr = {log = [1e-5, 1e-2]}\n'
                         'configs = 100000\n', f"configs 100000 is more than {MAX_CONFIGS}"),
    "a grid of 1100 runs": (f'[[stage]]\nname = "g"\nsteps = 8\nlr = [{LRS}]\nrank = [{RANKS}]\n',
                            f"1100 runs, more than {MAX_CONFIGS}"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_search_plan_is_refused_in_one_line(tmp_path, capsys, case):
    stages, message = REFUSED[case]
    path = tmp_path / "p.toml"
    path.write_text(tiny_plan("p", "x.h5", stages, eval_every=None))
    assert flops_cli.main(["--plan", str(path), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_search_takes_the_schedule_it_inherits_not_the_plans(tmp_path):
    """[train] decays (cosine), the grid a search starts from sets the constant schedule: the search inherits the
    constant one and is accepted (it was refused, for [train]'s cosine); the stage's own setting wins over both."""
    stages = ('[[stage]]\nname = "g"\nsteps = 8\nschedule = "constant"\nlr = [1e-3, 1e-2]\n[[stage]]\nname = "s"\n'
              'from = "g"\nsearch = "halving"\nsteps = 8\nrank = [2, 4]\n')
    path = tmp_path / "p.toml"
    path.write_text(tiny_plan("p", "x.h5", stages, eval_every=None, schedule="cosine", warmup=1))
    assert load_plan(path).stage("s").search is not None
    path.write_text(path.read_text().replace('schedule = "constant"\n', 'schedule = "cosine"\n')
                    + 'schedule = "constant"\n')
    assert load_plan(path).stage("s").settings["schedule"] == "constant"


# ---- the report's noise, per study (issue 40 item 4, issue 42 item 14) ---------------------------------------------

def write_study(study_dir: Path, stages: list[dict], data: list[dict] | None = None) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.json").write_text(json.dumps({"name": study_dir.name, "stages": stages,
                                                      **({"data": data} if data else {})}))


def test_the_report_holds_a_search_against_its_noise_at_the_top_rung(tmp_path):
    """A search whose noise (c01 against its replicate at seed 1) is 0.02 at the top rung's step 4 (2.80 and 2.82),
    though the replicate dipped to 2.70 at step 3: every verdict is held against 0.02, measured at step 4, never
    against a best-score spread (0.10) nor called unmeasured; the final run of the same study too."""
    runs, study = tmp_path / "runs", tmp_path / "runs" / "st"
    s = study / "search"
    write_run(s / "c00_lr0.001", lr=1e-3, vals=((0, 3.0), (2, 2.92)))
    write_run(s / "c01_lr0.003", lr=3e-3, vals=((0, 3.0), (2, 2.90), (4, 2.80)))
    write_run(s / "c02_lr0.01", lr=1e-2, vals=((0, 3.0), (2, 2.91), (4, 2.85)))
    write_run(s / "c01_lr0.003_seed1", lr=3e-3, seed=1, vals=((0, 3.0), (2, 2.905), (3, 2.70), (4, 2.82)))
    write_run(study / "final" / "r2_lr0.003", lr=3e-3, steps=8, vals=((0, 3.0), (8, 2.97)))
    rungs = [{"steps": 2, "runs": ["c00_lr0.001", "c01_lr0.003", "c02_lr0.01"], "scores": [2.92, 2.90, 2.91],
              "criterion": "validation loss at step 2", "noise": 0.005, "noise_scores": {}, "kept": ["c01_lr0.003"],
              "ties": ["c02_lr0.01"], "cut": ["c00_lr0.001"], "ties_dropped": []},
             {"steps": 4, "runs": ["c01_lr0.003", "c02_lr0.01"], "scores": [2.80, 2.85],
              "criterion": "validation loss at step 4", "noise": 0.02, "noise_scores": {}, "winner": "c01_lr0.003"}]
    record = {"name": "search", "kind": "train", "search": "halving", "eta": 3, "ladder": [2, 4], "varied": ["lr"],
              "runs": [str(s / n) for n in rungs[0]["runs"]], "noise_runs": [str(s / "c01_lr0.003_seed1")],
              "noise_reference": str(s / "c01_lr0.003"), "noise": 0.02, "noise_steps": 4, "rungs": rungs,
              "diverged": [], "done": True, "best": str(s / "c01_lr0.003"), "criterion": "validation loss at step 4",
              "best_score": 2.80, "flops": {}}
    final = {"name": "final", "kind": "train", "from": "search", "runs": [str(study / "final" / "r2_lr0.003")],
             "best": str(study / "final" / "r2_lr0.003"), "varied": []}
    write_study(study, [record, final])
    text = report_of(runs)
    findings, runs_section = section(text, "Findings"), section(text, "Runs")
    assert "Noise of the whole-window validation loss: 0.02, measured by the search at step 4" in findings
    assert "(beyond the seed noise: 0.02 at step 4)" in findings  # 2.85 - 2.80 = 0.05 > 0.02
    # The final run's change, 2.97 - 3.0 = -0.03, is beyond 0.02: improved (against 0.10 it would not be).
    assert "- **st/final**: one run, `r2_lr0.003`: best validation loss 2.9700, -0.03 from step 0: improved beyond " \
           "the noise (0.02 at step 4)." in findings
    assert "| `search/c01_lr0.003`, `search/c01_lr0.003_seed1` | 0, 1 | whole-window validation loss, at step 4 (a " \
           "search's) | 2.8000, 2.8200 | 0.02 |" in runs_section
    for said in ("unmeasured", "No seed replicates", "no seed replicates", "0.1,", "(0.1)"):
        assert said not in text


def test_each_study_is_held_against_its_own_noise_and_data(tmp_path):
    """Two studies of one data path whose bytes changed between them: the report lists both sha256, each with its
    study, and the second study's one run is not judged against the first study's seed replicates."""
    runs = tmp_path / "runs"
    old, new = "a" * 64, "b" * 64
    for name, sha in (("old", old), ("new", new)):
        runs_of = [("grid/r2_lr0.001", 0, ((0, 3.0), (4, 2.9))), ("grid/r2_lr0.001_seed1", 1, ((0, 3.0), (4, 2.8)))] \
            if name == "old" else [("final/r2_lr0.001", 0, ((0, 3.0), (4, 2.95)))]
        stages = {}
        for label, seed, vals in runs_of:
            run_dir = write_run(runs / name / label, seed=seed, vals=vals)
            config = json.loads((run_dir / "config.json").read_text())
            (run_dir / "config.json").write_text(json.dumps({**config, "data": "/data/lv.h5", "data_sha256": sha}))
            stages.setdefault(label.split("/")[0], []).append(str(run_dir))
        write_study(runs / name, [{"name": stage, "kind": "train", "runs": dirs, "best": dirs[0], "varied": ["seed"]}
                                  for stage, dirs in stages.items()], data=[{"path": "/data/lv.h5", "sha256": sha}])
    text = report_of(runs)
    assert "- Data: `/data/lv.h5` (sha256 `aaaaaaaaaaaaaaaa`, study old)." in text
    assert "- Data: `/data/lv.h5` (sha256 `bbbbbbbbbbbbbbbb`, study new)." in text
    findings = section(text, "Findings")
    assert "- **new/final**: one run, `r2_lr0.001`: best validation loss 2.9500, -0.05 from step 0: noise " \
           "unmeasured." in findings  # not "not improved beyond the noise (0.1)", the old study's
    assert "Noise of the whole-window validation loss: 0.1, the spread of the best score between seeds 0, 1" in findings


def test_a_torn_metrics_line_is_warned_about_once(tmp_path, capsys):
    """Issue 42 item 17: the report reads each run's metrics.jsonl once (its tables, the winner, the figures), so a
    line cut short by a killed process is warned about once."""
    runs = tmp_path / "runs"
    write_run(runs / "grid" / "a", lr=1e-3)
    torn = write_run(runs / "grid" / "b", lr=3e-3) / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 5, "val_lo')
    capsys.readouterr()
    report_of(runs)
    assert capsys.readouterr().err.count("dropped the last line") == 1


# ---- the report after a search that stopped (issue 42 items 8, 17, 18) ---------------------------------------------

def test_a_dead_search_is_reported_as_stopped_with_no_winner(tmp_path, small_data, capsys):
    """Every configuration diverges at step 1 (LoRA alpha 1e30): the driver warned before training that two rungs
    of two configurations cost more than their grid, stops with exit 4 (diverged), and the report says where the
    search stopped, names no winner, suggests nothing beyond one, and counts what the ledger booked."""
    stage = '[[stage]]\nname = "search"\nsearch = "halving"\neta = 2\nfirst_steps = 2\nsteps = 4\n' \
            'alpha = [1e30, 2e30]\n'
    path = tmp_path / "dead.toml"
    path.write_text(tiny_plan("dead", small_data, stage, eval_every=None, checkpoint_every=2))
    runs = tmp_path / "runs"
    assert flops_cli.main(["--plan", str(path), "--runs", str(runs)]) == 0
    planned = capsys.readouterr().out
    assert "warning: search search costs 150 % of the same configurations as a grid" in planned
    assert " exact" not in planned  # counted without ties, at most: never "exact" before it ran
    assert train_cli.main(["--plan", str(path), "--runs-dir", str(runs)]) == 4
    captured = capsys.readouterr()
    assert captured.out.index("warning: search search costs") < captured.out.index("[plan] search: training")
    assert captured.err.strip().endswith("no configuration has a finite validation loss at step 2: nothing can go on")
    record = json.loads((runs / "dead" / "study.json").read_text())["stages"][0]
    assert record["stopped"] and record["diverged"] == ["c00_a1e+30", "c01_a2e+30"]
    spent = Ledger(runs).totals().spent
    assert spent > 0 and record["flops"]["search"] == spent  # refreshed after the rung's training
    text = report_of(runs)
    assert "The search stopped at rung 1 of 2 (2 steps): every one of its 2 configuration(s) diverged" in \
        section(text, "Findings")
    assert "Winner" not in section(text, "Runs") and "winner `" not in section(text, "Conclusions")
    assert "beyond it" not in text and "not finished" not in text
    assert "| `c00_a1e+30` | 1 |  |  | diverged at step 1 (non-finite numbers): cut |" in text  # (was "2")
    booked = [read_record(Path(d) / "flops.json").by_kind for d in record["runs"]]
    assert f"| search's training FLOPs (spent) | {format_flops(sum(b['train'] for b in booked))} |" in text
    assert f"| search's FLOPs with validation (spent) | {format_flops(spent)} |" in text


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    from test_train import write_small_data

    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5")


# ---- the noise's reference, cut or diverged (issue 40 item 4) ------------------------------------------------------

TWO = '[[stage]]\nname = "search"\nsearch = "halving"\neta = 2\nfirst_steps = 2\nsteps = 4\nlr = [1e-3, 1e-2]\n'


def test_a_cut_reference_trains_on_for_the_noise_and_is_counted(tmp_path, small_data, monkeypatch):
    """The first rung's best (the noise's reference) is cut at the first rung (the verdict forced): it still trains
    to the top rung beside its replicate, as the noise's reference only, so the top rung's noise is measured at the
    top rung's step; flops.py --plan counted it before anything ran, and counts the finished search exactly."""
    from study import standing
    from study.halving import Cut

    path = tmp_path / "c.toml"
    path.write_text(tiny_plan("c", small_data, TWO, eval_every=None, checkpoint_every=2))
    runs = tmp_path / "runs"
    before = estimate_plan(load_plan(path, runs_dir=runs)).stages[0]
    real = standing.cut_rung

    def cut_the_best(scores, eta, noise):
        best = min(range(len(scores)), key=lambda i: scores[i])
        return Cut([1 - best], [], [best]) if len(scores) == 2 else real(scores, eta, noise)

    monkeypatch.setattr(standing, "cut_rung", cut_the_best)
    assert train_cli.main(["--plan", str(path), "--runs-dir", str(runs)]) == 0
    record = json.loads((runs / "c" / "study.json").read_text())["stages"][0]
    reference = Path(record["noise_reference"])
    assert record["rungs"][0]["cut"] == [reference.name] and record["rungs"][1]["runs"] != [reference.name]
    assert read_metrics(reference)[-1]["step"] == 4  # cut at 2, trained on to 4 for the noise
    top = {n: loss_at(reference.parent / n, 4) for n in (reference.name, reference.name + "_seed1")}
    assert record["noise"] == pytest.approx(abs(top[reference.name] - top[reference.name + "_seed1"]), abs=1e-12)
    assert record["noise_steps"] == 4 and record["rungs"][1]["noise_scores"] == pytest.approx(top, abs=0)
    spent = Ledger(runs).totals().spent
    assert before.total == spent  # (2 x 2 + 1 x 2 + the replicate's 4 + the reference's 2 more: by hand, steps)
    after = estimate_plan(load_plan(path, runs_dir=runs)).stages[0]
    assert after.total == spent and after.search["done"]
    text = report_of(runs)
    assert f"| `{reference.name}` | 4 | " in text and "cut at 2; trained on to 4 as the noise's reference |" in text


def test_a_diverged_reference_ends_the_noise_without_training_its_replicates_on(tmp_path, small_data, monkeypatch):
    """The reference diverges in the top rung: the noise there is not measured (never the first rung's instead),
    and its replicate is not trained on for nothing."""
    from study import search as search_module
    from training.stopping import TrainingDiverged

    path = tmp_path / "d.toml"
    path.write_text(tiny_plan("d", small_data, TWO.replace("lr = [1e-3, 1e-2]", "lr = [1e-4, 1e-3, 3e-3, 1e-2]"),
                              eval_every=None, checkpoint_every=2))
    runs, real, trained, first = tmp_path / "runs", search_module.train_or_resume, [], []

    def reference_diverges_at_the_top(config, label, progress, log):
        trained.append((label, config.steps))
        if config.steps == 4 and label.split("/")[1] == first[0]:
            raise TrainingDiverged(f"{config.run_dir}: non-finite numbers at step 3")
        real(config, label, progress, log)
        if label.endswith("_seed1"):  # the reference's replicate: its name says which configuration it repeats
            first.append(label.split("/")[1].removesuffix("_seed1"))

    monkeypatch.setattr(search_module, "train_or_resume", reference_diverges_at_the_top)
    run_plan(load_plan(path, runs_dir=runs), progress=False, log=lambda line: None)
    record = json.loads((runs / "d" / "study.json").read_text())["stages"][0]
    assert record["diverged"] == [first[0]] and record["done"]
    assert [label for label, steps in trained if steps == 4 and label.endswith("_seed1")] == [], trained
    assert record["noise"] is None and record["noise_steps"] is None and record["rungs"][0]["noise"] is not None
    assert record["noise_how"] == f"not measured at step 4: {first[0]} diverged"


def loss_at(run_dir: Path, step: int) -> float:
    (value,) = [m["val_loss"] for m in read_metrics(run_dir) if m["step"] == step]
    return value
