"""The training loop on the tiny model: resuming equals never stopping, a short --full run learns, adapters and
weights come back through load_run, activation checkpointing changes nothing, run directories are protected."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lora
from data.lotka_volterra import save, simulate
from ledger import RECORD_NAME, read_record
from qwen_mini.loss import causal_lm_loss
from training import RunDirError, TrainConfig, load_run, read_metrics, train_run
from training.budget import eval_pass_flops, per_step_flops
from training.setup import enable_activation_checkpointing, lr_factor
from training.windows import batch_rows, validation_rows


def write_small_data(path: Path, n: int = 40, seed: int = 1) -> str:
    """A small simulated h5 (the built-in default has 1000 trajectories: too many to tokenize in every test)."""
    save(path, simulate(n=n, seed=seed))
    return str(path)


def tiny_config(run_dir: Path, data: str, **settings) -> TrainConfig:
    values = dict(model="tiny", data=data, ctx=64, batch=4, steps=6, lr=1e-2, val_batches=2, checkpoint_every=0,
                  out=str(run_dir), runs_dir=str(run_dir.parent))
    return TrainConfig(**{**values, **settings})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5")


@pytest.fixture(scope="module")
def ten_trajectories(tmp_path_factory) -> str:
    """7 train trajectories: 28 windows of 256 tokens, so a batch of 8 crosses an epoch boundary at step 4."""
    return write_small_data(tmp_path_factory.mktemp("data") / "lv10.h5", n=10)


class Killed(Exception):
    """Stands in for the process being killed."""


def kill_after(step: int):
    def hook(done: int, entry: dict) -> None:
        if done == step:
            raise Killed(f"killed after step {step}")
    return hook


def comparable(metrics: list[dict]) -> list[dict]:
    """Metrics without the timing, which legitimately differs between two runs."""
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resumed_run_matches_the_uninterrupted_run_exactly(tmp_path, ten_trajectories, mode):
    # Everything that carries state across a checkpoint is on: cosine schedule with warmup, gradient clipping,
    # AdamW moments, LoRA dropout (RNG), and a batch stream that crosses an epoch boundary (step 4 of 6).
    settings = dict(ctx=256, stride=256, batch=8, steps=6, checkpoint_every=3, eval_every=2, warmup=2,
                    schedule="cosine", grad_clip=0.5, weight_decay=0.01, lr=5e-3)
    settings.update(full=True) if mode == "full" else settings.update(rank=4, lora_dropout=0.2,
                                                                      targets=("q_proj", "v_proj", "down_proj"))
    whole = train_run(tiny_config(tmp_path / "whole", ten_trajectories, **settings), progress=False)

    stopped = tiny_config(tmp_path / "stopped", ten_trajectories, **settings)
    with pytest.raises(Killed):
        train_run(stopped, hooks=[kill_after(4)], progress=False)
    assert [m["step"] for m in read_metrics(stopped.run_dir)] == [0, 1, 2, 3, 4]  # step 4 is lost: checkpoint at 3
    resumed = train_run(tiny_config(tmp_path / "stopped", ten_trajectories, resume=True, **settings), progress=False)

    expected, got = comparable(read_metrics(whole.run_dir)), comparable(read_metrics(resumed.run_dir))
    assert [m["step"] for m in got] == list(range(7))
    assert got == expected  # losses, val losses, lr, grad norms: bit for bit
    assert len({m["train_loss"] for m in got[1:]}) == 6  # training happened
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    # The ledger counts the work really done: step 4 ran twice, and so did the validation after it (passes at
    # steps 0, 2, 4 before the kill, 4 and 6 after it).
    record = read_record(resumed.run_dir / RECORD_NAME)
    eval_pass = eval_pass_flops(resumed.config, n_rows=record.data["eval"]["windows"] // 5)
    assert record.steps_done == 6 and record.by_kind["train"] == 7 * resumed.per_step_flops
    assert record.data["eval"]["passes"] == 5 and record.by_kind["eval"] == 5 * eval_pass
    assert record.reservations == []  # the killed run's reservation was taken over, then settled
    assert whole.flops_used == 6 * whole.per_step_flops + 4 * eval_pass


def test_resume_refuses_other_settings_and_fresh_runs_refuse_a_used_directory(tmp_path, small_data):
    config = tiny_config(tmp_path / "run", small_data, steps=2)
    train_run(config, progress=False)
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        train_run(config, progress=False)
    with pytest.raises(RunDirError, match=r"lr: run has 0.01, now 0.02"):
        train_run(tiny_config(tmp_path / "run", small_data, steps=2, lr=2e-2, resume=True), progress=False)
    # More steps on resume continue the finished run from its final checkpoint.
    longer = train_run(tiny_config(tmp_path / "run", small_data, steps=3, resume=True), progress=False)
    assert [m["step"] for m in read_metrics(longer.run_dir)] == [0, 1, 2, 3]


def test_short_full_run_lowers_validation_loss_and_load_run_returns_the_trained_weights(tmp_path, small_data):
    config = tiny_config(tmp_path / "full", small_data, full=True, lr=3e-3, batch=8, ctx=128, steps=60,
                         eval_every=20, warmup=5)
    result = train_run(config, progress=False)
    val = dict(result.val_losses)
    assert sorted(val) == [0, 20, 40, 60]
    # Untrained: ~ln(32) = 3.47 nats over the 32-token vocabulary; the digit/separator structure alone is worth much
    # more than half of that (measured: 3.43 -> 1.12-1.15 for seeds 0-3).
    assert val[0] > 3.0 and val[60] < 0.4 * val[0], val
    assert val[20] > val[40] > val[60]

    model, tokenizer, run_config = load_run(result.run_dir)
    assert run_config["full"] and run_config["trainable_params"] == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 32, (2, 40), generator=torch.Generator().manual_seed(0))
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), result.model(ids))
    assert tokenizer.encode("0.12,3.4;") == result.tokenizer.encode("0.12,3.4;")
    assert (result.run_dir / "loss_curve.png").stat().st_size > 10_000


def test_lora_run_writes_a_peft_adapter_that_load_run_reapplies(tmp_path, small_data):
    config = tiny_config(tmp_path / "lora", small_data, rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj"),
                         lr=2e-2, steps=5)
    result = train_run(config, progress=False)
    adapter = result.run_dir / "adapter"
    peft_config = json.loads((adapter / lora.ADAPTER_CONFIG_NAME).read_text())
    assert (peft_config["peft_type"], peft_config["r"], peft_config["lora_alpha"]) == ("LORA", 4, 8)
    assert peft_config["target_modules"] == ["q_proj", "v_proj", "up_proj"]
    assert peft_config["base_model_name_or_path"] == "tiny"
    with safe_open(str(adapter / lora.ADAPTER_WEIGHTS_NAME), "pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in names and len(names) == 3 * 3 * 2

    ids = torch.randint(0, 32, (2, 50), generator=torch.Generator().manual_seed(1))
    result.model.eval()
    with torch.no_grad():
        trained = result.model(ids)
        unmerged, _, run_config = load_run(result.run_dir, merge=False)
        assert torch.equal(unmerged(ids), trained)  # the same modules and weights: bit for bit
        merged, _, _ = load_run(result.run_dir)
        assert not any(True for _ in lora.lora_layers(merged))
        torch.testing.assert_close(merged(ids), trained, rtol=1e-5, atol=1e-5)
        untrained_base = load_run_base(run_config)
        assert (untrained_base(ids) - trained).abs().max() > 1e-2  # the adapter does change the model
    assert run_config["trainable_params"] == sum(p.numel() for _, p in lora.lora_state_dict(result.model).items())
    assert run_config["split"]["val"] and run_config["data_source"] == small_data


def load_run_base(run_config: dict):
    from qwen_mini import load_model_and_tokenizer
    return load_model_and_tokenizer(run_config["model"], seed=run_config["model_seed"])[0]


def test_load_run_names_the_directory_and_what_is_missing(tmp_path, small_data):
    with pytest.raises(RunDirError, match="no such run directory"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"empty: not a training run directory \(no config.json"):
        load_run(tmp_path / "empty")
    result = train_run(tiny_config(tmp_path / "run", small_data, steps=1), progress=False)
    (result.run_dir / "adapter" / lora.ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(RunDirError, match=rf"{result.run_dir}: missing adapter/{lora.ADAPTER_WEIGHTS_NAME}.*--resume"):
        load_run(result.run_dir)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    from qwen_mini import load_model_and_tokenizer

    ids = torch.randint(0, 32, (2, 48), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointed in (False, True):
        model = load_model_and_tokenizer("tiny")[0].train()
        if checkpointed:
            assert enable_activation_checkpointing(model) == model.config.num_hidden_layers
            assert enable_activation_checkpointing(model) == 3  # wrapping twice is a no-op, not a double wrap
        loss = causal_lm_loss(model, ids, ids)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for plain, recomputed in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=1e-7)


def test_activation_checkpointing_flops_count_the_recomputed_blocks():
    plain = per_step_flops(TrainConfig(model="tiny", ctx=64, batch=2))
    recomputing = per_step_flops(TrainConfig(model="tiny", ctx=64, batch=2, activation_checkpointing=True))
    # The recomputation is one more forward of the blocks: less than a third of a step (the LM head and loss are
    # not recomputed), far more than nothing.
    assert plain < recomputing < plain * 4 / 3 and recomputing - plain > plain / 6


def test_batches_are_a_pure_function_of_seed_and_step():
    n, batch = 10, 4
    stream = [int(i) for step in range(5) for i in batch_rows(step, n, batch, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # whole epochs
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    assert batch_rows(2, n, batch, seed=3).tolist() == stream[8:12]
    assert batch_rows(2, n, batch, seed=4).tolist() != stream[8:12]
    rows = validation_rows(100, 8)
    assert rows[0] == 0 and rows[-1] == 99 and len(set(rows.tolist())) == 8
    assert validation_rows(5, 8).tolist() == [0, 1, 2, 3, 4]


def test_learning_rate_schedule():
    cosine = TrainConfig(model="tiny", steps=10, warmup=2, schedule="cosine")
    factors = [lr_factor(s, cosine) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(factors[2:], factors[3:])) and 0 < factors[-1] < 0.05
    assert math.isclose(lr_factor(6, cosine), 0.5)  # halfway through the decay
    constant = TrainConfig(model="tiny", steps=10, warmup=4)
    assert [lr_factor(s, constant) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]


def test_bfloat16_lora_keeps_the_trained_parameters_in_float32(tmp_path, small_data):
    result = train_run(tiny_config(tmp_path / "bf16", small_data, dtype="bfloat16", steps=2), progress=False)
    dtypes = {name: p.dtype for name, p in result.model.named_parameters()}
    assert {dtypes[name] for name in dtypes if ".lora_" in name} == {torch.float32}  # AdamW updates stay exact
    assert {dtypes[name] for name in dtypes if ".lora_" not in name} == {torch.bfloat16}  # half the base's memory
    assert all(math.isfinite(m["train_loss"]) for m in result.metrics[1:])
    model, _, _ = load_run(result.run_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
