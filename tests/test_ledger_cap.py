"""Hostile input, round 3 (issue 35), the ledger's part: one FLOP cap per runs directory, recorded when first given
(item 4), and a record whose reservation names an untrusted lock, named by a report and dropped by --settle (item 10).

The cap's numbers are checked against the ledger's own sums; the CLI cases check the exit status, one line (no
traceback), and that nothing was spent past the cap."""
from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_plan
from test_faults import lines_of
from test_train import write_small_data

import accounting.cli
import forecasting.cli
import report
import train
from common.exit_codes import EXIT_OVER_BUDGET, EXIT_USAGE
from ledger import (
    CAP_NAME,
    BudgetExceeded,
    CapConflict,
    Ledger,
    LedgerError,
    read_cap,
    read_record,
    read_records,
    totals,
)
from qwen_mini.flop_report import format_flops


def run_main(main, capsys, *argv) -> tuple[int, str, list[str]]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, lines_of(err)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5")


# ---- item 4: one cap per runs directory ---------------------------------------------------------------------------

def test_the_first_cap_given_is_recorded_and_another_is_refused_unless_changed(tmp_path):
    runs = tmp_path / "runs"
    Ledger(runs, 1000).reserve(runs / "a", 100, kind="train", run_name="a", what="job a").settle()
    cap = read_cap(runs)
    assert cap.max_flops == 1000 and cap.set_by == "job a" and cap.path == runs / CAP_NAME
    assert Ledger(runs).max_flops == 1000  # a job that gives no cap follows it, not the default 1e17
    with pytest.raises(CapConflict, match=r"has a FLOP cap of 1,000 .* asks for 2,000 .*--change-max-flops"):
        Ledger(runs, 2000).reserve(runs / "b", 100, kind="train", run_name="b")
    assert not (runs / "b").exists()  # refused before anything was written
    Ledger(runs, 2000, change_max_flops=True).reserve(runs / "b", 100, kind="train", run_name="b", what="b").settle()
    cap = read_cap(runs)
    assert cap.max_flops == 2000 and [c["max_flops"] for c in cap.changes] == [1000]
    # 100 + 100 spent (the reservations settled without spending: 0 booked), so a cap of 50 would be below them
    Ledger(runs).recorder(runs / "a", run_name="a").add("train", 150, steps=1, step=1)
    with pytest.raises(BudgetExceeded, match="below the 150 already spent"):
        Ledger(runs, 50, change_max_flops=True).set_cap("test")
    assert read_cap(runs).max_flops == 2000 and totals(read_records(runs)).committed == 150


def test_a_refused_or_unbudgeted_job_records_no_cap(tmp_path):
    refused, unbudgeted = tmp_path / "refused", tmp_path / "unbudgeted"
    with pytest.raises(BudgetExceeded):
        Ledger(refused, 10).reserve(refused / "a", 100, kind="train", run_name="a")
    Ledger(unbudgeted, 10).recorder(unbudgeted / "a", run_name="a").add("train", 100, steps=1, step=1)
    assert read_cap(refused) is None and read_cap(unbudgeted) is None


def test_a_damaged_cap_file_is_named_not_guessed(tmp_path):
    (tmp_path / CAP_NAME).write_text('{"max_flops": -5}')
    with pytest.raises(LedgerError, match=re.escape(str(tmp_path / CAP_NAME))):
        _ = Ledger(tmp_path).max_flops  # reading the cap is what raises


