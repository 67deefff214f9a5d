"""The flops.py command line, run in-process (importing torch once for the whole file)."""
from __future__ import annotations

import json
import time

import pytest
from test_flops import HAND, HAND_STEP, inject_stand_in

import flops as flops_cli
from ledger import Ledger
from qwen_mini import QwenConfig
from qwen_mini.flops import count_forward
from qwen_mini.model import meta_model


def run(capsys, *argv):
    status = flops_cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_json_for_a_config_file_matches_the_hand_count(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HAND.to_hf()))
    status, out, _ = run(capsys, "--config", str(tmp_path), "--batch", "2", "--ctx", "3", "--rank", "0", "--json",
                         "--seed", "7")
    assert status == 0
    result = json.loads(out)
    assert result["per_step_flops"] == result["report"]["step"] == HAND_STEP
    assert result["settings"]["lora"]["rank"] == 0
    status, out_file, _ = run(capsys, "--config", str(tmp_path / "config.json"), "--batch", "2", "--ctx", "3",
                              "--rank", "0", "--json")
    assert json.loads(out_file)["per_step_flops"] == HAND_STEP


def test_lora_flags_reach_the_count(capsys):
    pytest.importorskip("lora")
    status, out, _ = run(capsys, "--model", "tiny", "--rank", "2", "--targets", "q_proj,k_proj", "--ctx", "16",
                         "--gqa", "mha", "--json")
    assert status == 0
    expected = count_forward(inject_stand_in(meta_model(QwenConfig.from_name("tiny")), 2, ("q_proj", "k_proj")),
                             4, 16, gqa="mha")
    assert json.loads(out)["per_step_flops"] == expected.step


def test_default_table_is_fast_and_needs_no_weights(capsys):
    pytest.importorskip("lora")
    flops_cli.main([])  # first call pays for imports, as `python flops.py` does before main()
    capsys.readouterr()
    start = time.perf_counter()
    status, out, _ = run(capsys)
    elapsed = time.perf_counter() - start
    assert status == 0 and elapsed < 1.0, elapsed
    assert "batch 4 x ctx 512" in out and "LoRA rank 4" in out and "q_proj, v_proj" in out
    for expected in ("layers.0", "layers.23", "lm_head", "loss", "share", "per step"):
        assert expected in out
    status, by_component, _ = run(capsys, "--by", "component", "--rank", "0")
    assert "self_attn.scores" in by_component and "no LoRA" in by_component


def book(runs, name, **by_kind):
    recorder = Ledger(runs).recorder(runs / name, run_name=name)
    for kind, flops in by_kind.items():
        recorder.add(kind, flops, **({"steps": flops // 10**12, "step": flops // 10**12} if kind == "train" else {}))


def test_ledger_and_refused_plan(capsys, tmp_path):
    book(tmp_path, "r1", train=3 * 10**16)
    book(tmp_path, "r2", train=4 * 10**16, eval=10**16)
    status, out, _ = run(capsys, "--model", "tiny", "--rank", "0", "--runs", str(tmp_path))
    assert status == 0
    assert "r1" in out and "r2" in out and "8.0e16" in out and "remaining    2.0e16" in out
    assert "train 7.0e16, eval 1.0e16, forecast 0" in out
    status, out, err = run(capsys, "--model", "tiny", "--rank", "0", "--runs", str(tmp_path), "--steps", "10",
                           "--max-flops", "80000000000000001")
    assert status == 3 and "REFUSED: planned" in err and "> budget 8.0e16" in err
    status, out, _ = run(capsys, "--model", "tiny", "--rank", "0", "--runs", str(tmp_path), "--steps", "10", "--json")
    result = json.loads(out)
    assert status == 0 and result["planned_run"]["fits"] and result["total"] == 8 * 10**16
    assert result["by_kind"] == {"train": 7 * 10**16, "eval": 10**16, "forecast": 0}
    assert result["budget"] == 10**17 and [r["run_name"] for r in result["runs"]] == ["r1", "r2"]


def test_over_budget_ledger_exits_3(capsys, tmp_path):
    book(tmp_path, "r1", train=6 * 10**16)
    book(tmp_path, "r2", forecast=5 * 10**16)
    status, out, err = run(capsys, "--model", "tiny", "--runs", str(tmp_path))
    assert status == 3 and "OVER BUDGET by 1.0e16" in out and "OVER BUDGET" in err
    status, out, _ = run(capsys, "--model", "tiny", "--runs", str(tmp_path), "--json")
    assert status == 3 and json.loads(out)["over_budget"] and json.loads(out)["total"] == 11 * 10**16


def test_bad_arguments_are_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        flops_cli.main(["--targets", "q_proj,w_proj"])
    assert exit_info.value.code == 2 and "unknown LoRA target(s) w_proj" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flops_cli.main(["--max-flops", "1.5"])
    status, _, err = run(capsys, "--model", "qwen9-100b")
    assert status == 2 and "neither a preset" in err
    status, _, err = run(capsys, "--model", "tiny", "--runs", str(tmp_path / "nowhere"))
    assert status == 2 and "no such directory" in err
    with pytest.raises(SystemExit) as exit_info:
        flops_cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--config", "--batch", "--ctx", "--rank", "--alpha", "--targets", "--steps", "--gqa",
                 "--json", "--seed", "--runs", "--max-flops"):
        assert flag in help_text
