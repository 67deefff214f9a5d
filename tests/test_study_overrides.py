"""The command line over a study plan (issue 35, items 2 and 3): a flag the user typed wins over the plan whatever its
value (train.py's default included), and a study run again with other settings or other data is a study of its own,
said so, never the old study's results "done already"."""
from __future__ import annotations

import argparse
import json

import pytest
from test_train import write_small_data

import train as train_cli
from common.args import typed_dests
from common.fileio import sha256_file


def test_typed_dests_names_a_flag_given_with_its_default_value():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-flops", type=int, default=10)
    parser.add_argument("--rank", type=int, nargs="+", default=[4])
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--cost", action="append", default=[])
    assert typed_dests(parser, ["--max-flops", "10", "--rank", "4"]) == {"max_flops", "rank"}
    assert typed_dests(parser, ["--quiet", "--cost", "a", "--cost", "b"]) == {"quiet", "cost"}
    assert typed_dests(parser, []) == set()


def one_stage_plan(path, data, study: str = "", train: str = "", steps: int = 1) -> str:
    path.write_text(f'[study]\nname = "s"\n{study}\n[train]\nmodel = "tiny"\ndata = "{data}"\nbatch = 2\nctx = 32\n'
                    f'rank = 2\nval_batches = 1\n{train}\n[[stage]]\nname = "grid"\nsteps = {steps}\n')
    return str(path)


def test_a_typed_flag_wins_over_the_plan_even_at_train_pys_default(tmp_path, monkeypatch):
    """--max-flops 1e17, --runs-dir runs, --rank 4 and --batch 4 are train.py's defaults: each, typed, still replaces
    what the plan says (its cap 1e18, its runs_dir, its rank 2 and batch 2)."""
    monkeypatch.chdir(tmp_path)
    data = write_small_data(tmp_path / "lv.h5", n=10)
    plan = one_stage_plan(tmp_path / "p.toml", data, study='runs_dir = "elsewhere"\nmax_flops = 1e18')
    argv = ["--plan", plan, "--max-flops", "1e17", "--runs-dir", "runs", "--rank", "4", "--batch", "4"]
    assert train_cli.main(argv) == 0
    assert not (tmp_path / "elsewhere").exists()
    study = json.loads((tmp_path / "runs" / "s" / "study.json").read_text())
    assert study["max_flops"] == 10 ** 17
    [run] = study["stages"][0]["runs"]
    config = json.loads((tmp_path / run / "config.json").read_text())
    assert (config["rank"], config["batch"], config["max_flops"]) == (4, 4, 10 ** 17)
    assert study["overrides"] == {"batch": 4, "rank": 4}  # what changes results, as the command line gave it


def test_the_same_plan_on_other_data_is_a_study_of_its_own_said_so(tmp_path, monkeypatch, capsys):
    """docs/studies.md's flow: a plan, then the same plan with --data: the second is not "done already" with the first's
    runs but a study of its own beside it (named so on stdout), each recording its data; the same command again
    continues the second, and the first is untouched."""
    monkeypatch.chdir(tmp_path)
    first_data, users = write_small_data(tmp_path / "a.h5", n=10), write_small_data(tmp_path / "b.h5", n=10, seed=7)
    plan = one_stage_plan(tmp_path / "p.toml", first_data)
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs)]) == 0
    first = json.loads((runs / "s" / "study.json").read_text())
    assert first["data"] == [{"path": first_data, "sha256": sha256_file(first_data)}] and first["overrides"] == {}
    capsys.readouterr()

    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs), "--data", users]) == 0
    out = capsys.readouterr().out
    assert "done already" not in out
    [own] = [d for d in runs.iterdir() if d.name != "s" and (d / "study.json").is_file()]
    assert own.name.startswith("s-") and f"a study of its own: {own}/" in out and users in out
    second = json.loads((own / "study.json").read_text())
    assert second["data"] == [{"path": users, "sha256": sha256_file(users)}]
    [run] = second["stages"][0]["runs"]
    assert json.loads((tmp_path / run / "config.json").read_text())["data"] == users
    assert json.loads((runs / "s" / "study.json").read_text()) == first  # the first study is left as it was

    assert train_cli.main(["--plan", plan, "--runs-dir", str(runs), "--data", users]) == 0
    out = capsys.readouterr().out
    assert f"is the study in {own}/, continued" in out and "grid/tiny_r2_lr1e-05_ctx32: done already" in out
    assert sorted(d.name for d in runs.iterdir() if (d / "study.json").is_file()) == ["s", own.name]


def test_a_study_directory_refuses_a_run_of_its_plan_on_other_data(tmp_path, monkeypatch):
    """run_plan itself (without train.py's choice of a directory) refuses to mix two studies' results."""
    from study.plan import PlanError, load_plan, with_train_settings
    from study.run import check_study_dir, write_study

    monkeypatch.chdir(tmp_path)
    first_data, other = write_small_data(tmp_path / "a.h5", n=10), write_small_data(tmp_path / "b.h5", n=10, seed=7)
    plan = load_plan(one_stage_plan(tmp_path / "p.toml", first_data), runs_dir=tmp_path / "runs")
    plan.study_dir.mkdir(parents=True)
    write_study(plan, {})
    check_study_dir(plan)  # the same identity continues
    check_study_dir(with_train_settings(plan, {"rank": 2, "data": first_data}))  # values the plan has anyway
    for settings, named in (({"data": other}, other), ({"rank": 8}, "--rank 8"), ({"seed": 3}, "--seed 3")):
        with pytest.raises(PlanError, match="holds this plan's study on") as refused:
            check_study_dir(with_train_settings(plan, settings))
        assert named in str(refused.value)


@pytest.mark.parametrize("damage", [{"data": 5}, {"data": [{"path": 3}]}, {"overrides": "x"}])
def test_a_study_record_with_a_damaged_identity_is_one_line(tmp_path, monkeypatch, damage):
    """A hand-edited study.json whose "data" or "overrides" is not of their form: named, not a traceback."""
    from study.identity import study_for
    from study.plan import PlanError, load_plan
    from study.run import check_study_dir, write_study

    monkeypatch.chdir(tmp_path)
    plan = load_plan(one_stage_plan(tmp_path / "p.toml", write_small_data(tmp_path / "a.h5", n=10)),
                     runs_dir=tmp_path / "runs")
    plan.study_dir.mkdir(parents=True)
    write_study(plan, {})
    record = plan.study_dir / "study.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), **damage}))
    assert study_for(plan, log=lambda line: None) == plan  # left where it is, for check_study_dir to name
    with pytest.raises(PlanError, match="is not what train.py writes"):
        check_study_dir(plan)