def test_a_plain_forecast_after_a_plan_draws_on_the_plans_cap(tmp_path, small_data, capsys):
    """Issue 35 item 4: after a plan with a small max_flops, `forecast.py --run` on its final run without
    --max-flops is refused by that cap (not counted against the default 1e17), flops.py --runs shows the cap and
    where it was recorded, and the plan run again reports nothing negative left."""
    runs, plan = tmp_path / "runs", tmp_path / "small.toml"
    text = tiny_plan("small", small_data, '[[stage]]\nname = "final"\nsteps = 2\n')
    plan.write_text(text)
    status, out, _ = run_main(accounting.cli.main, capsys, "--plan", plan, "--runs", runs, "--json")
    needed = json.loads(out)["total"]  # the plan's training and validation, exactly
    plan.write_text(text.replace("[study]\n", f"[study]\nmax_flops = {needed}\n"))
    status, out, lines = run_main(train.main, capsys, "--plan", plan, "--runs-dir", runs)
    assert status == 0, lines
    final = next(p.parent for p in runs.rglob("config.json") if (p.parent / "metrics.jsonl").is_file())
    spent = totals(read_records(runs)).spent
    assert read_cap(runs).max_flops == needed and spent <= needed
    status, _, lines = run_main(forecasting.cli.main, capsys, "--run", final, "--limit", "1", "--horizon", "3",
                                "--quiet", "--no-baselines")
    refusals = [line for line in lines if not line.startswith("forecasting ")]
    assert status == EXIT_OVER_BUDGET and len(refusals) == 1, lines
    assert f"> budget {format_flops(needed)}" in refusals[0] and "0 FLOPs left" in refusals[0], lines
    assert totals(read_records(runs)).spent == spent  # nothing spent past the plan's cap
    status, out, _ = run_main(accounting.cli.main, capsys, "--model", "tiny", "--runs", runs)
    budget_line = next(line for line in out.splitlines() if line.startswith("budget"))
    assert f"cap recorded in {runs / CAP_NAME}" in budget_line and "train.py" in budget_line, budget_line
    assert "100.00% of the budget" not in out
    status, out, lines = run_main(train.main, capsys, "--plan", plan, "--runs-dir", runs)
    assert status == 0, lines
    assert not re.search(r"(?<![\w.-])-\d", out), out  # no negative "left" anywhere in the plan's table


def test_another_cap_is_refused_by_every_tool_and_changed_only_explicitly(tmp_path, small_data, capsys):
    runs = tmp_path / "runs"
    common = ["--model", "tiny", "--data", small_data, "--runs-dir", runs, "--limit", "1", "--horizon", "3", "--quiet",
              "--no-baselines"]
    assert run_main(forecasting.cli.main, capsys, *common, "--max-flops", "1e12", "--out", runs / "a")[0] == 0
    assert read_cap(runs).max_flops == 10 ** 12
    for main, argv in ((forecasting.cli.main, [*common, "--max-flops", "1e17", "--out", runs / "b"]),
                       (accounting.cli.main, ["--model", "tiny", "--runs", runs, "--max-flops", "1e17"]),
                       (train.main, ["--model", "tiny", "--data", small_data, "--steps", "1", "--ctx", "32",
                                            "--batch", "2", "--val-batches", "1", "--runs-dir", runs,
                                            "--out", runs / "t", "--max-flops", "1e17"])):
        status, _, lines = run_main(main, capsys, *argv)
        assert status == EXIT_OVER_BUDGET and len(lines) == 1, lines
        assert "has a FLOP cap of 1.0e12" in lines[0] and "--change-max-flops" in lines[0], lines
        assert f"give --max-flops {10 ** 12}," in lines[0], lines  # the exact count: pasting it is accepted
    assert not (runs / "b").exists() and not (runs / "t").exists()
    status, _, lines = run_main(forecasting.cli.main, capsys, *common, "--change-max-flops", "--out", runs / "b")
    assert status == EXIT_USAGE and "--change-max-flops needs --max-flops" in lines[0]
    status, out, _ = run_main(accounting.cli.main, capsys, "--model", "tiny", "--runs", runs, "--max-flops", "3e12",
                              "--change-max-flops")
    assert status == 0 and "3.0e12 FLOPs is now the cap" in out
    assert read_cap(runs).max_flops == 3 * 10 ** 12 and read_cap(runs).changes[0]["max_flops"] == 10 ** 12
    assert run_main(forecasting.cli.main, capsys, *common, "--out", runs / "b")[0] == 0  # follows 3e12



