"""--tensorboard: event files whose scalars are metrics.jsonl's values (against the step, and the losses against the
cumulative FLOPs), nothing without the flag, no step twice after a resume, one log directory for a study's runs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
from conftest import tiny_plan
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import Killed, kill_after, tiny_config, write_small_data

import train as train_cli
from study.plan import PlanError, load_plan
from training import read_metrics, train_run
from training.tensorboard import FLOPS_DIR, STEP_TAGS

TINY = ["--model", "tiny", "--batch", "2", "--ctx", "32", "--val-batches", "1", "--rank", "2", "--lr", "1e-3",
        "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5", n=20)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in `log_dir`, as TensorBoard's reader sees them (purges applied)."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_board_matches_metrics(board: Path, metrics: list[dict]) -> None:
    by_step, by_flops = scalars(board), scalars(board / FLOPS_DIR)
    flat = [{**m, **{f"{key}/{part}": v for key in STEP_TAGS if isinstance(m.get(key), dict)
                     for part, v in m[key].items()}} for m in metrics]  # val_loss_last: {N: loss}
    tags = {**{k: t for k, t in STEP_TAGS.items() if not any(isinstance(m.get(k), dict) for m in metrics)},
            **{k: STEP_TAGS[k.split("/")[0]] + "/" + k.split("/")[1] for m in flat for k in m if "/" in k}}
    assert "loss/val_last/8" in tags.values()
    for key, tag in tags.items():
        expected = [(m["step"], m[key]) for m in flat if m.get(key) is not None]
        got = by_step.get(tag, [])
        assert [s for s, _ in got] == [s for s, _ in expected], tag  # each step once, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag  # float32 scalars
    for key in ("train_loss", "val_loss"):
        expected = [(m["flops"], m[key]) for m in metrics if m.get(key) is not None]
        got = by_flops[f"by_flops/{key}"]
        assert [s for s, _ in got] == [s for s, _ in expected], key  # the x-axis is the cumulative FLOPs, exactly
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path, small_data, capsys):
    run = tmp_path / "runs" / "run"
    assert train_cli.main([*TINY, "--data", small_data, "--steps", "4", "--eval-every", "2", "--runs-dir",
                           str(tmp_path / "runs"), "--out", str(run), "--tensorboard"]) == 0
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert_board_matches_metrics(run / "tensorboard", metrics)
    by_step = scalars(run / "tensorboard")
    assert [s for s, _ in by_step["loss/train"]] == [1, 2, 3, 4]
    assert [s for s, _ in by_step["loss/val"]] == [0, 2, 4]
    assert [s for s, _ in by_step["optim/lr"]] == [0, 1, 2, 3, 4]
    assert [s for s, _ in scalars(run / "tensorboard" / FLOPS_DIR)["by_flops/train_loss"]] == \
        [m["flops"] for m in metrics[1:]] and metrics[1]["flops"] > 0


def test_without_the_flag_no_tensorboard_directory(tmp_path, small_data):
    result = train_run(tiny_config(tmp_path / "run", small_data, ctx=32, batch=2, steps=1, val_batches=1),
                       progress=False)
    assert (result.run_dir / "metrics.jsonl").is_file() and not (result.run_dir / "tensorboard").exists()


def test_a_resumed_run_logs_no_step_twice(tmp_path, small_data):
    settings = dict(ctx=32, batch=2, steps=5, val_batches=1, eval_every=2, checkpoint_every=2, tensorboard=True,
                    tensorboard_dir=str(tmp_path / "board"))
    with pytest.raises(Killed):
        train_run(tiny_config(tmp_path / "run", small_data, **settings), hooks=[kill_after(3)], progress=False)
    assert [s for s, _ in scalars(tmp_path / "board")["loss/train"]] == [1, 2, 3]  # step 3: after the checkpoint
    resumed = train_run(tiny_config(tmp_path / "run", small_data, resume=True, **settings), progress=False)
    assert not (resumed.run_dir / "tensorboard").exists()  # --tensorboard-dir: there instead
    assert len(list((tmp_path / "board").glob("events.out.tfevents.*"))) == 2  # appended: one file per process
    assert_board_matches_metrics(tmp_path / "board", read_metrics(resumed.run_dir))  # step 3 once: the redone one


def test_missing_package_is_one_line_before_anything_runs(tmp_path, small_data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    run = tmp_path / "runs" / "run"
    assert train_cli.main([*TINY, "--data", small_data, "--steps", "1", "--runs-dir", str(tmp_path / "runs"),
                           "--out", str(run), "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorboard==2.21.0" in err
    assert not run.exists()


def plan_text(data, stage: str = "grid", **extra) -> str:
    return tiny_plan("tb", data, f'[[stage]]\nname = "{stage}"\nlr = [1e-3, 3e-3]', gqa=None, steps=2,
                     checkpoint_every=0, eval_every=None, **extra)


def test_a_study_puts_its_runs_under_one_log_directory(tmp_path, small_data, capsys):
    plan = tmp_path / "tb.toml"
    plan.write_text(plan_text(small_data, tensorboard=True))
    runs = tmp_path / "runs"
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)]) == 0
    study = runs / "tb"
    run_dirs = sorted(p.parent for p in (study / "grid").glob("*/metrics.jsonl"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert not (run_dir / "tensorboard").exists()
        assert_board_matches_metrics(study / "tensorboard" / "grid" / run_dir.name, read_metrics(run_dir))
    assert sorted(p.name for p in (study / "tensorboard" / "grid").iterdir()) == [p.name for p in run_dirs]


def test_plan_tensorboard_key_is_checked(tmp_path):
    plan = tmp_path / "bad.toml"
    plan.write_text(plan_text("x.h5", tensorboard="yes"))
    with pytest.raises(PlanError, match="tensorboard must be true or false"):
        load_plan(plan)
    plan.write_text(plan_text("x.h5", tensorboard_dir="elsewhere"))
    with pytest.raises(PlanError, match="does not take tensorboard_dir"):
        load_plan(plan)
    plan.write_text(plan_text("x.h5", "tensorboard", tensorboard=True))
    with pytest.raises(PlanError, match="cannot be named 'tensorboard'"):
        load_plan(plan)


def test_grid_with_a_tensorboard_dir_gives_each_run_a_subdirectory():
    from training.cli import build_parser, configs_from_args

    args = build_parser().parse_args(["--model", "tiny", "--lr", "1e-3", "3e-3", "--tensorboard",
                                      "--tensorboard-dir", "board"])
    configs = configs_from_args(args)
    assert [c.tensorboard_path for c in configs] == [Path("board") / c.run_name for c in configs]
    single = configs_from_args(build_parser().parse_args(["--model", "tiny", "--tensorboard"]))[0]
    assert single.tensorboard_path == single.run_dir / "tensorboard"
