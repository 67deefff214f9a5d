"""The budgeted study end to end: every FLOP in the ledger (checked against closed-form counts), the cap under
concurrency, runs outside the runs directory, one gqa convention, resume budgets, study plans and the report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_plan
from test_train import write_small_data

import flops as flops_cli
import forecast as forecast_cli
import report as report_cli
import train as train_cli
from ledger import Ledger, read_record, read_records
from study.estimate import estimate_plan
from study.plan import PlanError, best_run, load_plan, stage_runs
from study.standing import resolve
from training import TrainConfig, read_metrics
from training.budget import plan_run_flops

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--batch", "2", "--ctx", "32", "--val-batches", "1", "--rank", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5")


def run_main(main, capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# ---- closed-form counts of the tiny preset -------------------------------------------------------------------------
# tiny: hidden 112, 7 query heads and 1 key/value head of 16, MLP 256, 3 layers, vocabulary 32, tied embeddings.
# Written from the counting rules (matmul m x n . n x p = m*p*(2n-1); exp, log, sqrt, sin, cos = 10; others 1),
# not by calling the counter.
D, HEADS, KV, HD, MLP, LAYERS, VOCAB = 112, 7, 1, 16, 256, 3, 32


def linear(n_in: int, n_out: int, bias: bool = False) -> int:
    return n_out * (2 * n_in - 1) + (n_out if bias else 0)


def lora(n_in: int, n_out: int, rank: int) -> int:
    return linear(n_in, rank) + linear(rank, n_out) + 2 * n_out  # A, B, scaling multiply, add


def closed_forward(sequences: int, T: int, S: int, scored: int, head_rows: int = VOCAB, rank: int = 0,
                   loss: bool = False) -> int:
    """Forward FLOPs of `sequences` x T new tokens attending to S keys, `scored` positions through the LM head."""
    tokens = sequences * T
    norm = 4 * D + 12  # squares, mean (D-1 adds + divide), eps, sqrt + inverse, normalise, weight
    per_token_layer = (2 * norm + linear(D, HEADS * HD, True) + 2 * linear(D, KV * HD, True) + linear(HEADS * HD, D)
                       + (HEADS + KV) * (2 * HD + HD // 2 + HD)  # rotary on q and k heads
                       + 2 * linear(D, MLP) + MLP * 13 + MLP + linear(MLP, D)  # SwiGLU
                       + 2 * D)  # residual adds
    if rank:
        per_token_layer += lora(D, HEADS * HD, rank) + lora(D, KV * HD, rank)  # on q_proj and v_proj
    core = T * S * (2 * HD - 1) + T * S + T * (10 * S + S - 1 + S) + T * HD * (2 * S - 1)
    rotary_tables = HD // 2 + HD * 10 + HD * 10
    total = (tokens * rotary_tables + LAYERS * (tokens * per_token_layer + sequences * HEADS * core) + tokens * norm
             + scored * head_rows * (2 * D - 1))
    if loss:  # per position: exponentials, sum, log, minus the target; then the mean
        total += scored * (VOCAB * 10 + VOCAB - 1 + 10 + 1) + scored - 1 + 1
    return total


def test_train_and_forecast_book_what_a_closed_form_count_gives(tmp_path, capsys, small_data):
    runs = tmp_path / "runs"
    status, _, err = run_main(train_cli.main, capsys, *TINY, "--data", small_data, "--steps", "2", "--eval-every", "1",
                              "--runs-dir", runs, "--out", runs / "r")
    assert status == 0, err
    status, out, err = run_main(forecast_cli.main, capsys, "--run", runs / "r", "--limit", "2", "--horizon", "3",
                                "--baselines", "persistence,untrained", "--quiet")
    assert status == 0, err
    record = read_record(runs / "r" / "flops.json")
    assert record.reservations == [] and record.data["runs_dir"] == str(runs.resolve())  # forecast found its ledger
    # training: 2 steps of batch 2 x ctx 32, forward + 2 x backward, LoRA r2 on q and v
    assert record.by_kind["train"] == 2 * 3 * closed_forward(2, 32, 32, 2 * 31, rank=2, loss=True)
    # validation: at steps 0, 1, 2; each pass one chunk of the fixed windows, forward with loss, no backward
    passes, windows = record.data["eval"]["passes"], record.data["eval"]["windows"]
    assert passes == 3 and windows == 3 * 2
    assert record.by_kind["eval"] == 3 * closed_forward(2, 32, 32, 2 * 31, rank=2, loss=True)
    # forecasts: the merged model and the untrained base (same shapes); one generate call each for 2 prompts
    entries = {e["label"]: e for e in record.forecasts}
    assert set(entries) == {"model", "untrained"} and record.by_kind["forecast"] == sum(
        e["flops"] for e in entries.values())
    for entry in entries.values():
        assert entry["calls"] == 1 and entry["prefill_tokens"] % 2 == 0 and entry["decode_tokens"] % 2 == 0
        width, fed = entry["prefill_tokens"] // 2, entry["decode_tokens"] // 2
        assert fed >= 3 * 2 * 5  # 3 steps of two "d.dd" numbers and separators
        candidates = 10 + 3 + 1  # digits, point, the two separators, the stop token
        expected = closed_forward(2, width, width, 2, candidates) + sum(
            closed_forward(2, 1, width + j + 1, 2, candidates) for j in range(fed))
        assert entry["flops"] == expected
    assert f"booked in {runs / 'r' / 'flops.json'}" in out


def test_runs_outside_the_runs_directory_and_mixed_conventions_are_refused(tmp_path, capsys, small_data):
    runs, flags = tmp_path / "runs", [*TINY, "--data", small_data, "--steps", "1"]
    status, _, err = run_main(train_cli.main, capsys, *flags, "--runs-dir", runs, "--out", tmp_path / "elsewhere")
    assert status == 2 and "lies outside --runs-dir" in err and "--no-budget" in err
    assert not (tmp_path / "elsewhere" / "config.json").exists()
    status, out, err = run_main(train_cli.main, capsys, *flags, "--runs-dir", runs, "--out", tmp_path / "elsewhere",
                                "--no-budget")
    assert status == 0, err
    assert "was not counted in any FLOP ledger" in out and read_records(runs) == []
    assert read_record(tmp_path / "elsewhere" / "flops.json").by_kind["train"] > 0  # its own record only

    assert run_main(train_cli.main, capsys, *flags, "--runs-dir", runs, "--out", runs / "a", "--gqa", "mha")[0] == 0
    status, _, err = run_main(train_cli.main, capsys, *flags, "--runs-dir", runs, "--out", runs / "b", "--gqa", "real")
    assert status == 3 and "counts attention with --gqa mha" in err and "Pass --gqa mha" in err
    assert not (runs / "b" / "config.json").exists()
    status, _, err = run_main(flops_cli.main, capsys, "--model", "tiny", "--runs", runs, "--gqa", "real")
    assert status == 3 and "counts attention with --gqa mha" in err
    assert run_main(train_cli.main, capsys, *flags, "--runs-dir", runs, "--out", runs / "b")[0] == 0  # follows it
    assert {r.gqa for r in read_records(runs)} == {"mha"}


def test_resume_counts_the_runs_own_earlier_flops(tmp_path, capsys, small_data):
    runs, flags = tmp_path / "runs", [*TINY, "--data", small_data, "--eval-every", "2", "--checkpoint-every", "2"]
    assert run_main(train_cli.main, capsys, *flags, "--steps", "2", "--runs-dir", runs, "--out", runs / "r")[0] == 0
    earlier = read_record(runs / "r" / "flops.json").flops_used
    config = TrainConfig(model="tiny", batch=2, ctx=32, val_batches=1, rank=2, lr=1e-3, steps=4, eval_every=2)
    rest = plan_run_flops(config, start_step=2).total  # steps 3 and 4, validation after step 4
    assert rest == 2 * plan_run_flops(config).per_step + plan_run_flops(config).eval_pass
    status, _, err = run_main(train_cli.main, capsys, *flags, "--steps", "4", "--runs-dir", runs, "--out", runs / "r",
                              "--resume", "--max-flops", earlier + rest - 1)
    assert status == 3 and f"already spent or reserved in {runs}" in err  # its own 2 steps count
    status, _, err = run_main(train_cli.main, capsys, *flags, "--steps", "4", "--runs-dir", runs, "--out", runs / "r",
                              "--resume", "--max-flops", earlier + rest)
    assert status == 0, err
    assert read_record(runs / "r" / "flops.json").flops_used == earlier + rest  # exactly the cap


def test_two_runs_started_together_under_a_one_run_cap(tmp_path, small_data):
    runs = tmp_path / "runs"
    config = TrainConfig(model="tiny", batch=2, ctx=32, val_batches=1, rank=2, lr=1e-3, steps=40)
    cap = plan_run_flops(config).total * 3 // 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWEN_MINI_CACHE": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--data", small_data, "--steps", "40",
                                   "--runs-dir", str(runs), "--out", str(runs / name), "--max-flops", str(cap)],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in ("a", "b")]
    results = [p.communicate(timeout=300) for p in processes]
    statuses = sorted(p.returncode for p in processes)
    assert statuses == [0, 3], results
    refused = "ab"[[p.returncode for p in processes].index(3)]
    assert not (runs / refused / "config.json").exists()  # refused before it loaded anything
    assert "refused by the FLOP budget" in results["ab".index(refused)][1]
    totals = Ledger(runs).totals()
    assert totals.outstanding == 0 and totals.spent == plan_run_flops(config).total <= cap


# ---- plans ---------------------------------------------------------------------------------------------------------

def write_plan(path: Path, data: str, grid_steps: int = 6) -> Path:
    path.write_text(tiny_plan("small", data, f"""
