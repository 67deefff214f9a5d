"""The FLOP budget ledger: run records, sums, the refusal of a run that does not fit."""
from __future__ import annotations

import json

import pytest

from qwen_mini.budget import (DEFAULT_BUDGET, BudgetExceeded, LedgerError, check_budget, format_ledger, plan_run,
                              read_ledger, spent, write_run_record)
from qwen_mini.flops import format_flops, meta_model
from test_flops import HAND, HAND_STEP


def record(run_dir, name, flops_used, steps=10, per_step=None, planned=None):
    per_step = per_step if per_step is not None else flops_used // max(steps, 1)
    return write_run_record(run_dir, run_name=name, flops_used=flops_used, per_step_flops=per_step,
                            steps_done=steps, planned_flops=planned if planned is not None else flops_used,
                            config={"lr": 1e-4, "rank": 4, "data": run_dir})  # a Path value is written as text


def test_records_are_found_recursively_sorted_and_summed(tmp_path):
    runs = tmp_path / "runs"
    record(runs / "grid" / "lr1e-4_r8", "lr1e-4_r8", 5 * 10**16)
    record(runs / "baseline", "baseline", 3 * 10**16 + 1)  # exact integers, not floats
    record(runs / "grid" / "lr1e-5_r4", "lr1e-5_r4", 12_345)
    rows = read_ledger(runs)
    assert [row.run_name for row in rows] == ["baseline", "lr1e-4_r8", "lr1e-5_r4"]
    assert spent(runs) == 3 * 10**16 + 1 + 5 * 10**16 + 12_345 == 80_000_000_000_012_346
    assert spent(runs, exclude="lr1e-4_r8") == 3 * 10**16 + 1 + 12_345
    assert spent(runs, exclude=runs / "baseline") == 5 * 10**16 + 12_345
    assert rows[0].config["rank"] == 4 and rows[0].steps_done == 10
    assert not list(runs.rglob("*.tmp"))  # the atomic write left no temporary file


def test_rewriting_a_record_replaces_it(tmp_path):
    record(tmp_path / "run", "run", 100, steps=1)
    path = record(tmp_path / "run", "run", 700, steps=7)
    assert json.loads(path.read_text())["flops_used"] == 700
    assert [row.flops_used for row in read_ledger(tmp_path)] == [700]


def test_no_runs_yet(tmp_path):
    assert read_ledger(tmp_path / "missing") == [] and spent(tmp_path) == 0
    assert "(no runs recorded yet)" in format_ledger([], DEFAULT_BUDGET)


def test_check_budget_refuses_with_the_numbers(tmp_path):
    record(tmp_path / "a", "a", 3 * 10**16)
    record(tmp_path / "b", "b", 5 * 10**16)
    assert check_budget(2 * 10**16, tmp_path) == 0  # exactly the budget fits
    with pytest.raises(BudgetExceeded) as refused:
        check_budget(31 * 10**15, tmp_path, per_step_flops=10**13)
    message = str(refused.value)
    assert f"planned 3.1e16 FLOPs + 8.0e16 already spent in {tmp_path} = 1.11e17 > budget 1.0e17" in message
    assert "(log10: 16.49 + 16.90 = 17.05 > 17.00)" in message
    assert "2.0e16 FLOPs left, enough for 2,000 steps of 1.0e13 FLOPs" in message
    # resuming run b with its whole plan: what b already spent is inside the plan, not counted twice
    assert check_budget(6 * 10**16, tmp_path, exclude_run="b") == 10**17 - 3 * 10**16 - 6 * 10**16
    with pytest.raises(BudgetExceeded):
        check_budget(6 * 10**16, tmp_path)
    assert check_budget(1, tmp_path, max_flops=8 * 10**16 + 1) == 0


def test_plan_run_counts_steps_times_per_step(tmp_path):
    model = meta_model(HAND)
    plan = plan_run(model, steps=10, batch=2, ctx=3, runs_dir=tmp_path, max_flops=10**6)
    assert (plan.per_step_flops, plan.planned_flops) == (HAND_STEP, 10 * HAND_STEP)
    assert plan.remaining_after == 10**6 - 10 * HAND_STEP
    record(tmp_path / "earlier", "earlier", 300_000)
    with pytest.raises(BudgetExceeded, match=r"planned 7.7e5 FLOPs \+ 3.0e5 already spent .* enough for 9 steps"):
        plan_run(model, steps=10, batch=2, ctx=3, runs_dir=tmp_path, max_flops=10**6)
    assert (10**6 - 300_000) // HAND_STEP == 9


def test_ledger_table_has_cumulative_and_log10(tmp_path):
    record(tmp_path / "a", "a", 3 * 10**16, steps=3000)
    record(tmp_path / "b", "b", 5 * 10**16, steps=5000)
    text = format_ledger(read_ledger(tmp_path), DEFAULT_BUDGET)
    line_a, line_b = (next(line for line in text.splitlines() if line.startswith(name + " ")) for name in "ab")
    assert "3.0e16" in line_a and "16.48" in line_a and "3,000" in line_a
    assert "8.0e16" in line_b and "16.90" in line_b and "80.00%" in line_b
    assert "remaining    2.0e16  (log10 16.30)" in text
    over = format_ledger(read_ledger(tmp_path), 7 * 10**16)
    assert "OVER BUDGET by 1.0e16" in over


def test_unreadable_record_is_an_error_not_a_skip(tmp_path):
    record(tmp_path / "good", "good", 10)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "flops.json").write_text("{not json")
    with pytest.raises(LedgerError, match=r"bad/flops.json: unreadable run record"):
        spent(tmp_path)
    (tmp_path / "bad" / "flops.json").write_text(json.dumps({"run_name": "bad", "flops_used": -5}))
    with pytest.raises(LedgerError, match="flops_used must be >= 0"):
        read_ledger(tmp_path)


def test_record_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="flops_used must be a whole number"):
        record(tmp_path, "x", 1.5)
    with pytest.raises(ValueError, match="run_name must be a non-empty string"):
        write_run_record(tmp_path, run_name="", flops_used=0, per_step_flops=0, steps_done=0, planned_flops=0,
                         config={})


def test_format_flops():
    assert [format_flops(x) for x in (31 * 10**15, 8 * 10**16, 111 * 10**15, 10**17, 999, 0)] == \
        ["3.1e16", "8.0e16", "1.11e17", "1.0e17", "999", "0"]