def test_train_py_changes_the_cap_only_when_asked_and_a_plan_without_one_follows_it(tmp_path, small_data, capsys):
    runs = tmp_path / "runs"
    run = ["--model", "tiny", "--data", small_data, "--steps", "1", "--ctx", "32", "--batch", "2", "--val-batches",
           "1", "--runs-dir", runs]
    assert run_main(train.main, capsys, *run, "--out", runs / "a", "--max-flops", "1e12")[0] == 0
    with pytest.raises(SystemExit) as refused:
        train.main([str(a) for a in [*run, "--out", runs / "b", "--change-max-flops"]])
    assert refused.value.code == EXIT_USAGE and "give --max-flops too" in capsys.readouterr().err
    status, _, lines = run_main(train.main, capsys, *run, "--out", runs / "b", "--max-flops", "2e12",
                                "--change-max-flops")
    assert status == 0 and read_cap(runs).max_flops == 2 * 10 ** 12  # train.py changed it, as asked
    plan = tmp_path / "p.toml"  # no max_flops: the plan follows the directory's cap (2e12) instead of asking 1e17
    plan.write_text(tiny_plan("p", small_data, '[[stage]]\nname = "g"\nsteps = 1\n', gqa=None, eval_every=1))
    status, out, lines = run_main(train.main, capsys, "--plan", plan, "--runs-dir", runs)
    assert status == 0, lines
    assert "budget 2.0e12" in out and read_cap(runs).max_flops == 2 * 10 ** 12
    status, out, _ = run_main(report.main, capsys, runs, "--out", tmp_path / "report")
    assert status == 0
    text = (tmp_path / "report" / "report.md").read_text()  # the report's budget is the directory's cap
    assert "| 2.0e12 |" in text.split("## Budget")[1].split("##")[0]

# ---- item 10: a reservation whose lock path is not trusted ---------------------------------------------------------

def test_a_record_with_an_untrusted_lock_is_named_the_rest_reported_and_settle_drops_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    Ledger(runs).recorder(runs / "good", run_name="good").add("train", 100, steps=1, step=1)
    Ledger(runs).recorder(runs / "bad", run_name="bad").add("train", 40, steps=1, step=1)
    victim = tmp_path / "precious.lock"  # outside the record's directory: never opened, never emptied
    victim.write_text("keep me")
    record = json.loads((runs / "bad" / "flops.json").read_text())
    record["reservations"] = [{"id": "0123456789ab", "kind": "train", "flops": 1000, "spent": 10,
                               "lock": str(victim), "pid": 1, "host": "elsewhere"}]
    (runs / "bad" / "flops.json").write_text(json.dumps(record))
    with pytest.raises(LedgerError, match="bad/flops.json"):  # the budget still refuses to skip a record
        read_records(runs)
    unreadable = []
    assert [r.run_name for r in read_records(runs, unreadable)] == ["good"]
    assert len(unreadable) == 1 and "bad/flops.json" in unreadable[0] and "--drop-untrusted" in unreadable[0]
    assert report.main([str(runs)]) == 0  # the report names it and reports the rest
    text = (runs / "report.md").read_text()
    assert "bad/flops.json" in text and "good" in text
    capsys.readouterr()
    status, out, lines = run_main(accounting.cli.main, capsys, "--model", "tiny", "--runs", runs, "--settle")
    assert status == EXIT_USAGE and "--drop-untrusted" in lines[0], lines  # --settle alone names it, changes nothing
    status, out, lines = run_main(accounting.cli.main, capsys, "--model", "tiny", "--runs", runs, "--settle",
                                  "--drop-untrusted")
    assert status == 0, lines
    assert "bad: released 990 FLOPs" in out and "not a lock file beside" in out, out
    assert read_record(runs / "bad" / "flops.json").reservations == []
    assert totals(read_records(runs)).spent == 140 and victim.read_text() == "keep me"