[forecast]
limit = 2
horizon = 3
batch = 4
baselines = ["persistence"]

[[stage]]
name = "zero_shot"
forecast = "base"

[[stage]]
name = "grid"
lr = [1e-3, 3e-3]
rank = [2, 4]
steps = {grid_steps}

[[stage]]
name = "context"
from = "grid"
ctx = [16, 32]
steps = 6

[[stage]]
name = "test"
forecast = "context"
which = "best"
baselines = ["persistence", "untrained"]
"""))
    return path


def test_plan_files_are_checked(tmp_path):
    plan = write_plan(tmp_path / "p.toml", "x.h5")
    assert [s.name for s in load_plan(plan).stages] == ["zero_shot", "grid", "context", "test"]
    bad = {"[[stage]]\nname = 'g'\nlearning_rate = [1e-3]\n": "does not take learning_rate",
           "[[stage]]\nname = 'g'\nfrom = 'nowhere'\n": "must name an earlier training stage",
           "[[stage]]\nname = 'f'\nforecast = 'later'\n": "must be \"base\" or an earlier stage",
           "[[stage]]\nname = 'g'\nlr = []\n": "an empty list",
           "[[stage]]\nname = 'g'\nstride = 100\nctx = 64\n": "stride 100 > ctx 64",
           "[study]\nbudget = 1\n[[stage]]\nname = 'g'\n": "[study] does not take budget",
           "[[stage]]\nname = 'g'\n[[stage]]\nname = 'g'\n": "two stages are named 'g'",
           "stage = 3 4": "not valid TOML"}
    for text, message in bad.items():
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(PlanError, match=message.replace("[", r"\[")):
            load_plan(tmp_path / "bad.toml")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, small_data):
    """A small plan, estimated by `flops.py --plan`, then run by `train.py --plan`."""
    root = tmp_path_factory.mktemp("study")
    plan = write_plan(root / "small.toml", small_data)
    runs = root / "runs"
    estimate = estimate_plan(load_plan(plan, runs_dir=runs))
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)]) == 0
    return plan, runs, estimate


def test_flops_plan_equals_what_train_plan_records(finished_study, capsys):
    plan, runs, estimate = finished_study
    spent = Ledger(runs).totals()
    assert spent.outstanding == 0
    assert abs(spent.spent / estimate.total - 1) < 0.01, (spent, estimate.total)
    by_stage = {s.name: s for s in estimate.stages}
    training = sum(r.by_kind["train"] + r.by_kind["eval"] for r in read_records(runs))
    assert training == by_stage["grid"].total + by_stage["context"].total  # exact: steps and passes as planned
    assert by_stage["context"].runs == 2  # ctx 16, and ctx 32: the grid's best run itself, not trained again
    study = json.loads((runs / "small" / "study.json").read_text())
    context = next(s for s in study["stages"] if s["name"] == "context")
    assert study["stages"][1]["best"] in context["runs"]
    status, out, _ = run_main(flops_cli.main, capsys, "--plan", plan, "--runs", runs)
    assert status == 0 and "The rest of the plan needs 0" in out  # everything booked, nothing left
    status, out, _ = run_main(flops_cli.main, capsys, "--plan", plan, "--runs", runs / "fresh", "--max-flops",
                              estimate.total // 2)
    assert status == 3 and "DOES NOT FIT" in out


def test_report_of_a_small_study(finished_study, tmp_path, capsys):
    _, runs, _ = finished_study
    status, out, err = run_main(report_cli.main, capsys, runs, "--out", tmp_path, "--seed", "1")
    assert status == 0, err
    text = (tmp_path / "report.md").read_text()
    for expected in ("## Findings", "## Budget", "## FLOPs", "## Runs", "## small/grid", "## small/context",
                     "## Results", "small/grid/tiny_r4_lr0.003_ctx32", "| fine-tuned |", "| persistence |",
                     "| zero-shot |", "| medMSE |", "train FLOPs", "val @0"):
        assert expected in text, expected
    figures = {p.name for p in (tmp_path / "report_figures").iterdir()}
    assert {"budget.png", "loss_small_grid.png", "heatmap_small_grid.png", "context_small_context.png"} <= figures
    assert all(f"report_figures/{name}" in text for name in figures)
    assert run_main(report_cli.main, capsys, tmp_path / "nothing")[0] == 2


def test_a_killed_plan_continues_where_it_stopped(tmp_path, small_data, capsys):
    plan, runs = write_plan(tmp_path / "small.toml", small_data, grid_steps=30), tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWEN_MINI_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--plan", str(plan), "--runs-dir", str(runs)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = (runs / "small" / "grid" / name for name in ("tiny_r2_lr0.001_ctx32", "tiny_r4_lr0.001_ctx32"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (second / "metrics.jsonl").is_file() or \
            len(read_metrics(second)) < 2:
        assert process.poll() is None, "the plan ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = (first / "metrics.jsonl").read_text()
    assert read_record(second / "flops.json").reservations  # the killed run's reservation is still held...
    status, out, _ = run_main(flops_cli.main, capsys, "--runs", runs, "--settle")
    assert status == 0 and "settled: tiny_r4_lr0.001_ctx32" in out  # ... until its process is found gone
    assert train_cli.main(["--plan", str(plan), "--runs-dir", str(runs)]) == 0
    assert (first / "metrics.jsonl").read_text() == done_before  # a finished run is not trained again
    assert [m["step"] for m in read_metrics(second)] == list(range(31))  # the killed one resumed to its end
    study = json.loads((runs / "small" / "study.json").read_text())
    assert [s["name"] for s in study["stages"]] == ["zero_shot", "grid", "context", "test"]
    assert Ledger(runs).totals().outstanding == 0


@pytest.mark.parametrize("name", ["coursework", "demo"])
def test_shipped_plans_fit_the_budget(name, tmp_path):
    """The plans docs/studies.md points to load and fit 1e17 with everything counted (the coursework one close)."""
    plan = load_plan(ROOT / "plans" / f"{name}.toml", runs_dir=tmp_path)
    estimate = estimate_plan(plan)
    assert estimate.fits and estimate.total <= 1e17
    if name == "coursework":
        assert plan.gqa == "mha" and estimate.total > 0.9e17  # uses the budget, as the reports' plans do
    else:
        assert (ROOT / plan.train["model"]).is_dir()  # the shipped series-tiny: runs offline


def test_a_compiled_forecast_books_what_its_fixed_shape_steps_compute(tmp_path, capsys):
    """--compile --jump-forward: every decode step computes 2 slots of every row, each attending to every slot of the
    static cache (prompt + longest forecast + 1), so that is what is booked and reserved — not the eager count."""
    from forecasting.grammar import max_forecast_tokens

    runs = tmp_path / "runs"
    booked = {}
    for mode in ([], ["--compile", "--jump-forward"]):
        out = runs / ("compiled" if mode else "eager")
        status, _, err = run_main(forecast_cli.main, capsys, "--model", "tiny", "--limit", "2", "--horizon", "3",
                                  "--no-baselines", "--quiet", "--runs-dir", runs, "--out", out, *mode)
        assert status == 0, err
        booked[bool(mode)] = read_record(out / "flops.json").forecasts[0]
    eager, compiled = booked[False], booked[True]
    width = compiled["prefill_tokens"] // 2
    candidates = 10 + 3 + 1
    assert compiled["prefill_flops"] == eager["prefill_flops"] == closed_forward(2, width, width, 2, candidates)
    longest = max_forecast_tokens(3, 2)
    per_step = closed_forward(2, 2, width + longest + 1, 2, candidates)
    steps, rest = divmod(compiled["decode_flops"], per_step)
    assert rest == 0 and 3 * 2 * 5 / 2 <= steps < longest  # at most 2 tokens a step, fewer steps than tokens
    assert compiled["decode_flops"] > eager["decode_flops"]


def test_from_a_stage_starts_from_its_lowest_validation_loss_not_its_last(tmp_path):
    """Overfitting, the case `from = "<stage>"` exists for: every curve rises after its minimum. The grid's second
    run has the lowest minimum (1.0) but the worst last loss (1.9); the third has the best last loss (1.45); the
    fourth the highest minimum. `from = "grid"` must start the context stage from the second run, whole."""
    plan = load_plan(write_plan(tmp_path / "p.toml", "x.h5"), runs_dir=tmp_path / "runs")
    grid = stage_runs(plan.stage("grid"), plan.train)
    curves = [[2.0, 1.5, 1.6], [2.0, 1.0, 1.9], [2.0, 1.4, 1.45], [2.0, 1.8, 1.7]]
    assert len(grid) == len(curves)
    for run, curve in zip(grid, curves):
        directory = run.run_dir(plan)
        (directory / "adapter").mkdir(parents=True)  # finished: weights saved (adapter_config.json, written last),
        (directory / "adapter" / "adapter_config.json").write_text("{}")  # every step logged
        (directory / "config.json").write_text(json.dumps({"ctx": 32}))
        (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": 3 * i, "val_loss": loss}) + "\n"
                                                         for i, loss in enumerate(curve)))
    winner = grid[1]
    assert best_run(grid, plan) is winner
    assert best_run(list(reversed(grid)), plan) is winner  # not a matter of position
    (context,) = resolve(plan)["context"]  # one run list: the grid is complete, its best run known
    assert [(r.settings["lr"], r.settings["rank"], r.settings["ctx"]) for r in context] == \
        [(winner.settings["lr"], winner.settings["rank"], 16), (winner.settings["lr"], winner.settings["rank"], 32)]
    assert context[1] == winner  # ctx 32 is the winner's own setting: the run itself, not trained again
