"""A recipe of several stages (series-tiny has two): `python -m models.recipe` trains each stage from the one before,
exports the last one with a record of every stage, and a second invocation trains nothing again."""
import hashlib
import json

from models import recipe

FAST = ["--ctx", "128", "--batch", "2", "--val-batches", "1", "--eval-every", "2", "--checkpoint-every", "2",
        "--dtype", "float32"]  # after COMMON on the command line: argparse keeps the last value


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_two_stage_recipe_chains_its_stages_and_exports_the_last(tmp_path, monkeypatch, capsys):
    two = recipe.Recipe(
        name="two-stage", summary="a test recipe", data_text="test series",
        datasets={"a.h5": {"n": 40, "seed": 1, "mix": "sines=1"}, "b.h5": {"n": 40, "seed": 2, "mix": "predprey=1"}},
        stages=[{"out": "run", "model": "init", "data": "a.h5",
                 "args": ["--steps", "2", "--lr", "1e-3", "--warmup", "1", *FAST]},
                {"out": "run2", "model": "run/model", "data": "b.h5",
                 "args": ["--steps", "3", "--lr", "1e-3", "--warmup", "1", *FAST]}])
    monkeypatch.setitem(recipe.RECIPES, two.name, two)
    work, out = tmp_path / "work", tmp_path / "model"
    argv = ["--model", two.name, "--work", str(work), "--out", str(out)]

    assert recipe.main(argv) == 0
    first, second = (json.loads((work / run / "config.json").read_text()) for run in ("run", "run2"))
    assert first["model_dir"] == str(work / "init") and first["data_source"] == str(work / "a.h5")
    assert second["model_dir"] == str(work / "run" / "model") and second["data_source"] == str(work / "b.h5")
    # each stage changed the weights it started from, and the export is the last stage's
    weights = {name: sha(work / name / recipe.WEIGHTS) for name in ("init", "run/model", "run2/model")}
    assert len(set(weights.values())) == 3
    assert sha(out / recipe.WEIGHTS) == weights["run2/model"]

    record = json.loads((out / "recipe.json").read_text())
    assert [(s["out"], s["data"], s["steps"]) for s in record["stages"]] == [("run", "a.h5", 2), ("run2", "b.h5", 3)]
    assert record["train_flops"] == sum(s["train_flops"] for s in record["stages"])
    assert record["train_flops"] == 2 * first["per_step_flops"] + 3 * second["per_step_flops"]
    assert record["sha256"] == weights["run2/model"]
    assert len(record["commands"]) == 1 + 2 + 2  # init, two data sets, two stages
    assert "--model runs/two-stage-pretrain/run/model --data runs/two-stage-pretrain/b.h5" in record["commands"][-1]
    readme = (out / "README.md").read_text()
    assert "- Stage 1 (`run/`, on `a.h5`)" in readme and "- Stage 2 (`run2/`, on `b.h5`)" in readme

    capsys.readouterr()
    assert recipe.main(argv) == 0  # everything is there: no stage trains again, the export is the same
    assert "[recipe] train:" not in capsys.readouterr().out
    assert sha(out / recipe.WEIGHTS) == weights["run2/model"]


def test_recipe_flags_that_cannot_work_are_one_line_before_anything_runs(tmp_path, capsys):
    """--readme-only without an exported model there, a --work that is a file, --threads beyond any machine: each
    exit 2 with one line, nothing made."""
    import pytest

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(["--readme-only", "--out", str(tmp_path / "missing")], "holds no exported model"),
             (["--work", str(a_file)], f"--work {a_file}: exists and is not a directory"),
             (["--out", str(a_file), "--work", str(tmp_path / "w")], f"--out {a_file}: exists and is not a directory"),
             (["--threads", "100000000000"], "argument --threads: expected an integer >= 0 and <= 1024")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as refused:
            recipe.main(argv)
        assert refused.value.code == 2 and message in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
